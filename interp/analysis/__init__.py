"""The analyses: each takes a pair (or models) and returns a Result with a tidy table."""
