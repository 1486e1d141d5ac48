"""`make figures` gallery sections, one per analysis: run it on the zoo pairs, save figures, log findings."""
