"""Resolve what a researcher hands us into a :class:`Checkpoint` or an :class:`Adapter`.

Accepted forms: a local Hugging Face folder; a hub id found in the local cache
(never the network); a ``.gguf`` file (dequantized once, cached by content); a
bare ``.safetensors`` state dict in the base's architecture; an in-memory
``torch.nn.Module``; and a PEFT LoRA adapter folder.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import AdapterMismatchError, CheckpointError, NonFiniteWeightError
from interp.pairs.weights import TensorReader

ADAPTER_CONFIG = "adapter_config.json"
METADATA_FILE = "interp.json"


def check_finite(name: str, tensor: Tensor, where: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming ``name`` if it holds NaN or Inf."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return  # a finite sum means every entry is finite (one pass, no mask)
    if not bool(torch.isfinite(tensor).all()):  # the sum may also have overflowed
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteWeightError(
            f"{where}: tensor {name!r} has {bad} NaN/Inf value(s) of {tensor.numel()}; "
            "the checkpoint is corrupt or training diverged"
        )


@dataclass
class Checkpoint:
    """A full model's weights: a folder on disk (read lazily) or an in-memory module."""

    config: dict[str, Any]
    description: str
    folder: Path | None = None
    module: torch.nn.Module | None = None
    tokenizer_folder: Path | None = None
    tokenizer_object: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: A bare state-dict file whose architecture is the base's (folder is then None).
    state_file: Path | None = None

    @cached_property
    def _reader(self) -> TensorReader | dict[str, Tensor]:
        if self.module is not None:
            return dict(self.module.state_dict())
        return TensorReader(self.state_file or self.folder)

    def keys(self) -> list[str]:
        return list(self._reader.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        reader = self._reader
        if isinstance(reader, TensorReader):
            return reader.shape(key)
        return tuple(reader[key].shape)

    def tensor(self, key: str) -> Tensor:
        """The stored tensor ``key``, checked for NaN/Inf."""
        reader = self._reader
        if isinstance(reader, dict):
            if key not in reader:
                raise CheckpointError(f"tensor {key!r} is not in {self.description}")
            tensor = reader[key].detach()
        else:
            tensor = reader.get(key)
        check_finite(key, tensor, self.description)
        return tensor

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer_object is not None or self.tokenizer_folder is not None

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.tokenizer_object is not None:
            return self.tokenizer_object
        if self.tokenizer_folder is None:
            raise CheckpointError(f"{self.description} has no tokenizer; pass tokenizer=...")
        return AutoTokenizer.from_pretrained(str(self.tokenizer_folder))

    def load_model(self, dtype: torch.dtype = torch.float32, base: Checkpoint | None = None):
        """A fresh Hugging Face model in eval mode (never the user's own object)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.module is not None:
            model = copy.deepcopy(self.module).to(dtype)
        elif self.state_file is not None:
            if base is None:
                raise CheckpointError(f"{self.description} needs a base model's architecture")
            model = base.load_model(dtype)
            state = _read_state_file(self.state_file)
            model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        else:
            try:
                config = AutoConfig.from_pretrained(str(self.folder))
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.folder), config=config, dtype=dtype
                )
            except Exception as error:
                raise CheckpointError(f"cannot load {self.description}: {error}") from error
        for name, parameter in model.named_parameters():
            check_finite(name, parameter, self.description)
        return model.eval()


def _read_state_file(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {error} (truncated or not safetensors)") from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the file is damaged") from error


def _metadata(folder: Path) -> dict[str, Any]:
    file = folder / METADATA_FILE
    return _read_json(file) if file.exists() else {}


def checkpoint_from_folder(folder: Path, description: str | None = None) -> Checkpoint:
    """A checkpoint for a Hugging Face model folder (config.json + weights)."""
    config = _read_json(folder / "config.json")
    has_tokenizer = any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    return Checkpoint(
        config=config,
        description=description or f"checkpoint {folder}",
        folder=folder,
        tokenizer_folder=folder if has_tokenizer else None,
        metadata=_metadata(folder),
    )


def checkpoint_from_module(module: torch.nn.Module, tokenizer: Any, name: str) -> Checkpoint:
    """A checkpoint for an in-memory Hugging Face model (it is never modified)."""
    config = getattr(module, "config", None)
    if config is None:
        raise CheckpointError(
            f"{name}: an in-memory model must be a Hugging Face PreTrainedModel with a .config"
        )
    return Checkpoint(
        config=config.to_dict(), description=f"in-memory {name}", module=module,
        tokenizer_object=tokenizer,
    )


def resolve_hub_id(repo_id: str) -> Path:
    """Path of a hub model already in the local cache; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:
        raise CheckpointError(
            f"{repo_id!r} is neither a local path nor a model in the local Hugging Face cache "
            f"({error.__class__.__name__}). interp works offline: download it where there is a "
            "network (huggingface-cli download ...) or pass a folder"
        ) from error


def resolve_checkpoint(source: Any, *, tokenizer: Any = None, role: str = "model") -> Checkpoint:
    """Turn a folder, hub id, .gguf file or nn.Module into a :class:`Checkpoint`."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, torch.nn.Module):
        return checkpoint_from_module(source, tokenizer, role)
    if not isinstance(source, (str, Path)):
        raise CheckpointError(f"cannot use {type(source).__name__} as a {role}")
    path = Path(source).expanduser()
    if path.is_file():
        from interp.pairs.gguf import dequantize_gguf, is_gguf

        if path.suffix == ".gguf" or is_gguf(path):
            folder = dequantize_gguf(path)
            checkpoint = checkpoint_from_folder(folder, f"{role} {path.name} (dequantized)")
            return checkpoint
        if path.suffix == ".safetensors":
            if (path.parent / "config.json").exists():
                return checkpoint_from_folder(path.parent, f"{role} {path.parent}")
            raise CheckpointError(
                f"{path} is a bare state dict; pass it as the fine-tuned side of a pair so the "
                "base's architecture applies"
            )
        raise CheckpointError(f"{path} is a file of unknown kind; expected a folder or .gguf")
    if path.is_dir():
        if (path / ADAPTER_CONFIG).exists():
            raise CheckpointError(
                f"{path} is a PEFT adapter, not a full model; pass it as finetuned= or "
                "adapter= together with its base"
            )
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
        checkpoint = checkpoint_from_folder(path, f"{role} {path}")
        if tokenizer is not None:
            checkpoint.tokenizer_object = tokenizer
        return checkpoint
    text = str(source)
    if text.endswith((".gguf", ".safetensors", ".bin")) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{role} {text} does not exist")
    return checkpoint_from_folder(resolve_hub_id(text), f"{role} {text}")


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ``delta = scaling * B @ A`` in ``[d_out, d_in]`` layout."""

    A: Tensor  # [r, d_in]
    B: Tensor  # [d_out, r]
    scaling: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def stored_delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The update in the base tensor's stored layout (transposed for Conv1D)."""
        delta = self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
        return delta.T if self.fan_in_fan_out else delta


_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module-name suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter folder, read lazily; factors keyed by the HF weight they update."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = _read_json(self.folder / ADAPTER_CONFIG)
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{self.folder}: peft_type {peft_type} is not supported (LoRA only)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.folder}: DoRA adapters are not supported yet")
        if self.config.get("modules_to_save"):
            raise CheckpointError(
                f"{self.folder}: modules_to_save={self.config['modules_to_save']} is not supported; "
                "merge the adapter and pass the result as a full checkpoint"
            )
        self.metadata = _metadata(self.folder)
        self.rank: int = int(self.config["r"])
        self.alpha: float = float(self.config.get("lora_alpha", self.rank))
        self.rslora: bool = bool(self.config.get("use_rslora", False))
        self.target_modules = self.config.get("target_modules")
        self.base_name: str | None = self.config.get("base_model_name_or_path")
        self.fan_in_fan_out: bool = bool(self.config.get("fan_in_fan_out", False))
        self._tensors = self._read_tensors()
        self._modules = self._index_modules()

    def _read_tensors(self) -> dict[str, Tensor]:
        file = self.folder / "adapter_model.safetensors"
        if file.exists():
            return _read_state_file(file)
        file = self.folder / "adapter_model.bin"
        if file.exists():
            return torch.load(file, map_location="cpu", weights_only=True)
        raise CheckpointError(f"{self.folder} has no adapter_model.safetensors")

    def _index_modules(self) -> dict[str, dict[str, str]]:
        modules: dict[str, dict[str, str]] = {}
        for key, tensor in self._tensors.items():
            match = _LORA_KEY.match(key)
            if not match:
                raise CheckpointError(f"{self.folder}: unexpected adapter tensor {key!r}")
            check_finite(key, tensor, f"adapter {self.folder}")
            modules.setdefault(match.group(1), {})[match.group(2)] = key
        for module, parts in modules.items():
            if set(parts) != {"A", "B"}:
                raise CheckpointError(f"{self.folder}: module {module} lacks lora_A or lora_B")
        return modules

    @property
    def modules(self) -> list[str]:
        """HF module names this adapter updates (e.g. ``model.layers.0.self_attn.q_proj``)."""
        return sorted(self._modules)

    def scaling(self, module: str, rank: int) -> float:
        alpha = float(_pattern_value(self.config.get("alpha_pattern", {}), module, self.alpha))
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def factors(self, hf_weight: str) -> LoraFactors | None:
        """The LoRA factors updating HF weight ``hf_weight`` (``....q_proj.weight``), if any."""
        module = hf_weight.removesuffix(".weight")
        parts = self._modules.get(module)
        if parts is None:
            return None
        A, B = self._tensors[parts["A"]], self._tensors[parts["B"]]
        return LoraFactors(A, B, self.scaling(module, A.shape[0]), self.fan_in_fan_out)

    def check_fits(self, base: Checkpoint) -> None:
        """Raise :class:`AdapterMismatchError` unless every factor fits its base weight."""
        keys = set(base.keys())
        for module in self.modules:
            weight = f"{module}.weight"
            if weight not in keys:
                raise AdapterMismatchError(
                    f"adapter {self.folder} updates {weight!r}, which {base.description} lacks; "
                    "the adapter was trained for another architecture"
                )
            factors = self.factors(weight)
            assert factors is not None
            out_dim, in_dim = factors.B.shape[0], factors.A.shape[1]
            expected = (in_dim, out_dim) if self.fan_in_fan_out else (out_dim, in_dim)
            actual = base.shape(weight)
            if tuple(actual) != expected:
                raise AdapterMismatchError(
                    f"adapter {self.folder} on {weight!r}: B@A is {list(expected)} but the base "
                    f"weight is {list(actual)}; the adapter was trained for a different base"
                )
        if self.base_name and base.folder is not None:
            named = Path(self.base_name).expanduser()
            same = named.exists() and named.resolve() == base.folder.resolve()
            if not same and Path(self.base_name).name != base.folder.name:
                warnings.warn(
                    f"adapter {self.folder} says its base is {self.base_name!r} but it is being "
                    f"applied to {base.folder}; shapes fit, so continuing",
                    stacklevel=3,
                )
