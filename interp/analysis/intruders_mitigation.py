"""Mitigating intruder dimensions by scaling them down, and what that costs (methods.md §1).

The paper's mitigation: for every intruder triplet ``(u_i, s_i, v_i)`` of the
merged fine-tuned matrix ``Wt = W0 + ΔW``, set ``W ← Wt + (λ − 1)·Σ s_i u_i v_iᵀ``
with ``λ < 1`` (PEFT's default λ = 0.75). :func:`scale_intruders` returns the
result as a :class:`ModelPair` (optionally saved as a checkpoint folder);
:func:`intruder_tradeoff` sweeps λ and measures held-out pretraining-text loss
against task accuracy — the paper's claim is that shrinking intruders moves the
model back toward the pretraining distribution at little task cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.intruders import _check_options, _scan_names, iter_scans
from interp.errors import TaskError
from interp.pairs import ModelPair
from interp.pairs.weights import MatrixRule, matrix_specs
from interp.results import Result
from interp.tasks import Task, accuracy, encode


@dataclass(frozen=True)
class IntruderDirections:
    """The intruder triplets of one pair: per matrix, ``Σ s_i u_i v_iᵀ`` over its intruders.

    ``updates[name]`` is that sum ``[d_out, d_in]`` (float32) in canonical
    layout; scaling intruders by λ adds ``(λ − 1)·updates[name]``.
    """

    updates: dict[str, Tensor]
    counts: dict[str, int]

    @property
    def n_intruders(self) -> int:
        return sum(self.counts.values())


def intruder_directions(
    pair: ModelPair,
    k: int = 10,
    eps: float = 0.5,
    modules: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    solver: str = "auto",
    cache: bool = True,
    progress: bool = True,
) -> IntruderDirections:
    """Find every intruder of ``pair`` and keep its rank-one piece ``s_i u_i v_iᵀ`` of the merged matrix."""
    _check_options(k, eps, dtype, solver)
    names = _scan_names([pair], modules, None)
    updates, counts = {}, {}
    for name, _, _, _, _, scan in iter_scans([pair], k, eps, names, dtype, solver=solver,
                                             cache=cache, progress=progress):
        index = scan.intruder_index(eps)
        counts[name] = int(index.numel())
        if index.numel():
            top = scan.top
            piece = (top.U[:, index] * top.S[index]) @ top.V[:, index].T  # [d_out, d_in]
            updates[name] = piece.float().contiguous()
    return IntruderDirections(updates, counts)


def _add_canonical(weight: Tensor, rule: MatrixRule, delta: Tensor) -> None:
    """Add a canonical ``[d_out, d_in]`` ``delta`` into a stored weight (transposed / fused rows)."""
    view = weight.T if rule.transposed else weight
    if rule.split is not None:
        index, parts = rule.split
        block = view.shape[0] // parts
        view = view[index * block : (index + 1) * block]
    view += delta.to(view.dtype)


def _apply(model: torch.nn.Module, config: dict, directions: IntruderDirections, factor: float,
           originals: dict[str, Tensor] | None = None) -> None:
    """``W ← W_orig + factor · Σ s u vᵀ`` for every matrix with intruders, in place.

    ``originals`` (HF parameter name -> fine-tuned weight) restores each touched
    weight first, so repeated calls do not accumulate rounding.
    """
    specs = {spec.name: spec for spec in matrix_specs(config)}
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        if originals is not None:
            for hf_name, weight in originals.items():
                parameters[hf_name].copy_(weight)
        for name, update in directions.updates.items():
            spec = specs[name]
            _add_canonical(parameters[spec.hf_name], spec.rule, factor * update)


def scale_intruders(
    pair: ModelPair,
    lam: float = 0.75,
    k: int = 10,
    eps: float = 0.5,
    modules: Iterable[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    directions: IntruderDirections | None = None,
    out: str | Path | None = None,
    label: str | None = None,
    solver: str = "auto",
    cache: bool = True,
    progress: bool = True,
) -> ModelPair:
    """A pair whose fine-tuned side has every intruder direction scaled by ``lam``.

    ``W ← Wt + (λ − 1)·Σ s_i u_i v_iᵀ`` over the intruders of each merged
    matrix (found with ``k``, ``eps``, ``modules`` as in
    :func:`intruder_dimensions`; pass ``directions`` to reuse a search). With
    ``out`` the model is saved there as a Hugging Face folder (tokenizer and an
    ``interp.json`` with the recipe included) and the returned pair reads it.
    """
    if not 0 <= lam:
        raise ValueError(f"lam scales singular values and must be ≥ 0, got {lam!r}")
    directions = directions or intruder_directions(pair, k, eps, modules, dtype, solver=solver,
                                                   cache=cache, progress=progress)
    model = pair.model("finetuned")
    _apply(model, pair.config, directions, lam - 1.0)
    label = label or f"{pair.label} (intruders ×{lam:g})"
    provenance = {"scaled_from": pair.label, "intruder_lambda": lam, "intruder_k": k,
                  "intruder_eps": eps, "intruders_scaled": directions.n_intruders}
    if out is None:
        return _with_model(pair, model, label, provenance)
    from interp.cache import atomic_write_json
    from interp.pairs import load_pair

    out = Path(out)
    model.save_pretrained(out)
    pair.tokenizer.save_pretrained(out)
    method = pair.method if pair.adapter is None else "lora-merged"
    atomic_write_json(out / "interp.json", {**pair.provenance, **provenance, "label": label,
                                            "method": method})
    return load_pair(pair.base, out, label=label, dtype=pair.dtype)


def _with_model(pair: ModelPair, model: torch.nn.Module, label: str, provenance: dict) -> ModelPair:
    """``pair.with_finetuned``, also for weight-only pairs whose base has no tokenizer."""
    if pair.base.has_tokenizer:
        return pair.with_finetuned(model, label, **provenance)
    from interp.pairs.sources import resolve_checkpoint

    checkpoint = resolve_checkpoint(model, tokenizer=None, role="fine-tuned")
    checkpoint.metadata = {**pair.provenance, **provenance, "label": label}
    return ModelPair(pair.base, checkpoint, label=label, dtype=pair.dtype)


# --------------------------------------------------------------------------- the λ trade-off


@torch.no_grad()
def text_loss(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per token) over ``texts``, right-padded, pads ignored."""
    if not texts:
        raise TaskError("text_loss needs at least one text")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        input_ids, mask = encode(tokenizer, texts[start : start + batch_size], padding_side="right")
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), reduction="sum",
                                                 ignore_index=-100)
        total += float(loss)
        count += int((targets != -100).sum())
    return total / max(count, 1)


