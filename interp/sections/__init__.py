"""`make figures` gallery sections, one per analysis: run it on the zoo pairs, save figures, log findings.

Each section caches its computed results under a content key made of the
pairs' :meth:`~interp.pairs.ModelPair.identity`, its options and
:func:`source_digest` of the modules that compute them, so editing the code
or retraining a model recomputes, and nothing else does.
"""

from __future__ import annotations

from pathlib import Path

from interp.cache import content_key

_PACKAGE = Path(__file__).resolve().parent.parent


def source_digest(*modules: str) -> str:
    """Content key of interp source files, given relative to the package (``"analysis/x.py"``)."""
    return content_key(*[(_PACKAGE / name).read_bytes() for name in modules])
