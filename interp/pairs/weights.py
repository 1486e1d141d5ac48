"""Canonical names for weight matrices, and lazy reading of checkpoint tensors.

Every analysis speaks of matrices as ``blocks.{layer}.attn.{q,k,v,o}`` and
``blocks.{layer}.mlp.{gate,up,down}``, always in ``[d_out, d_in]`` layout,
whatever the checkpoint calls them. An architecture is one entry in
:data:`ARCHITECTURES`: a list of :class:`MatrixRule` saying where each
canonical matrix lives in the Hugging Face state dict, whether it is stored
transposed (GPT-2's ``Conv1D``), and which rows of a fused tensor it takes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from interp.errors import CheckpointError, UnsupportedArchitectureError

#: Canonical module kinds, in scan order.
ATTN_MODULES = ("q", "k", "v", "o")
MLP_MODULES = ("gate", "up", "down")
ALL_MODULES = ATTN_MODULES + MLP_MODULES


@dataclass(frozen=True)
class MatrixRule:
    """Where one canonical matrix lives in a Hugging Face state dict.

    ``hf_template`` has ``{layer}`` in it. ``transposed`` means the stored
    tensor is ``[d_in, d_out]`` (``Conv1D``). ``split`` = (index, parts) takes
    the index-th of ``parts`` equal row blocks of the (un-transposed) tensor,
    for fused projections such as GPT-2's ``c_attn``.
    """

    module: str
    hf_template: str
    transposed: bool = False
    split: tuple[int, int] | None = None

    def hf_name(self, layer: int) -> str:
        return self.hf_template.format(layer=layer)

    def canonical(self, layer: int) -> str:
        group = "attn" if self.module in ATTN_MODULES else "mlp"
        return f"blocks.{layer}.{group}.{self.module}"

    def extract(self, stored: Tensor) -> Tensor:
        """Canonical ``[d_out, d_in]`` matrix from the stored tensor."""
        matrix = stored.T if self.transposed else stored
        if self.split is not None:
            index, parts = self.split
            block = matrix.shape[0] // parts
            matrix = matrix[index * block : (index + 1) * block]
        return matrix


def _llama_rules(prefix: str = "model.layers.{layer}") -> list[MatrixRule]:
    attn = [MatrixRule(m, f"{prefix}.self_attn.{m}_proj.weight") for m in ATTN_MODULES]
    mlp = [MatrixRule(m, f"{prefix}.mlp.{m}_proj.weight") for m in MLP_MODULES]
    return attn + mlp


def _gpt2_rules() -> list[MatrixRule]:
    h = "transformer.h.{layer}"
    qkv = [
        MatrixRule(m, f"{h}.attn.c_attn.weight", transposed=True, split=(i, 3))
        for i, m in enumerate(("q", "k", "v"))
    ]
    return qkv + [
        MatrixRule("o", f"{h}.attn.c_proj.weight", transposed=True),
        MatrixRule("up", f"{h}.mlp.c_fc.weight", transposed=True),
        MatrixRule("down", f"{h}.mlp.c_proj.weight", transposed=True),
    ]


#: model_type -> (number-of-layers config key, rules). Add an architecture here.
ARCHITECTURES: dict[str, tuple[str, Callable[[], list[MatrixRule]]]] = {
    "llama": ("num_hidden_layers", _llama_rules),
    "mistral": ("num_hidden_layers", _llama_rules),
    "qwen2": ("num_hidden_layers", _llama_rules),
    "qwen3": ("num_hidden_layers", _llama_rules),
    "gemma": ("num_hidden_layers", _llama_rules),
    "gemma2": ("num_hidden_layers", _llama_rules),
    "olmo": ("num_hidden_layers", _llama_rules),
    "gpt2": ("n_layer", _gpt2_rules),
}


@dataclass(frozen=True)
class MatrixSpec:
    """One canonical matrix of a concrete model: its name, layer and rule."""

    name: str
    layer: int
    rule: MatrixRule

    @property
    def module(self) -> str:
        return self.rule.module

    @property
    def hf_name(self) -> str:
        return self.rule.hf_name(self.layer)


def matrix_specs(config: dict, modules: Iterable[str] | None = None) -> list[MatrixSpec]:
    """Every canonical matrix of a model with this HF config, in layer then module order."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"no weight-name table for model_type {model_type!r}; known: "
            f"{sorted(ARCHITECTURES)}. Add an entry to interp.pairs.weights.ARCHITECTURES"
        )
    layers_key, rules_fn = ARCHITECTURES[model_type]
    wanted = _normalise_modules(modules)
    rules = [r for r in rules_fn() if r.module in wanted]
    return [
        MatrixSpec(rule.canonical(layer), layer, rule)
        for layer in range(int(config[layers_key]))
        for rule in rules
    ]


