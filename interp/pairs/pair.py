"""ModelPair: a base checkpoint, its fine-tuned version, and how the one became the other."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import ArchitectureMismatchError, CheckpointError, TokenizerMismatchError
from interp.pairs.sources import (
    ADAPTER_CONFIG,
    Adapter,
    Checkpoint,
    LoraFactors,
    resolve_checkpoint,
)
from interp.pairs.weights import MatrixSpec, matrix_specs

SIDES = ("base", "finetuned")

# Config fields that must agree for two checkpoints to be one architecture.
_ARCH_FIELDS = (
    "model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size",
    "n_inner", "vocab_size",
)


class ModelPair:
    """A base model and one fine-tuned version of it.

    The fine-tuned side is either a full checkpoint or a LoRA adapter over the
    base. Weight matrices are read one at a time (:meth:`matrices`) so a scan
    never holds two models; full models are built only on request
    (:meth:`model`, :meth:`hooked`), always as fresh copies.
    """

    def __init__(
        self,
        base: Checkpoint,
        finetuned: Checkpoint | None = None,
        adapter: Adapter | None = None,
        *,
        label: str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if (finetuned is None) == (adapter is None):
            raise CheckpointError("a pair needs exactly one of a fine-tuned checkpoint or an adapter")
        self.base = base
        self.finetuned = finetuned
        self.adapter = adapter
        self.dtype = dtype
        meta = dict(adapter.metadata if adapter is not None else finetuned.metadata)
        self.provenance: dict[str, Any] = meta
        if adapter is not None:
            self.method: str = meta.get("method", "lora")
            self.lora_rank: int | None = adapter.rank
            self.lora_alpha: float | None = adapter.alpha
            self.rslora: bool = adapter.rslora
        else:
            self.method = meta.get("method", "full")
            self.lora_rank = meta.get("lora_rank")
            self.lora_alpha = meta.get("lora_alpha")
            self.rslora = bool(meta.get("rslora", False))
        self.task: str | None = meta.get("task")
        self.label: str = label or meta.get("label") or self._default_label()
        self._specs = matrix_specs(base.config)

    # ------------------------------------------------------------------ description
    def _default_label(self) -> str:
        if self.adapter is not None:
            kind = "rsLoRA" if self.rslora else "LoRA"
            return f"{kind} r={self.lora_rank}"
        return "full FT" if self.method == "full" else self.method

    def __repr__(self) -> str:
        ft = self.adapter.folder if self.adapter is not None else self.finetuned.description
        return f"ModelPair({self.label!r}, base={self.base.description}, finetuned={ft})"

    @property
    def config(self) -> dict[str, Any]:
        """The base model's Hugging Face config (both sides share the architecture)."""
        return self.base.config

    @property
    def n_layers(self) -> int:
        return 1 + max(spec.layer for spec in self._specs)

    # ------------------------------------------------------------------ weights
    def matrix_names(self, modules: Iterable[str] | None = None) -> list[str]:
        """Canonical names of the scanned matrices (``blocks.{l}.attn.q`` ...)."""
        return [spec.name for spec in matrix_specs(self.config, modules)]

    def _spec(self, name: str) -> MatrixSpec:
        for spec in self._specs:
            if spec.name == name:
                return spec
        raise KeyError(f"no matrix {name!r}; names look like {self._specs[0].name!r}")

    def base_matrix(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Base weight ``[d_out, d_in]`` in ``dtype`` (default: the pair's dtype)."""
        spec = self._spec(name)
        stored = self.base.tensor(spec.hf_name).to(dtype or self.dtype)
        return spec.rule.extract(stored).contiguous()

    def lora_factors(self, name: str) -> LoraFactors | None:
        """The LoRA factors behind ``name``'s update (None for full FT or untouched matrices).

        For a fused GPT-2 ``c_attn`` the factors update all of q, k and v together.
        """
        if self.adapter is None:
            return None
        return self.adapter.factors(self._spec(name).hf_name)

    def finetuned_matrix(self, name: str, dtype: torch.dtype | None = None,
                         base_weight: Tensor | None = None) -> Tensor:
        """Fine-tuned weight ``[d_out, d_in]``; for LoRA the merged ``W0 + s·B@A``.

        ``base_weight``: this pair's :meth:`base_matrix` ``name`` in ``dtype``, when
        the caller holds it already, so a LoRA merge adds to it instead of reading
        the base again (the same numbers either way).
        """
        dtype = dtype or self.dtype
        spec = self._spec(name)
        if self.adapter is None:
            return spec.rule.extract(self.finetuned.tensor(spec.hf_name).to(dtype)).contiguous()
        factors = self.adapter.factors(spec.hf_name)
        if base_weight is not None:
            if factors is None:
                return base_weight
            return (base_weight + spec.rule.extract(factors.stored_delta(dtype))).contiguous()
        stored = self.base.tensor(spec.hf_name).to(dtype)
        if factors is not None:
            stored = stored + factors.stored_delta(dtype)
        return spec.rule.extract(stored).contiguous()

    def delta(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """``W_ft − W_base`` for one canonical matrix, ``[d_out, d_in]``."""
        dtype = dtype or self.dtype
        spec = self._spec(name)
        if self.adapter is not None:
            factors = self.adapter.factors(spec.hf_name)
            if factors is None:
                return torch.zeros(spec.rule.extract(self.base.tensor(spec.hf_name)).shape, dtype=dtype)
            return spec.rule.extract(factors.stored_delta(dtype)).contiguous()
        return self.finetuned_matrix(name, dtype) - self.base_matrix(name, dtype)

    def matrices(
        self, modules: Iterable[str] | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, Tensor, Tensor]]:
        """Yield ``(name, W_base, W_ft)`` one matrix at a time, each ``[d_out, d_in]``.

        Only the current matrix pair is in memory: tensors are read lazily from
        memory-mapped safetensors, and LoRA updates are merged per matrix.
        """
        for spec in matrix_specs(self.config, modules):
            yield spec.name, self.base_matrix(spec.name, dtype), self.finetuned_matrix(spec.name, dtype)

    # ------------------------------------------------------------------ models
    def model(self, side: str = "finetuned", dtype: torch.dtype | None = None):
        """A fresh Hugging Face model for ``side`` in eval mode, LoRA merged."""
        _check_side(side)
        dtype = dtype or self.dtype
        if side == "base":
            return self.base.load_model(dtype)
        if self.adapter is None:
            return self.finetuned.load_model(dtype, base=self.base)
        model = self.base.load_model(dtype)
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for module in self.adapter.modules:
                factors = self.adapter.factors(f"{module}.weight")
                weight = parameters[f"{module}.weight"]
                weight += factors.stored_delta(torch.float32).to(weight.dtype)
        return model

    @cached_property
    def tokenizer(self):
        """The tokenizer both sides share; raises if the fine-tuned side ships a different one."""
        tokenizer = self.base.load_tokenizer()
        if self.finetuned is not None and self.finetuned.has_tokenizer:
            other = self.finetuned.load_tokenizer()
            check_same_tokenizer(tokenizer, other, "base", "fine-tuned")
        return tokenizer

    def hooked(self, side: str = "finetuned", *, compatibility_mode: bool = False):
        """A TransformerLens ``TransformerBridge`` over a fresh copy of ``side``."""
        from interp.pairs.hooked import bridge

        _check_side(side)
        return bridge(self.model(side), self.tokenizer, compatibility_mode=compatibility_mode)

    def identity(self) -> dict[str, Any]:
        """What determines this pair's weights, for content-keyed caches of results on it.

        Checkpoints in folders contribute the sha256 of their weight files; a
        bare state-dict file its digest; an in-memory model the digests of its
        scanned matrices. Two pairs with equal identities give equal analyses.
        """
        from interp.cache import content_key, file_digest, tensor_digest

        identity: dict[str, Any] = {"label": self.label}
        for side, checkpoint in (("base", self.base), ("finetuned", self.finetuned)):
            if checkpoint is None:
                continue
            if checkpoint.folder is not None:
                files = sorted(Path(checkpoint.folder).glob("*.safetensors")) or sorted(
                    Path(checkpoint.folder).glob("*.bin"))
                identity[side] = {f.name: file_digest(f) for f in files}
            elif checkpoint.state_file is not None:
                identity[side] = file_digest(checkpoint.state_file)
            else:
                read = self.base_matrix if side == "base" else self.finetuned_matrix
                identity[side] = content_key(*[tensor_digest(read(n)) for n in self.matrix_names()])
        if self.adapter is not None:
            files = sorted(Path(self.adapter.folder).glob("adapter_*"))
            identity["adapter"] = {f.name: file_digest(f) for f in files}
        return identity

    def with_finetuned(self, model: torch.nn.Module, label: str, **provenance: Any) -> ModelPair:
        """A new pair with the same base and ``model`` (in memory) as the fine-tuned side."""
        checkpoint = resolve_checkpoint(model, tokenizer=self.tokenizer, role="fine-tuned")
        checkpoint.metadata = {**self.provenance, **provenance, "label": label}
        return ModelPair(self.base, checkpoint, label=label, dtype=self.dtype)


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")


def check_same_tokenizer(a, b, name_a: str = "first", name_b: str = "second") -> None:
    """Raise :class:`TokenizerMismatchError` unless ``a`` and ``b`` map text to the same ids."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted(set(vocab_a) - set(vocab_b))[:5]
        only_b = sorted(set(vocab_b) - set(vocab_a))[:5]
        raise TokenizerMismatchError(
            f"the {name_a} and {name_b} tokenizers differ ({len(vocab_a)} vs {len(vocab_b)} "
            f"tokens; only in {name_a}: {only_a}, only in {name_b}: {only_b}); this analysis "
            "needs both models to read the same token ids"
        )


def check_same_architecture(base: Checkpoint, other: Checkpoint) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first config field or tensor that differs."""
    for key in _ARCH_FIELDS:
        if base.config.get(key) != other.config.get(key) and other.state_file is None:
            raise ArchitectureMismatchError(
                f"config field {key!r} differs: base has {base.config.get(key)!r}, fine-tuned has "
                f"{other.config.get(key)!r}; a pair needs one architecture"
            )
    base_keys = set(base.keys())
    for key in other.keys():
        if key not in base_keys:
            if other.state_file is not None:
                raise ArchitectureMismatchError(f"fine-tuned tensor {key!r} has no counterpart in the base")
            continue
        a, b = tuple(base.shape(key)), tuple(other.shape(key))
        if a != b:
            raise ArchitectureMismatchError(
                f"tensor {key!r} has shape {list(a)} in the base but {list(b)} in the fine-tuned model"
            )


def load_pair(
    base: Any,
    finetuned: Any = None,
    *,
    adapter: Any = None,
    label: str | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
) -> ModelPair:
    """Pair a base model with a fine-tuned version of it.

    ``base``: a Hugging Face folder, a hub id in the local cache, a ``.gguf``
    file, or an in-memory model. ``finetuned``: any of those, a bare
    ``.safetensors`` state dict, or a PEFT LoRA adapter folder (``adapter=``
    says the same explicitly). ``tokenizer`` is needed only for in-memory
    models. ``dtype`` is the dtype matrices and models are returned in.
    """
    if (finetuned is None) == (adapter is None):
        raise CheckpointError("pass the fine-tuned side as finetuned=... or adapter=... (one of them)")
    base_checkpoint = resolve_checkpoint(base, tokenizer=tokenizer, role="base")
    if adapter is None and isinstance(finetuned, (str, Path)) and (Path(finetuned) / ADAPTER_CONFIG).exists():
        adapter, finetuned = finetuned, None
    if adapter is not None:
        lora = adapter if isinstance(adapter, Adapter) else Adapter(adapter)
        lora.check_fits(base_checkpoint)
        return ModelPair(base_checkpoint, adapter=lora, label=label, dtype=dtype)
    if isinstance(finetuned, (str, Path)) and Path(finetuned).suffix == ".safetensors" and Path(
        finetuned
    ).is_file() and not (Path(finetuned).parent / "config.json").exists():
        ft_checkpoint = Checkpoint(
            config=base_checkpoint.config, description=f"fine-tuned {finetuned}",
            state_file=Path(finetuned),
        )
    else:
        ft_checkpoint = resolve_checkpoint(finetuned, tokenizer=tokenizer, role="fine-tuned")
    check_same_architecture(base_checkpoint, ft_checkpoint)
    if ft_checkpoint.has_tokenizer and base_checkpoint.has_tokenizer:
        pass  # compared lazily by ModelPair.tokenizer, only when a shared tokenizer is needed
    elif not base_checkpoint.has_tokenizer and ft_checkpoint.has_tokenizer:
        warnings.warn("the base has no tokenizer; using the fine-tuned model's", stacklevel=2)
        base_checkpoint.tokenizer_folder = ft_checkpoint.tokenizer_folder
        base_checkpoint.tokenizer_object = ft_checkpoint.tokenizer_object
    return ModelPair(base_checkpoint, ft_checkpoint, label=label, dtype=dtype)
