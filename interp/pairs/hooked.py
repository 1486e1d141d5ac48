"""TransformerLens bridges over Hugging Face models, built the same way for both sides."""

from __future__ import annotations

import copy

import torch


def bridge(model: torch.nn.Module, tokenizer, *, compatibility_mode: bool = False):
    """A ``TransformerBridge`` over a deep copy of ``model`` (the bridge edits its module in place).

    Both sides of a pair must be processed identically, so ``compatibility_mode``
    (TransformerLens's folded-LayerNorm numerics) is off by default and applied
    the same way whenever it is asked for. With it off, logits equal the plain
    Hugging Face model's.
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "interp-model"
    hooked = TransformerBridge.boot_transformers(
        name, hf_model=copy.deepcopy(model), tokenizer=_with_name(tokenizer)
    )
    if compatibility_mode:
        hooked.enable_compatibility_mode()
    return hooked.eval()


def _with_name(tokenizer):
    """TransformerLens 4.3 needs ``name_or_path`` in a tokenizer's init kwargs; add it if absent."""
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if init_kwargs is not None and "name_or_path" not in init_kwargs:
        tokenizer = copy.copy(tokenizer)
        tokenizer.init_kwargs = {**init_kwargs, "name_or_path": tokenizer.name_or_path or "local"}
    return tokenizer
