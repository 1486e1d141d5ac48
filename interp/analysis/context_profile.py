"""Diagnostics next to the knob: is the intent one-dimensional, and could any rank-1 edit steer?

``intent_subspace_profile``: DAS looks for one direction; the profile says how
many directions the two intents' difference needs at a site before swapping
them flips the answer. Where ``k = 1`` already flips most answers a rank-1 knob
exists; where it takes ``k ≫ 1`` the intent is carried by item-specific content
(e.g. the retrieved answer itself), not by one coordinate.

``steering_bound``: a direction and two values trained *directly* to steer
bare prompts — the most any rank-1 last-token knob could do at that layer.
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


def _setter(u: torch.Tensor, c: float):
    """The steering edit ``h ← (I − uuᵀ)h + c·u`` on rows of ``[batch, d_model]``."""
    return lambda h: h - (h @ u)[:, None] * u + c * u


@dataclasses.dataclass(frozen=True)
class SteeringBound(Result):
    """One row per layer: steered PairAcc of a rank-1 edit trained *directly* to steer bare prompts.

    ``directions[str(layer)]`` holds each layer's trained unit vector ``[d_model]``.
    """

    directions: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    summary_columns = ("layer", "pair_acc", "ctx_accuracy", "prior_accuracy", "c_ctx", "c_prior")


def steering_bound(model, bare: Task, layers: int | Sequence[int] | None = None, *,
                   eval_task: Task | None = None, tokenizer=None, side: str = "finetuned",
                   epochs: int = 4, batch_size: int = 16, lr: float = 3e-2, seed: int = 0,
                   progress: bool = True) -> SteeringBound:
    """How far could *any* rank-1 last-token edit steer this model without instructions?

    Trains ``u`` and two values ``c_ctx``, ``c_prior`` so that ``h ← (I − uuᵀ)h + c·u``
    at ``blocks.{layer}.hook_resid_pre`` (last token) makes the bare prompts of
    ``bare`` answer from the context (``c_ctx``) and from memory (``c_prior``):
    cross-entropy on both, Adam. Steered PairAcc is measured on ``eval_task``
    (default ``bare``; pass a held-out split). Not the paper's method — an upper
    reference for it: a knob found by DAS from instructed prompts cannot steer
    better than a direction trained for steering itself.
    """
    from tqdm.auto import tqdm

    from interp.analysis.context_hooks import d_model, n_layers
    from interp.analysis.context_task import prepare_bare

    model, tokenizer = resolve_model(model, tokenizer, side)
    layers = list(range(n_layers(model))) if layers is None else (
        [layers] if isinstance(layers, int) else list(layers))
    for layer in layers:
        check_layer(model, layer)
    train = prepare_bare(bare, tokenizer)
    test = train if eval_task is None else prepare_bare(eval_task, tokenizer)
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    rows, directions = [], {}
    try:
        for layer in tqdm(layers, desc="steering bound", disable=not progress):
            runner = _Targets(model, tokenizer, train.prompts, layer, fast=True)
            generator = torch.Generator().manual_seed(seed)
            weight = torch.nn.Parameter(torch.randn(d_model(model), generator=generator,
                                                    dtype=torch.float64).float())
            scale = float(runner.site.norm(dim=-1).mean())
            values = torch.nn.Parameter(torch.tensor([scale, -scale]))
            optimizer = torch.optim.Adam([weight, values], lr=lr)
            with torch.enable_grad():
                for _ in range(epochs):
                    order = torch.randperm(len(train), generator=generator)
                    for begin in range(0, len(train), batch_size):
                        index = order[begin:begin + batch_size]
                        u = weight / weight.norm()
                        loss = 0.0
                        for c, labels in ((values[0], train.ctx_ids), (values[1], train.prior_ids)):
                            logits = runner(index, lambda h, c=c, u=u: h - (h @ u)[:, None] * u
                                            + c * u)
                            loss = loss + torch.nn.functional.cross_entropy(logits, labels[index])
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
            u = (weight / weight.norm()).detach()
            c_ctx, c_prior = (float(v) for v in values.detach())
            evaluate = runner if test is train else _Targets(model, tokenizer, test.prompts,
                                                             layer, fast=True)
            with torch.no_grad():
                everything = torch.arange(len(test))
                ctx_ok = evaluate(everything, _setter(u, c_ctx)).argmax(-1) == test.ctx_ids
                prior_ok = evaluate(everything, _setter(u, c_prior)).argmax(-1) == test.prior_ids
            rows.append({"layer": layer, "pair_acc": float((ctx_ok & prior_ok).float().mean()),
                         "ctx_accuracy": float(ctx_ok.float().mean()),
                         "prior_accuracy": float(prior_ok.float().mean()),
                         "c_ctx": c_ctx, "c_prior": c_prior})
            directions[str(layer)] = u
    finally:
        for parameter, flag in zip(model.parameters(), grads):
            parameter.requires_grad_(flag)
    return SteeringBound(table=pd.DataFrame(rows), directions=directions,
                         options={"task": bare.name, "eval_task": (eval_task or bare).name,
                                  "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                  "seed": seed, "site": "blocks.{layer}.hook_resid_pre, last token"})
