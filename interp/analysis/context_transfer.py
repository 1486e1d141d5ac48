"""Steering with the knob, and the knob of one model applied to others (methods.md §4, across models).

``steering_sweep`` sets the knob coordinate to each of a grid of values ``c`` on
bare prompts (no instruction) and records how often the model answers from the
context or from memory; the best ``c`` per side calibrates steering for that
model. ``knob_transfer`` takes the knob found in one model (the paper: the
fine-tuned one) and, for every model given (base, each LoRA rank, rsLoRA, full
FT), measures instructed PairAcc, steered PairAcc without instructions, and how
well the projections separate the intents — then correlates separation with
performance across models, the paper's central claim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.context import ContextKnob, _Targets
from interp.analysis.context_task import BareData, pair_acc, prepare_bare, resolve_model
from interp.results import Result
from interp.tasks import Task

_CHUNK = 64
#: Below this instructed PairAcc the steered/instructed ratio is reported as NaN (meaningless).
MIN_INSTRUCTED = 0.1


def _steered_argmax(knob: ContextKnob, model, tokenizer, prompts: list[str],
                    values: list[float]) -> Tensor:
    """Argmax next token for every (value, prompt): ``[len(values), len(prompts)]``.

    Each chunk of prompts is encoded once; with a KV-cached prefix only the last
    token is re-run per value (the edit touches the last position only).
    """
    u = knob.u.to(next(model.parameters()).dtype)
    out = torch.empty(len(values), len(prompts), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(prompts), _CHUNK):
            chunk = prompts[start:start + _CHUNK]
            runner = _Targets(model, tokenizer, chunk, knob.layer, fast=True)
            index = torch.arange(len(chunk))
            for row, c in enumerate(values):
                def fn(h, c=c):
                    return h - (h @ u)[:, None] * u + c * u
                out[row, start:start + len(chunk)] = runner(index, fn).argmax(-1)
    return out


@dataclasses.dataclass(frozen=True)
class SteeringSweep(Result):
    """One row per steering value ``c``: fractions of bare prompts answered from context / prior."""

    c_ctx: float = float("nan")
    c_prior: float = float("nan")
    pair_acc: float = float("nan")  # steered PairAcc: min(ctx right at c_ctx, prior right at c_prior)
    ctx_accuracy: float = float("nan")
    prior_accuracy: float = float("nan")
    n_items: int = 0

    summary_columns = ("c", "frac_ctx", "frac_prior", "frac_other")


def default_grid(knob: ContextKnob, centre: float | None = None, half: float | None = None,
                 n_points: int = 13, reach: float = 3.0) -> list[float]:
    """``n_points`` values spanning ``reach`` half-gaps either side of the intent midpoint."""
    centre = (knob.c_ctx + knob.c_prior) / 2 if centre is None else centre
    half = abs(knob.c_ctx - knob.c_prior) / 2 if half is None else half
    return [float(centre + half * x) for x in np.linspace(-reach, reach, n_points)]


def _best(values: list[float], fractions: np.ndarray, centre: float) -> float:
    """The value with the highest fraction; ties go to the gentlest (closest to the centre)."""
    top = fractions.max()
    candidates = [v for v, f in zip(values, fractions) if f >= top - 1e-12]
    return min(candidates, key=lambda v: abs(v - centre))


def steering_sweep(
    knob: ContextKnob,
    model,
    bare: Task,
    *,
    tokenizer=None,
    side: str = "finetuned",
    values: list[float] | None = None,
    n_points: int = 13,
    reach: float = 3.0,
    intent: Task | None = None,
    eval_task: Task | None = None,
) -> SteeringSweep:
    """Sweep the knob coordinate over ``values`` on a bare task; pick the best ``c`` per side.

    The grid defaults to ±``reach`` half-gaps around the midpoint of the intent means —
    the model's own means when an instructed ``intent`` task is given (the gap
    never narrower than the knob's home gap), else the knob's. Steered PairAcc
    is measured at the chosen values on ``eval_task`` (default: ``bare`` itself;
    pass a held-out split to keep calibration and evaluation apart).
    """
    model, tokenizer = resolve_model(model, tokenizer, side)
    knob._check(model)
    data = prepare_bare(bare, tokenizer)
    centre, half = None, None
    if intent is not None:
        own = knob.calibrate(model, intent, tokenizer=tokenizer)
        centre = (own["c_ctx"] + own["c_prior"]) / 2
        half = max(abs(own["c_ctx"] - own["c_prior"]), abs(knob.c_ctx - knob.c_prior)) / 2
    values = values if values is not None else default_grid(knob, centre, half, n_points, reach)
    centre = float(np.mean(values)) if centre is None else centre
    preds = _steered_argmax(knob, model, tokenizer, data.prompts, values)
    frac_ctx = (preds == data.ctx_ids).float().mean(1).numpy()
    frac_prior = (preds == data.prior_ids).float().mean(1).numpy()
    table = pd.DataFrame({"c": values, "frac_ctx": frac_ctx, "frac_prior": frac_prior,
                          "frac_other": 1 - frac_ctx - frac_prior})
    c_ctx, c_prior = _best(values, frac_ctx, centre), _best(values, frac_prior, centre)
    scored = data if eval_task is None else prepare_bare(eval_task, tokenizer)
    pair = steered_pair_acc(knob, model, scored, c_ctx, c_prior, tokenizer=tokenizer)
    return SteeringSweep(table=table, options={"task": bare.name, "layer": knob.layer,
                                               "eval_task": (eval_task or bare).name},
                         c_ctx=c_ctx, c_prior=c_prior, **pair)


def steered_pair_acc(knob: ContextKnob, model, bare: Task | BareData, c_ctx: float,
                     c_prior: float, *, tokenizer=None) -> dict[str, Any]:
    """PairAcc without instructions: steer each bare prompt to ``c_ctx`` and to ``c_prior``."""
    model, tokenizer = resolve_model(model, tokenizer)
    data = bare if isinstance(bare, BareData) else prepare_bare(bare, tokenizer)
    preds = _steered_argmax(knob, model, tokenizer, data.prompts, [c_ctx, c_prior])
    ctx_ok, prior_ok = preds[0] == data.ctx_ids, preds[1] == data.prior_ids
    return {"pair_acc": float((ctx_ok & prior_ok).float().mean()),
            "ctx_accuracy": float(ctx_ok.float().mean()),
            "prior_accuracy": float(prior_ok.float().mean()), "n_items": len(data)}


# ---------------------------------------------------------------------------
# across models
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KnobTransfer(Result):
    """One row per model: instructed vs steered PairAcc and separation along one knob.

    ``projections``: one row per (model, prompt) with ``u·h`` by intent (violins);
    ``sweep``: one row per (model, c) from each model's steering sweep.
    """

    projections: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None

    summary_columns = ("model", "instructed_pair_acc", "steered_pair_acc",
                       "steered_over_instructed", "auc", "d_prime", "c_ctx", "c_prior")

    def correlations(self) -> pd.DataFrame:
        """Pearson and Spearman r across models between separation and PairAcc.

        Models with an infinite d′ (no spread within an intent) are left out of
        that row; ``n_models`` counts the models used. NaN where fewer than
        three remain or either side is constant.
        """
        rows = []
        for sep in ("auc", "d_prime"):
            for perf in ("instructed_pair_acc", "steered_pair_acc"):
                x, y = self.table[sep].astype(float), self.table[perf].astype(float)
                finite = np.isfinite(x) & np.isfinite(y)
                x, y = x[finite], y[finite]
                ok = len(x) > 2 and x.std() > 0 and y.std() > 0
                rows.append({"separation": sep, "performance": perf,
                             "pearson": float(x.corr(y)) if ok else float("nan"),
                             "spearman": float(x.corr(y, method="spearman")) if ok else float("nan"),
                             "n_models": len(x)})
        return pd.DataFrame(rows)


def _model_of(entry: Any, side: str):
    """An entry of ``models``: an HF model, a ModelPair (``side``), or ``(pair, side)``."""
    if isinstance(entry, tuple):
        return entry[0], entry[1]
    return entry, side


def knob_transfer(
    knob: ContextKnob,
    models: Mapping[str, Any],
    task: Task,
    bare: Task,
    *,
    calibration: Task | None = None,
    tokenizer=None,
    side: str = "finetuned",
    n_points: int = 13,
    reach: float = 3.0,
    batch_size: int = 64,
    progress: bool = True,
) -> KnobTransfer:
    """Apply one knob to every model in ``models`` (label -> model, pair or ``(pair, side)``).

    Per model: PairAcc with instructions on ``task``; steering values calibrated
    by a sweep on ``calibration`` (a bare task; default ``bare``) around that
    model's own intent means; PairAcc steered without instructions on ``bare``;
    AUC and d′ of ``u·h`` by intent on ``task``. ``steered_over_instructed`` is
    NaN where the instructed PairAcc is below :data:`MIN_INSTRUCTED`.
    """
    rows, projections, sweeps = [], [], []
    for label, entry in tqdm(models.items(), desc="knob across models", disable=not progress):
        source, which = _model_of(entry, side)
        model, tok = resolve_model(source, tokenizer, which)
        instructed = pair_acc(model, task, tokenizer=tok, batch_size=batch_size)
        separation = knob.separation(model, task, tokenizer=tok, batch_size=batch_size)
        sweep = steering_sweep(knob, model, calibration or bare, tokenizer=tok, intent=task,
                               n_points=n_points, reach=reach, eval_task=bare)
        rows.append({
            "model": label, "instructed_pair_acc": instructed.value,
            "steered_pair_acc": sweep.pair_acc,
            "steered_over_instructed": sweep.pair_acc / instructed.value
            if instructed.value >= MIN_INSTRUCTED else float("nan"),
            "steered_ctx_acc": sweep.ctx_accuracy, "steered_prior_acc": sweep.prior_accuracy,
            "auc": separation.auc, "d_prime": separation.d_prime,
            "c_ctx": sweep.c_ctx, "c_prior": sweep.c_prior,
            "mean_ctx": separation.mean_ctx, "mean_prior": separation.mean_prior,
            "n_items": instructed.n_items, "n_bare_items": sweep.n_items,
        })
        projections.append(separation.table.assign(model=label))
        sweeps.append(sweep.table.assign(model=label))
    options = {"task": task.name, "bare": bare.name,
               "calibration": (calibration or bare).name, "layer": knob.layer,
               "method": knob.method, "n_points": n_points}
    return KnobTransfer(table=pd.DataFrame(rows), options=options,
                        projections=pd.concat(projections, ignore_index=True),
                        sweep=pd.concat(sweeps, ignore_index=True))
