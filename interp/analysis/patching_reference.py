"""The straightforward way to patch: one hooked forward per variant on a TransformerLens bridge.

This is what ``transformer_lens.patching`` does (run the target with a hook
that overwrites one activation with the source's, read the logits, repeat),
written for the same :class:`~interp.analysis.patching_engine.Op` variants the
batched engine takes. It works for any architecture TransformerLens bridges,
so :func:`interp.patch` falls back to it (``engine="reference"``), and tests
and the benchmark use it as the ground truth the fast engine must equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from interp.analysis.patching_engine import INPUT_KINDS, Op

#: Bridge hook name of each replace kind (TransformerLens names).
HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "z": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


def hook_name(kind: str, layer: int) -> str:
    return HOOKS[kind].format(layer=layer)


class BridgeRunner:
    """Capture and patch through a ``TransformerBridge``'s hooks, one forward per variant."""

    def __init__(self, bridge):
        self.bridge = bridge.eval()
        self.n_layers = bridge.cfg.n_layers
        self.n_heads = bridge.cfg.n_heads

    @torch.no_grad()
    def forward(self, ids: Tensor, capture: set[tuple[str, int]] = frozenset()) -> tuple[dict, Tensor]:
        """Captured ``(kind, layer)`` activations (replace kinds only) and last-position logits."""
        names = {hook_name(kind, layer): (kind, layer) for kind, layer in capture if kind in HOOKS}
        logits, cache = self.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        out = {key: cache[name] for name, key in names.items()}
        return out, logits[:, -1].detach()

    @staticmethod
    def target_capture(variants, n_layers) -> set[tuple[str, int]]:
        return set()

    @staticmethod
    def to_logits(logits: Tensor) -> Tensor:
        return logits

    @torch.no_grad()
    def run_variants(
        self,
        variants: Sequence[Sequence[Op]],
        target: Mapping,
        values: Mapping[tuple[str, str, int], Tensor],
        length: int,
    ) -> Tensor:
        """Last-position logits ``[V, N, vocab]``; ``target`` must hold ``("ids", -1)``."""
        ids = target[("ids", -1)]
        outputs = []
        for variant in variants:
            hooks = []
            for op in variant:
                if op.kind in INPUT_KINDS:
                    raise NotImplementedError("the reference runner patches activations, not head inputs")
                source = values[(op.value, op.kind, op.layer)]
                hooks.append((hook_name(op.kind, op.layer), _setter(op, source)))
            logits = self.bridge.run_with_hooks(ids, fwd_hooks=hooks)
            outputs.append(logits[:, -1].detach())
        return torch.stack(outputs)


def _setter(op: Op, source: Tensor):
    """A hook that overwrites ``op``'s slice of the activation with ``source``'s."""
    def hook(activation: Tensor, hook=None) -> Tensor:
        activation = activation.clone()
        items = torch.arange(activation.shape[0])
        head = slice(None) if op.head is None else op.head
        if op.pos is None:
            activation[:, :, head] = source[:, :, head].to(activation.dtype)
        else:
            activation[items, op.pos, head] = source[items, op.pos, head].to(activation.dtype)
        return activation

    return hook