@dataclass(frozen=True)
class IntruderTradeoff(Result):
    """Held-out pretraining loss and task accuracy as intruders are scaled by λ.

    ``table``: one row per λ with ``lam``, ``n_intruders_scaled``,
    ``pretrain_loss`` (nats/token on held-out pretraining text) and
    ``task_accuracy``. ``reference``: the same two numbers for the base model.
    λ = 1 is the fine-tuned model itself; λ = 0 removes the intruders.
    """

    reference: dict[str, float] = field(default_factory=dict)

    summary_columns = ("lam", "n_intruders_scaled", "pretrain_loss", "task_accuracy")


def intruder_tradeoff(
    pair: ModelPair,
    task: Task,
    texts: Sequence[str],
    lams: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    k: int = 10,
    eps: float = 0.5,
    modules: Iterable[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    directions: IntruderDirections | None = None,
    batch_size: int = 32,
    solver: str = "auto",
    cache: bool = True,
    progress: bool = True,
) -> IntruderTradeoff:
    """Sweep λ: scale ``pair``'s intruders, measure pretraining-text loss and ``task`` accuracy.

    The intruder search runs once; each λ rewrites the touched weights of one
    model from the fine-tuned originals, so a sweep costs one search plus one
    evaluation per λ. ``texts`` should be held-out text from
    the base's pretraining distribution (the zoo: ``World.pretraining_text``).
    """
    lams = [float(x) for x in lams]
    if not lams or min(lams) < 0:
        raise ValueError(f"lams must be a non-empty list of values ≥ 0, got {lams}")
    directions = directions or intruder_directions(pair, k, eps, modules, dtype, solver=solver,
                                                   cache=cache, progress=progress)
    tokenizer = pair.tokenizer
    base = pair.model("base")
    reference = {"base_pretrain_loss": text_loss(base, tokenizer, texts, batch_size),
                 "base_task_accuracy": accuracy(base, tokenizer, task, batch_size)}
    del base
    model = pair.model("finetuned")
    specs = {spec.name: spec.hf_name for spec in matrix_specs(pair.config)}
    parameters = dict(model.named_parameters())
    originals = {specs[name]: parameters[specs[name]].detach().clone()
                 for name in directions.updates}
    rows = []
    for lam in tqdm(lams, desc="λ sweep", disable=not progress):
        _apply(model, pair.config, directions, lam - 1.0, originals)
        rows.append({"lam": lam, "n_intruders_scaled": directions.n_intruders,
                     "pretrain_loss": text_loss(model, tokenizer, texts, batch_size),
                     "task_accuracy": accuracy(model, tokenizer, task, batch_size)})
    options = {"pair": pair.label, "task": task.name, "n_texts": len(texts), "n_task": len(task),
               "k": k, "eps": eps, "modules": None if modules is None else list(modules),
               "dtype": str(dtype)}
    return IntruderTradeoff(table=pd.DataFrame(rows), options=options, reference=reference)


__all__ = ["IntruderDirections", "IntruderTradeoff", "intruder_directions", "intruder_tradeoff",
           "scale_intruders", "text_loss"]
