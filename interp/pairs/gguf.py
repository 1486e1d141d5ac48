"""GGUF files -> ordinary fp32 Hugging Face folders, dequantized once and cached.

A ``.gguf`` file (llama.cpp's format, often 4-bit quantized) cannot be read by
safetensors-based tools, so every analysis here works on a dequantized copy:
transformers' own GGUF loader unpacks the weights (and undoes llama.cpp's q/k
row permutation), and the result is saved as ``config.json`` +
``model.safetensors`` + tokenizer files. The copy lives in the cache under a
key derived from the file's sha256 and :data:`FORMAT_VERSION`, so the slow
step runs once per file and an edited file never reuses a stale folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from interp.cache import atomic_dir, atomic_write_json, content_key, entry, file_digest
from interp.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
#: Bump when the folder layout or conversion changes, so old cache entries are not reused.
FORMAT_VERSION = 1
SOURCE_FILE = "gguf_source.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json", SOURCE_FILE)


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return False


def _check_file(path: str | os.PathLike) -> Path:
    """Resolve ``path``; raise :class:`CheckpointError` unless it is a file with the GGUF magic."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"GGUF file not found: {path}. Check the path (or run `make real`).")
    if not path.is_file():
        raise CheckpointError(f"{path} is a directory, not a .gguf file; pass the file itself.")
    if not is_gguf(path):
        with open(path, "rb") as handle:
            head = handle.read(4)
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}. "
            "Pass a llama.cpp .gguf file here, or load a Hugging Face folder or safetensors file "
            "through load_pair directly."
        )
    return path.resolve()


def check_gguf(path: str | os.PathLike) -> Path:
    """Return ``path`` resolved if it is a complete GGUF file, else raise :class:`CheckpointError`.

    Catches a missing file, a file of another format and a truncated or corrupt
    one (its header or tensor table unreadable, or tensor data cut short).
    """
    path = _check_file(path)
    import gguf  # imported late: only needed here

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as error:  # the reader raises ValueError/IndexError on cut headers
        raise CheckpointError(
            f"{path} ({size:,} bytes) is a truncated or corrupt GGUF file: its header or tensor "
            f"table cannot be read ({type(error).__name__}: {error}). Download or copy it again."
        ) from error
    if end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {end:,} bytes but the file has {size:,}. "
            "Download or copy it again."
        )
    if not reader.tensors:
        raise CheckpointError(f"{path} is a GGUF file with no tensors (a vocabulary-only file?).")
    return path


def gguf_cache_key(sha256: str) -> str:
    """Cache key of a GGUF file's dequantized folder: its sha256 plus :data:`FORMAT_VERSION`."""
    return content_key("gguf", FORMAT_VERSION, sha256)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Switch transformers' progress bars on or off for the duration of a block.

    Its GGUF converter calls ``tqdm`` directly rather than through its logging
    switch, so that module's ``tqdm`` is swapped for a disabled one as well.
    """
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    if not enabled:
        hf_logging.disable_progress_bar()
        if original is not None:
            gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _fix_pretokenizer(tokenizer, pre_type: str | None) -> None:
    """Restore pre-tokenizers that transformers' GGUF converter does not know.

    llama.cpp's ``smollm`` pre-tokenizer splits digits one by one before the
    GPT-2 byte-level split (as SmolLM2's own ``tokenizer.json`` does); without
    this, numbers would tokenize differently from the original model.
    """
    if pre_type != "smollm":
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _read_pre_type(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else field.contents()


def _convert(path: Path, sha256: str, out: Path, progress: bool) -> None:
    """Dequantize ``path`` with transformers and save model + tokenizer into ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    started = time.perf_counter()
    with _transformers_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, NotImplementedError) as error:
            raise CheckpointError(
                f"transformers {transformers.__version__} could not read {path}: {error}. "
                "Its architecture or tokenizer may be unsupported by transformers' GGUF loader; "
                "convert it to a Hugging Face folder another way and pass that folder."
            ) from error
        # The weights are dense fp32 now, but the model still carries the GGUF quantizer
        # and save_pretrained refuses "quantized" models: drop both traces.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _fix_pretokenizer(tokenizer, _read_pre_type(path))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    atomic_write_json(
        out / SOURCE_FILE,
        {
            "source": str(path),
            "sha256": sha256,
            "format_version": FORMAT_VERSION,
            "transformers_version": transformers.__version__,
            "dequantize_seconds": round(time.perf_counter() - started, 2),
        },
    )


def dequantize_gguf(path: str | os.PathLike, *, progress: bool = True) -> Path:
    """Return a cached fp32 Hugging Face folder holding the model in the GGUF file ``path``.

    The first call dequantizes (seconds to tens of seconds); later calls with
    the same file content return the cached folder without rewriting it.
    Raises :class:`CheckpointError` for a missing, non-GGUF or truncated file.
    """
    path = _check_file(path)
    sha256 = file_digest(path)
    folder = entry("gguf", gguf_cache_key(sha256))
    if _is_complete(folder):  # same bytes as a file already converted: nothing to check again
        return folder
    check_gguf(path)
    if folder.exists():  # an incomplete folder: not written by atomic_dir, so not trusted
        raise CheckpointError(
            f"cache folder {folder} exists but is incomplete (missing one of {_REQUIRED}); "
            "delete it and call again."
        )
    with atomic_dir(folder) as tmp:
        _convert(path, sha256, tmp, progress)
    return folder


def gguf_source(folder: str | os.PathLike) -> dict:
    """The provenance record (source path, sha256, versions) saved beside a dequantized model."""
    return json.loads((Path(folder) / SOURCE_FILE).read_text())