def _normalise_modules(modules: Iterable[str] | None) -> set[str]:
    if modules is None:
        return set(ALL_MODULES)
    if isinstance(modules, str):
        modules = [modules]
    wanted = set()
    for module in modules:
        module = module.split(".")[-1]
        if module in ("attn", "mlp"):
            wanted |= set(ATTN_MODULES if module == "attn" else MLP_MODULES)
        elif module in ALL_MODULES:
            wanted.add(module)
        else:
            raise ValueError(f"unknown module {module!r}; choose from {ALL_MODULES} or attn/mlp")
    return wanted


_LAYER_RE = re.compile(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)$")


def parse_canonical(name: str) -> tuple[int, str]:
    """``"blocks.3.attn.q"`` -> ``(3, "q")``."""
    match = _LAYER_RE.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a canonical matrix name like 'blocks.0.attn.q'")
    return int(match.group(1)), match.group(3)


class TensorReader:
    """Reads individual tensors of a Hugging Face checkpoint without loading it all.

    ``folder`` is a model folder or a single ``.safetensors`` file.

    Handles single and sharded ``.safetensors`` files (memory-mapped), and falls
    back to ``pytorch_model.bin`` (loaded once, as torch must). Every problem
    with the files surfaces as :class:`CheckpointError` naming the file.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        path = Path(folder)
        self.folder = path.parent if path.is_file() else path
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._bin: dict[str, Tensor] | None = None
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if path.is_file():
            files = [path]
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
        files = [f for f in files if not f.name.startswith("adapter_")]
        if files:
            for file in files:
                if not file.exists():
                    raise CheckpointError(f"{file} is listed in the shard index but missing")
                try:
                    handle = safe_open(str(file), framework="pt")
                except Exception as error:  # safetensors raises its own types
                    raise CheckpointError(
                        f"cannot read {file}: {error}. The file is truncated or not a "
                        "safetensors file; re-save or re-download it"
                    ) from error
                self._handles[file.name] = handle
                for key in handle.keys():
                    self._where[key] = file.name
        elif (self.folder / "pytorch_model.bin").exists():
            try:
                self._bin = torch.load(
                    self.folder / "pytorch_model.bin", map_location="cpu", weights_only=True
                )
            except Exception as error:
                raise CheckpointError(
                    f"cannot read {self.folder / 'pytorch_model.bin'}: {error}"
                ) from error
            self._where = {key: "pytorch_model.bin" for key in self._bin}
        else:
            raise CheckpointError(
                f"{self.folder} has no model.safetensors or pytorch_model.bin; "
                "is this a Hugging Face model folder?"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Tensor:
        """The stored tensor ``key`` (no dtype change)."""
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is not in {self.folder}")
        if self._bin is not None:
            return self._bin[key]
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as error:
            raise CheckpointError(
                f"cannot read tensor {key!r} from {self.folder / self._where[key]}: {error}. "
                "The file is probably truncated"
            ) from error

    def shape(self, key: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())
