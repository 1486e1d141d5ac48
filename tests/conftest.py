"""Test-session set-up: offline, caches inside the repo, and the zoo built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("INTERP_CACHE", str(ROOT / ".cache" / "interp"))
os.environ.setdefault("MPLCONFIGDIR", str(ROOT / ".cache" / "matplotlib"))


@pytest.fixture(scope="session")
def zoo_ready():
    """Build the default zoo (cached, content-keyed) once; a warm cache makes this a no-op."""
    from interp import zoo

    return zoo.build(progress=False)
