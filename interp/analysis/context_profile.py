"""Is the intent one-dimensional at a site? Interchange top-k principal subspaces of the intent difference.

A diagnostic next to the knob: DAS looks for one direction; this profile says
how many directions the two intents' difference needs at the same site before
swapping them flips the answer. Where ``k = 1`` already flips most answers a
rank-1 knob exists; where it takes ``k ≫ 1`` the intent is carried by
item-specific content (e.g. the retrieved answer itself), not one coordinate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch

from interp.analysis.context import _Targets, correct_both_ways, das_examples
from interp.analysis.context_hooks import check_layer
from interp.analysis.context_task import prepare_intent, resolve_model
from interp.results import Result
from interp.tasks import Task


@dataclasses.dataclass(frozen=True)
class SubspaceProfile(Result):
    """One row per (layer, k): interchange accuracy of the top-k principal directions of h_ctx − h_prior."""

    summary_columns = ("layer", "k", "interchange_acc", "variance_explained")


def intent_subspace_profile(model, task: Task, layers: int | Sequence[int] | None = None,
                            ks: Sequence[int] = (1, 2, 4, 8, 16, 32), *, tokenizer=None,
                            side: str = "finetuned", n: int | None = None) -> SubspaceProfile:
    """Is the intent one-dimensional at ``blocks.{layer}.hook_resid_pre`` (last token)?

    For each layer (default: all) and ``k``, the interchange
    ``h ← h + (h_src − h)BBᵀ`` — B the top-k right singular vectors of the
    per-item differences h_ctx − h_prior — is applied with the opposite-intent
    source (same item); the table gives the fraction of answers flipped and the
    share of the differences' energy the k directions hold. Uses the items the
    model answers right under both intents (at most ``n``).
    """
    model, tokenizer = resolve_model(model, tokenizer, side)
    from interp.analysis.context_hooks import n_layers

    layers = list(range(n_layers(model))) if layers is None else (
        [layers] if isinstance(layers, int) else list(layers))
    for layer in layers:
        check_layer(model, layer)
    data = prepare_intent(task, tokenizer)
    correct = correct_both_ways(model, tokenizer, data)
    if bool(correct.any()):
        data = data.subset(torch.nonzero(correct).flatten().tolist())
    if n is not None:
        data = data.subset(range(min(n, len(data))))
    targets, source_index, labels = das_examples(data)
    n_items = len(data)
    rows = []
    for layer in layers:
        runner = _Targets(model, tokenizer, targets, layer, fast=True)
        h_source = runner.site[source_index]
        diff = (runner.site[:n_items] - runner.site[n_items:]).double()  # h_ctx − h_prior
        _, singular, vh = torch.linalg.svd(diff, full_matrices=False)
        energy = (singular ** 2).cumsum(0) / (singular ** 2).sum().clamp_min(1e-30)
        with torch.no_grad():
            for k in ks:
                k_eff = min(k, vh.shape[0])
                basis = vh[:k_eff].T.float()  # [d_model, k]
                hits = []
                for begin in range(0, len(targets), 64):
                    index = torch.arange(begin, min(begin + 64, len(targets)))
                    source = h_source[index]

                    def fn(h, source=source, basis=basis):
                        return h + ((source.to(h.dtype) - h) @ basis) @ basis.T

                    hits.append(runner(index, fn).argmax(-1) == labels[index])
                rows.append({"layer": layer, "k": k_eff,
                             "interchange_acc": float(torch.cat(hits).float().mean()),
                             "variance_explained": float(energy[k_eff - 1])})
    return SubspaceProfile(table=pd.DataFrame(rows),
                           options={"task": task.name, "layers": layers, "ks": list(ks),
                                    "n_items": len(data),
                                    "site": "blocks.{layer}.hook_resid_pre, last token"})
