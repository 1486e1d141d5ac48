"""Activation patching within one model and across a base/fine-tuned pair (methods.md §3).

``interp.patch(source, target, task, sites=...)`` copies activations of a
*source* run into a *target* run, one site at a time, and measures how far the
target's answer moves toward the source's. Within one model the source run
reads the clean prompts and the target the counterfactual ones (classic
activation patching); across models both read the same prompts and the source
is the other model (cross-model activation patching, CMAP, generalised from
the paper's circuit heads to every component).

Sites (grids named as in ``transformer_lens.patching``):

====================  =====================================  ==================
name                  what is copied                         one site per
====================  =====================================  ==================
``resid_pre``         residual stream entering block l        layer × position
``resid_pre_all_pos`` the same at every position              layer
``attn_out``          attention output (all positions)        layer
``attn_out_by_pos``   attention output at one position        layer × position
``mlp_out``           MLP output (all positions)              layer
``mlp_out_by_pos``    MLP output at one position              layer × position
``z``                 one head's output ``hook_z`` (before     layer × head
                      the target's ``W_O``, all positions)
``z_by_pos``          one head's output at one position       layer × head × pos
====================  =====================================  ==================

Positions: prompts of different token lengths are aligned at their ends (the
answer follows the last token), and position grids cover the last ``W``
positions, ``W`` the shortest prompt's length; ``pos`` is the index in that
window (absolute when all prompts have one length); pass ``positions=[-1]``
etc. to restrict a grid. No padding ever enters a forward: items are run in
groups of equal length.

Metrics at the last position: ``logit_diff`` = logit(answer) −
logit(counterfactual answer), ``prob`` = p(answer), ``accuracy`` = argmax is
the answer; ``recovered`` = (patched − target) / (source − target) of the
chosen metric's means (1: the site carries the whole difference, 0: nothing).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.patching_engine import (
    INPUT_KINDS,
    LlamaRunner,
    Op,
    plan_chunks,
    start_position,
    supports,
)
from interp.errors import ArchitectureMismatchError, InterpError, TaskError
from interp.pairs.pair import ModelPair, check_same_tokenizer
from interp.results import Result
from interp.tasks import Task, check_same_lengths, first_token_ids

GRIDS: dict[str, tuple[str, bool]] = {  # name -> (kind, one site per position?)
    "resid_pre": ("resid_pre", True),
    "resid_pre_all_pos": ("resid_pre", False),
    "attn_out": ("attn_out", False),
    "attn_out_by_pos": ("attn_out", True),
    "mlp_out": ("mlp_out", False),
    "mlp_out_by_pos": ("mlp_out", True),
    "z": ("z", False),
    "z_by_pos": ("z", True),
}
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")
METRICS = ("logit_diff", "prob", "accuracy")
DIRECTIONS = ("ft->base", "base->ft")
_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size", "n_embd", "n_layer", "n_head")


@dataclasses.dataclass(frozen=True)
class Site:
    """One patch site: ``kind`` in resid_pre/attn_out/mlp_out/z, a layer, a head (z), a window position.

    ``pos`` None means every position; an int indexes the end-aligned window
    (negative from the end: -1 is the last token).
    """

    kind: str
    layer: int
    head: int | None = None
    pos: int | None = None

    @property
    def name(self) -> str:
        text = f"L{self.layer} {self.kind}"
        if self.head is not None:
            text += f" H{self.head}"
        return text + ("" if self.pos is None else f" @{self.pos}")


@dataclasses.dataclass(frozen=True)
class PatchResult(Result):
    """One row per site: the three metrics after patching, ``effect`` and ``recovered`` of the chosen one.

    Columns: ``site``, ``kind``, ``layer``, ``head`` (-1: not a head site),
    ``pos`` (-1: every position), ``token`` (the first prompt's token there),
    ``logit_diff``, ``prob``, ``accuracy``, ``value`` (the chosen metric),
    ``effect`` (value − target's), ``recovered``. ``per_item`` holds each
    metric per site and item ``[n_sites, n_items]``; ``baselines`` the unpatched
    source and target per item ``[n_items]``.
    """

    per_item: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    baselines: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    tokens: list[str] = dataclasses.field(default_factory=list)
    source_label: str = "source"
    target_label: str = "target"
    n_layers: int = 0
    n_heads: int = 0

    summary_columns = ("site", "value", "recovered", "accuracy")

    @property
    def metric(self) -> str:
        return self.options.get("metric", "logit_diff")

    def baseline(self) -> dict[str, float]:
        """Mean metrics of the unpatched source and target runs."""
        return {k: float(v.float().mean()) for k, v in self.baselines.items()}

    def summary(self) -> pd.DataFrame:
        """The ten sites that recover most, under a line with the unpatched source and target."""
        base = self.baseline()
        rows = [{"site": f"source run ({self.source_label})", "value": base[f"source_{self.metric}"],
                 "recovered": 1.0, "accuracy": base["source_accuracy"]},
                {"site": f"target run ({self.target_label})", "value": base[f"target_{self.metric}"],
                 "recovered": 0.0, "accuracy": base["target_accuracy"]}]
        top = self.table.sort_values("recovered", ascending=False, key=abs).head(10)
        return pd.concat([pd.DataFrame(rows), top[list(self.summary_columns)]], ignore_index=True)

    def grid(self, kind: str, column: str = "recovered") -> pd.DataFrame:
        """``column`` as a layer × position (or layer × head) table for one site kind.

        ``kind`` is a grid name (``resid_pre``, ``z``, ``z_by_pos`` …) or a site kind.
        """
        site_kind, by_pos = GRIDS.get(kind, (kind, None))
        rows = self.table[self.table["kind"] == site_kind]
        if by_pos is True:
            rows = rows[rows["pos"] >= 0]
        elif by_pos is False:
            rows = rows[rows["pos"] < 0]
        if rows.empty:
            raise KeyError(f"no {kind!r} sites in this result; it has kinds {sorted(set(self.table['kind']))}")
        has_heads = bool((rows["head"] >= 0).all())
        if has_heads and (rows["pos"] >= 0).any():
            return rows.pivot_table(index=["layer", "head"], columns="pos", values=column)
        return rows.pivot(index="layer", columns="head" if has_heads else "pos", values=column)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def _config(model) -> dict[str, Any]:
    from interp.analysis.patching_engine import hf_model_of

    return hf_model_of(model).config.to_dict()


def check_same_shapes(source, target, names: tuple[str, str] = ("source", "target")) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first config field the models disagree on."""
    a, b = _config(source), _config(target)
    for key in _ARCH_FIELDS:
        if a.get(key) != b.get(key):
            raise ArchitectureMismatchError(
                f"config field {key!r} differs: the {names[0]} model has {a.get(key)!r}, the "
                f"{names[1]} model {b.get(key)!r}; patching copies activations between identically "
                "shaped models"
            )


def parse_sites(sites, n_layers: int, n_heads: int, width: int,
                positions: Sequence[int] | None = None) -> list[Site]:
    """Expand grid names and :class:`Site` objects into a list of sites, checking every index."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    window = list(range(width))
    if positions is not None:
        window = sorted({_window_index(p, width) for p in positions})
    out: list[Site] = []
    for spec in sites:
        if isinstance(spec, Site):
            out.append(_check_site(spec, n_layers, n_heads, width))
            continue
        if spec not in GRIDS:
            raise InterpError(f"unknown site {spec!r}; sites are {sorted(GRIDS)} or Site(...) objects")
        kind, by_pos = GRIDS[spec]
        for layer in range(n_layers):
            for head in (range(n_heads) if kind == "z" else [None]):
                for pos in (window if by_pos else [None]):
                    out.append(Site(kind, layer, head, pos))
    return out


def _window_index(pos: int, width: int) -> int:
    if not -width <= pos < width:
        raise InterpError(f"position {pos} is outside the {width}-token window the prompts share "
                          f"(valid: {-width} … {width - 1})")
    return pos % width


def _check_site(site: Site, n_layers: int, n_heads: int, width: int) -> Site:
    kinds = ("resid_pre", "attn_out", "mlp_out", "z")
    if site.kind not in kinds:
        raise InterpError(f"site kind {site.kind!r} does not exist; kinds are {kinds}")
    if not 0 <= site.layer < n_layers:
        raise InterpError(f"site {site.name}: layer {site.layer} does not exist (model has {n_layers})")
    if (site.kind == "z") != (site.head is not None):
        raise InterpError(f"site {site.name}: a head index goes with kind 'z' and only with it")
    if site.head is not None and not 0 <= site.head < n_heads:
        raise InterpError(f"site {site.name}: head {site.head} does not exist (model has {n_heads})")
    pos = None if site.pos is None else _window_index(site.pos, width)
    return dataclasses.replace(site, pos=pos)


def _resolve(source, target, task, tokenizer, target_tokenizer, direction, dtype):
    """(source model, target model, task, tokenizer, labels, within-model?)."""
    if isinstance(target, Task) and task is None:
        target, task = None, target
    if isinstance(source, ModelPair):
        pair = source
        if target is not None:
            raise InterpError("pass a pair alone (with direction=...), or two models, not both")
        if direction not in DIRECTIONS:
            raise InterpError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        sides = ("finetuned", "base") if direction == "ft->base" else ("base", "finetuned")
        tokenizer = pair.tokenizer
        labels = tuple(f"{pair.label}" if s == "finetuned" else "base" for s in sides)
        return pair.model(sides[0], dtype), pair.model(sides[1], dtype), task, tokenizer, labels, False
    if tokenizer is None:
        raise InterpError("patching models (not a pair) needs tokenizer=...")
    within = target is None
    if target_tokenizer is not None:
        check_same_tokenizer(tokenizer, target_tokenizer, "source", "target")
    if within or target is source:
        model = _as_dtype(source, dtype)
        return model, model, task, tokenizer, ("source", "target"), within
    check_same_shapes(source, target)
    return _as_dtype(source, dtype), _as_dtype(target, dtype), task, tokenizer, ("source", "target"), False


def _as_dtype(model, dtype):
    from interp.analysis.patching_engine import hf_model_of

    model = hf_model_of(model)
    if next(model.parameters()).dtype == dtype:
        return model.eval()
    return copy.deepcopy(model).to(dtype).eval()


def _prompts(task: Task, which: str) -> list[str]:
    if which == "clean":
        return list(task.prompts)
    if which == "counterfactual":
        if task.counterfactual_prompts is None:
            raise TaskError(f"task {task.name!r} has no counterfactual prompts, which within-model "
                            "patching needs as the target run")
        return list(task.counterfactual_prompts)
    raise InterpError(f"prompts must be 'clean' or 'counterfactual', not {which!r}")


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def readout(logits: Tensor, answers: Tensor, counter: Tensor | None) -> dict[str, Tensor]:
    """Metrics ``[r]`` from last-position logits ``[r, vocab]`` (float32 or float64)."""
    logits = logits.detach()
    right = logits.gather(-1, answers[:, None])[:, 0]
    diff = right - logits.gather(-1, counter[:, None])[:, 0] if counter is not None else right * np.nan
    prob = torch.softmax(logits.double(), -1).gather(-1, answers[:, None])[:, 0]
    return {"logit_diff": diff.double(), "prob": prob, "accuracy": (logits.argmax(-1) == answers).double()}


#: Rows unembedded per matrix product when scoring patched runs (``[rows, vocab]`` logits at a time).
UNEMBED_ROWS = 256
#: Packed tokens per batched forward. Small enough that a chunk's activations stay in the CPU's
#: cache (on SmolLM2, 2,048 ran 10–15% faster than 8,192), large enough to keep products busy.
BATCH_TOKENS = 1 << 11


def score_outputs(runner, outputs: Tensor, answers: Tensor, counter: Tensor | None,
                  metrics: Sequence[str] = METRICS) -> dict[str, Tensor]:
    """Metrics ``[V, n]`` of ``V`` patched runs of ``n`` items from the runner's outputs ``[V, n, ·]``.

    With only ``logit_diff`` asked for, just the answer and counterfactual
    logits are computed (:meth:`LlamaRunner.token_logits`: two rows of the
    unembedding instead of the whole vocabulary, the exact same numbers up to
    float rounding). Otherwise whole-vocabulary logits are formed for up to
    :data:`UNEMBED_ROWS` rows per product, so the unembedding runs as a few
    large matrix products rather than one thin one per site. Metrics not asked
    for are NaN.
    """
    n_variants, n = outputs.shape[:2]
    if set(metrics) == {"logit_diff"} and counter is not None and hasattr(runner, "token_logits"):
        tokens = torch.stack([answers, counter], dim=-1).repeat(n_variants, 1)  # [V·n, 2]
        picked = runner.token_logits(outputs.reshape(n_variants * n, -1), tokens).double()
        nan = torch.full((n_variants, n), math.nan, dtype=torch.float64)
        return {"logit_diff": (picked[:, 0] - picked[:, 1]).view(n_variants, n), "prob": nan,
                "accuracy": nan.clone()}
    step = max(1, UNEMBED_ROWS // max(n, 1))
    parts: dict[str, list[Tensor]] = {m: [] for m in METRICS}
    for first in range(0, n_variants, step):
        block = outputs[first:first + step]
        logits = runner.to_logits(block.reshape(-1, block.shape[-1]))
        rows = len(block)
        scores = readout(logits, answers.repeat(rows), None if counter is None else counter.repeat(rows))
        for m, v in scores.items():
            parts[m].append(v.view(rows, n))
    out = {m: torch.cat(v) for m, v in parts.items()}
    for m in set(METRICS) - set(metrics):
        out[m] = torch.full_like(out[m], math.nan)
    return out


@dataclasses.dataclass
class _Group:
    """Items of one token length: indices into the task, source and target ids ``[n, T]``."""

    index: list[int]
    source_ids: Tensor
    target_ids: Tensor

    @property
    def length(self) -> int:
        return self.target_ids.shape[1]


def _groups(tokenizer, source_prompts, target_prompts) -> list[_Group]:
    ids_s = [tokenizer(p)["input_ids"] for p in source_prompts]
    ids_t = [tokenizer(p)["input_ids"] for p in target_prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(ids_t):
        by_length.setdefault(len(ids), []).append(i)
    return [_Group(index, torch.tensor([ids_s[i] for i in index]), torch.tensor([ids_t[i] for i in index]))
            for _, index in sorted(by_length.items())]


def site_ops(site: Site, length: int, width: int, n_items: int) -> list[Op]:
    """The engine ops of ``site`` for a group of ``n_items`` prompts of ``length`` tokens."""
    pos = None if site.pos is None else torch.full((n_items,), length - width + site.pos)
    return [Op(site.kind, site.layer, site.head, pos)]


@torch.no_grad()
def run_variants(
    source_runner, target_runner, groups: list[_Group], variant_fn, *, answers: Tensor,
    counter: Tensor | None, n_items: int, n_variants: int, values_fn=None, batch_items: int = 64,
    batch_tokens: int = BATCH_TOKENS, progress: bool = True, desc: str = "patching",
    extra_capture: Sequence[tuple[str, int]] = (), score: Sequence[str] = METRICS,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run every variant on every item; returns per-variant metrics ``[V, n]`` and baselines ``[n]``.

    ``variant_fn(group_length, chunk_size) -> list of op lists`` builds the
    variants for a chunk of items (positions depend on the length).
    ``values_fn(source_cache, target_cache, length, index) -> values`` defaults
    to the source run's activations under the name ``"source"``. Empty
    variants (nothing to patch) get the target's metrics without a forward.
    ``score``: the metrics to compute for patched runs (:func:`score_outputs`).
    """
    metrics = {m: torch.zeros(n_variants, n_items, dtype=torch.float64) for m in METRICS}
    baselines = {f"{side}_{m}": torch.zeros(n_items, dtype=torch.float64)
                 for side in ("source", "target") for m in METRICS}
    work = []
    for group in groups:
        for start in range(0, len(group.index), batch_items):
            work.append((group, start))
    bar = tqdm(total=len(work) * n_variants, desc=desc, disable=not progress, unit="site×chunk")
    for group, start in work:
        index = group.index[start:start + batch_items]
        sel = torch.tensor(index)
        n = len(index)
        variants = variant_fn(group.length, n)
        needed = {(op.kind, op.layer) for v in variants for op in v} | set(extra_capture)
        source_cache, source_logits = source_runner.forward(group.source_ids[start:start + n], needed)
        live = [v for v in variants if v]
        capture = target_runner.target_capture(live, target_runner.n_layers) if live else set()
        target_cache, target_logits = target_runner.forward(group.target_ids[start:start + n],
                                                            capture | set(extra_capture))
        target_cache[("ids", -1)] = group.target_ids[start:start + n]
        for side, logits in (("source", source_logits), ("target", target_logits)):
            for m, v in readout(logits, answers[sel], None if counter is None else counter[sel]).items():
                baselines[f"{side}_{m}"][sel] = v
        if values_fn is None:
            values = {("source", kind, layer): t for (kind, layer), t in source_cache.items()}
        else:
            values = values_fn(source_cache, target_cache, group.length, index)
        live = []
        for i, variant in enumerate(variants):
            if variant and not _noop(variant, values, target_cache):
                live.append(i)
            else:  # nothing to patch, or it would write what is already there: the target's numbers
                for m in METRICS:
                    metrics[m][i, sel] = baselines[f"target_{m}"][sel]
        starts = [start_position(variants[i], values) for i in live]
        for chunk in plan_chunks(starts, n, group.length, batch_tokens):
            chunk = [live[i] for i in chunk]
            outputs = target_runner.run_variants([variants[i] for i in chunk], target_cache, values,
                                                 group.length)
            scores = score_outputs(target_runner, outputs, answers[sel],
                                   None if counter is None else counter[sel], score)
            for m, v in scores.items():
                metrics[m][torch.tensor(chunk)[:, None], sel] = v
            bar.update(len(chunk))
        bar.update(len(variants) - len(live))
    bar.close()
    return metrics, baselines


def _noop(variant, values, target_cache) -> bool:
    """True when every op of ``variant`` writes exactly what the target run already has there."""
    for op in variant:
        if op.kind in INPUT_KINDS:
            if values[(op.value, "delta", op.layer)].abs().max() != 0:
                return False
            continue
        current = target_cache.get((op.kind, op.layer))
        if current is None:
            return False
        new = values[(op.value, op.kind, op.layer)]
        head = slice(None) if op.head is None else op.head
        if op.pos is None:
            same = torch.equal(new[:, :, head], current[:, :, head])
        else:
            items = torch.arange(len(op.pos))
            same = torch.equal(new[items, op.pos, head], current[items, op.pos, head])
        if not same:
            return False
    return True


def make_runner(model, tokenizer, engine: str):
    """The fast :class:`LlamaRunner` where it applies (``engine='auto'``), else the bridge reference."""
    if engine not in ("auto", "fast", "reference"):
        raise InterpError(f"engine must be 'auto', 'fast' or 'reference', not {engine!r}")
    if engine == "fast" or (engine == "auto" and supports(model) is None):
        return LlamaRunner(model)
    from interp.analysis.patching_reference import BridgeRunner
    from interp.pairs.hooked import bridge

    return BridgeRunner(bridge(model, tokenizer))


def prepare(source, target, task, *, tokenizer, target_tokenizer, direction, dtype,
            source_prompts, target_prompts, engine):
    """Shared set-up of :func:`patch` and the circuit analyses: models, runners, groups, answers."""
    source_model, target_model, task, tokenizer, labels, within = _resolve(
        source, target, task, tokenizer, target_tokenizer, direction, dtype)
    if not isinstance(task, Task):
        raise TaskError("patching needs a Task (prompts, answers and, for within-model patching or "
                        "the logit difference, counterfactuals)")
    source_prompts = source_prompts or "clean"
    target_prompts = target_prompts or ("counterfactual" if within else "clean")
    s_prompts, t_prompts = _prompts(task, source_prompts), _prompts(task, target_prompts)
    if s_prompts != t_prompts:
        check_same_lengths(tokenizer, s_prompts, t_prompts)
    source_runner = make_runner(source_model, tokenizer, engine)
    target_runner = (source_runner if target_model is source_model
                     else make_runner(target_model, tokenizer, engine))
    groups = _groups(tokenizer, s_prompts, t_prompts)
    width = min(g.length for g in groups)
    first = groups[0].target_ids[0]
    tokens = tokenizer.convert_ids_to_tokens(first[len(first) - width:].tolist())
    answers = first_token_ids(tokenizer, task.answers)
    counter = None if task.counterfactual_answers is None else first_token_ids(tokenizer, task.counterfactual_answers)
    return {"source": source_runner, "target": target_runner, "groups": groups, "width": width, "tokens": tokens,
                "answers": answers, "counter": counter, "labels": labels, "task": task,
                "prompts": (source_prompts, target_prompts)}


def stored(values: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-item metrics as kept in a result: float64 for float64 runs, else float32."""
    keep = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(keep) for k, v in values.items()}


def recovered(patched: float, source: float, target: float) -> float:
    """(patched − target) / (source − target); NaN when source and target agree."""
    gap = source - target
    return (patched - target) / gap if abs(gap) > 1e-12 else float("nan")


def patch(
    source,
    target=None,
    task: Task | None = None,
    *,
    sites=DEFAULT_SITES,
    metric: str = "logit_diff",
    direction: str = "ft->base",
    positions: Sequence[int] | None = None,
    tokenizer=None,
    target_tokenizer=None,
    source_prompts: str | None = None,
    target_prompts: str | None = None,
    engine: str = "auto",
    dtype: torch.dtype = torch.float32,
    batch_items: int = 64,
    batch_tokens: int = BATCH_TOKENS,
    metrics: Sequence[str] = METRICS,
    progress: bool = True,
) -> PatchResult:
    """Patch each site of ``sites`` from the source run into the target run; one result row per site.

    ``source``/``target``: two models (with ``tokenizer=``), one model
    (within-model: clean prompts → counterfactual prompts), or a
    :class:`ModelPair` with ``direction`` ``"ft->base"`` (fine-tune's
    activations into the base) or ``"base->ft"``. ``metric``: logit_diff,
    prob or accuracy — the one ``recovered`` is computed from (all three are
    in the table). ``source_prompts``/``target_prompts`` ("clean" or
    "counterfactual") override which prompts each run reads. ``engine``:
    "fast" (batched, Llama family), "reference" (one bridge forward per site,
    any architecture), "auto". ``batch_tokens`` caps rows × recomputed
    positions per batched forward. ``metrics``: which metrics patched runs
    compute (all three by default; the others are NaN in the table):
    ``("logit_diff",)`` reads only the answer and counterfactual logits and
    skips the whole-vocabulary unembedding at every site.
    """
    if metric not in METRICS:
        raise InterpError(f"metric must be one of {METRICS}, not {metric!r}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise InterpError(f"metrics must be a non-empty subset of {METRICS}, not {metrics!r}")
    if metric not in metrics:
        raise InterpError(f"metric={metric!r} is the one 'recovered' is computed from, so it must be "
                          f"among metrics={metrics!r}")
    run = prepare(source, target, task, tokenizer=tokenizer, target_tokenizer=target_tokenizer,
                  direction=direction, dtype=dtype, source_prompts=source_prompts,
                  target_prompts=target_prompts, engine=engine)
    if metric == "logit_diff" and run["counter"] is None:
        raise TaskError(f"task {run['task'].name!r} has no counterfactual answers, which the logit "
                        "difference needs; pass metric='prob' or 'accuracy'")
    n_layers, n_heads = run["target"].n_layers, run["target"].n_heads
    site_list = parse_sites(sites, n_layers, n_heads, run["width"], positions)
    width = run["width"]

    def variants(length: int, n: int) -> list[list[Op]]:
        return [site_ops(site, length, width, n) for site in site_list]

    metrics, baselines = run_variants(
        run["source"], run["target"], run["groups"], variants, answers=run["answers"],
        counter=run["counter"], n_items=len(run["task"]), n_variants=len(site_list),
        batch_items=batch_items, batch_tokens=batch_tokens, progress=progress,
        desc=f"patch {run['labels'][0]}→{run['labels'][1]}", score=metrics)
    table = _table(site_list, metrics, baselines, metric, run["tokens"])
    options = {"metric": metric, "direction": direction if isinstance(source, ModelPair) else None,
               "sites": [s if isinstance(s, str) else s.name for s in ([sites] if isinstance(sites, (str, Site)) else sites)],
               "positions": None if positions is None else list(positions), "engine": engine,
               "dtype": str(dtype), "task": run["task"].name, "n_items": len(run["task"]),
               "source_prompts": run["prompts"][0], "target_prompts": run["prompts"][1],
               "width": width, "metrics": list(metrics)}
    return PatchResult(table=table, options=options, per_item=stored(metrics, dtype),
                       baselines=stored(baselines, dtype), tokens=list(run["tokens"]),
                       source_label=run["labels"][0], target_label=run["labels"][1],
                       n_layers=n_layers, n_heads=n_heads)


def _table(sites: list[Site], metrics, baselines, metric: str, tokens: list[str]) -> pd.DataFrame:
    means = {m: metrics[m].mean(1).numpy() for m in METRICS}
    source = float(baselines[f"source_{metric}"].mean())
    target = float(baselines[f"target_{metric}"].mean())
    rows = []
    for i, site in enumerate(sites):
        value = float(means[metric][i])
        rows.append({
            "site": site.name, "kind": site.kind, "layer": site.layer,
            "head": -1 if site.head is None else site.head, "pos": -1 if site.pos is None else site.pos,
            "token": "" if site.pos is None else tokens[site.pos],
            **{m: float(means[m][i]) for m in METRICS},
            "value": value, "effect": value - target, "recovered": recovered(value, source, target),
        })
    return pd.DataFrame(rows)

