"""A content-addressed artifact store with atomic writes.

Artifacts (dequantized checkpoints, zoo models, base-model SVDs) live under
``cache_root()/<kind>/<key>``, where ``key`` is a hash of everything that
determines the artifact's content. A cached entry is trusted only when its key
matches, so a changed input never reuses a stale result. Writes go to a
temporary sibling and are renamed into place, so an interrupted write never
leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

_CHUNK = 1 << 20


def cache_root() -> Path:
    """Root of the artifact store: ``$INTERP_CACHE`` or ``~/.cache/interp``."""
    root = os.environ.get("INTERP_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "interp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _canonical(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return json.dumps(part, sort_keys=True, default=str).encode()


if TYPE_CHECKING:
    import torch


def content_key(*parts: Any, length: int = 20) -> str:
    """A short hex key from bytes, strings or JSON-able values (dict order ignored)."""
    digest = hashlib.sha256()
    for part in parts:
        blob = _canonical(part)
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
    return digest.hexdigest()[:length]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (a content key for in-memory weights)."""
    import torch

    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry(kind: str, key: str) -> Path:
    """Path of a cache entry (it may not exist yet)."""
    return cache_root() / kind / key


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block succeeds.

    If ``final`` already exists when the block ends (another process won the
    race) the new copy is discarded and the existing one kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
