"""Circuits on top of the patching engine: path patching, mean-ablation faithfulness, CMAP tables.

All three follow "Fine-Tuning Enhances Existing Mechanisms" (Prakash et al.,
methods.md §3) and reuse :func:`interp.analysis.patching.run_variants`, so a
whole sweep shares batched forwards.

* :func:`path_patch` — direct path patching (Wang et al. 2022, as
  ``transformer_lens.patching.get_act_patch_direct_path`` defines it): a
  sender head's change of write, ``W_O·(z_source − z_target)``, is added only
  to the residual copy that the receiver heads read for their queries (or
  keys/values), before their norm; every other reader sees the target run.
  With no receivers the change goes straight to the logits (the final
  residual at the last position).
* :func:`faithfulness` — mean-ablate every head outside a circuit (each
  head's ``z`` replaced, at every position, by its mean over the task's
  prompts of the same length) and compare with the intact model.
* :func:`cmap` — the paper's cross-model table: accuracy of the base, of the
  fine-tune, and of the base with the fine-tune's head outputs (``hook_z``,
  pushed through the base's own ``W_O``) patched into each head group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from interp.analysis.patching import (
    METRICS,
    PatchResult,
    Site,
    _table,
    parse_sites,
    prepare,
    readout,
    recovered,
    run_variants,
    site_ops,
    stored,
)
from interp.analysis.patching_engine import LlamaRunner, Op
from interp.errors import InterpError, TaskError
from interp.results import Result
from interp.tasks import Task

Head = tuple[int, int]


def _check_heads(heads: Sequence, n_layers: int, n_heads: int, what: str) -> list[tuple]:
    out = []
    for spec in heads:
        spec = tuple(int(x) if x is not None else None for x in spec)
        if len(spec) not in (2, 3):
            raise InterpError(f"{what}: {spec} is not (layer, head) or (layer, head, pos)")
        layer, head = spec[:2]
        if not 0 <= layer < n_layers or not 0 <= head < n_heads:
            raise InterpError(f"{what}: head {spec[:2]} does not exist (model has {n_layers} layers "
                              f"× {n_heads} heads)")
        out.append(spec)
    return out


def _head_ops(heads: Sequence[tuple], length: int, width: int, n: int, value: str = "source") -> list[Op]:
    ops = []
    for spec in heads:
        layer, head = spec[:2]
        pos = spec[2] if len(spec) == 3 else None
        if pos is not None:
            if not -width <= pos < width:
                raise InterpError(f"head {spec}: position {pos} outside the {width}-token window")
            pos = torch.full((n,), length - width + pos % width)
        ops.append(Op("z", layer, head, pos, value))
    return ops


def _need_fast(runner) -> LlamaRunner:
    if not isinstance(runner, LlamaRunner):
        raise InterpError("path patching and mean ablation run on the batched engine (Llama-family "
                          "models); this model needs engine='reference', which does not support them")
    return runner


# ---------------------------------------------------------------------------
# path patching
# ---------------------------------------------------------------------------


class _Deltas(Mapping):
    """``(f"s{i}", "delta", layer) -> [n, T, d]``: sender i's change of write, computed on access."""

    def __init__(self, senders, runner: LlamaRunner, source_cache, target_cache):
        self.senders, self.runner = senders, runner
        self.source, self.target = source_cache, target_cache

    def __getitem__(self, key) -> Tensor:
        name, _, _ = key
        layer, head = self.senders[int(name[1:])]
        dh = self.runner.d_head
        diff = self.source[("z", layer)][:, :, head] - self.target[("z", layer)][:, :, head]
        w_o = self.runner.layers[layer].self_attn.o_proj.weight[:, head * dh:(head + 1) * dh]
        return diff @ w_o.T

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def path_patch(
    source,
    target=None,
    task: Task | None = None,
    *,
    senders: Sequence[Head] | None = None,
    receivers: Sequence[Head] | None = None,
    channel: str = "q",
    metric: str = "logit_diff",
    direction: str = "ft->base",
    tokenizer=None,
    source_prompts: str | None = None,
    target_prompts: str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_items: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Each sender head alone, patched along its direct path into ``receivers`` (or the logits).

    ``channel``: the receivers' input that gets the sender's change ("q", or
    "k"/"v" on models without grouped-query attention). Arguments as in
    :func:`interp.patch`; the result has one row per sender (``kind`` "path").
    Senders at or after every receiver's layer change nothing (rows equal the target).
    """
    if channel not in ("q", "k", "v"):
        raise InterpError(f"channel must be 'q', 'k' or 'v', not {channel!r}")
    run = prepare(source, target, task, tokenizer=tokenizer, target_tokenizer=None, direction=direction,
                  dtype=dtype, source_prompts=source_prompts, target_prompts=target_prompts,
                  engine="fast")
    runner = _need_fast(run["target"])
    n_layers, n_heads = runner.n_layers, runner.n_heads
    senders = [(l, h) for l in range(n_layers) for h in range(n_heads)] if senders is None else \
        [s[:2] for s in _check_heads(senders, n_layers, n_heads, "sender")]
    receivers = None if receivers is None else [r[:2] for r in _check_heads(receivers, n_layers, n_heads, "receiver")]
    capture = {("z", l) for l, _ in senders} | {("final", -1)}

    def variants(length: int, n: int) -> list[list[Op]]:
        if receivers is None:
            return [[] for _ in senders]
        return [[Op(f"{channel}_in", rl, rh, None, f"s{i}") for rl, rh in receivers if rl > sl]
                for i, (sl, _) in enumerate(senders)]

    direct: dict[str, Tensor] = {}

    def values(source_cache, target_cache, length, index):
        deltas = _Deltas(senders, runner, source_cache, target_cache)
        if receivers is None:  # straight to the logits: final residual at the last position + Δ
            final = target_cache[("final", -1)]
            for i in range(len(senders)):
                logits = runner.to_logits(final + deltas[(f"s{i}", "delta", 0)][:, -1])
                for m, v in readout(logits, run["answers"][index], _counter(run, index)).items():
                    direct.setdefault(m, torch.zeros(len(senders), len(run["task"]), dtype=torch.float64))
                    direct[m][i, torch.tensor(index)] = v
        return deltas

    metrics, baselines = run_variants(
        run["source"], runner, run["groups"], variants, answers=run["answers"], counter=run["counter"],
        n_items=len(run["task"]), n_variants=len(senders), values_fn=values, batch_items=batch_items,
        progress=progress, desc="path patching", extra_capture=sorted(capture))
    if receivers is None:
        metrics = direct
    sites = [_SenderSite(l, h) for l, h in senders]
    table = _table(sites, metrics, baselines, metric, run["tokens"])
    options = {"metric": metric, "channel": channel, "receivers": receivers, "task": run["task"].name,
               "source_prompts": run["prompts"][0], "target_prompts": run["prompts"][1],
               "dtype": str(dtype), "n_items": len(run["task"])}
    return PatchResult(table=table, options=options, per_item=stored(metrics, dtype),
                       baselines=stored(baselines, dtype), tokens=list(run["tokens"]),
                       source_label=run["labels"][0], target_label=run["labels"][1],
                       n_layers=n_layers, n_heads=n_heads)


@dataclasses.dataclass(frozen=True)
class _SenderSite:
    layer: int
    head: int
    kind: str = "path"
    pos: None = None

    @property
    def name(self) -> str:
        return f"L{self.layer} H{self.head} →"


def _counter(run, index):
    return None if run["counter"] is None else run["counter"][index]


# ---------------------------------------------------------------------------
# mean-ablation faithfulness
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Faithfulness(Result):
    """Rows: the intact model, each circuit (other heads mean-ablated), and no heads at all.

    ``faithfulness`` = circuit accuracy / model accuracy (the paper's measure);
    ``logit_diff_faithfulness`` = (circuit − none) / (model − none) of the logit difference.
    """

    summary_columns = ("circuit", "n_heads", "accuracy", "faithfulness", "logit_diff_faithfulness")


def _mean_z(runner: LlamaRunner, groups, batch_items: int) -> dict[int, dict[int, Tensor]]:
    """Mean head output ``[T, H, dh]`` per prompt length and layer, over the target prompts."""
    means: dict[int, dict[int, Tensor]] = {}
    capture = {("z", l) for l in range(runner.n_layers)}
    for group in groups:
        sums: dict[int, Tensor] = {}
        for start in range(0, len(group.index), batch_items):
            cache, _ = runner.forward(group.target_ids[start:start + batch_items], capture)
            for layer in range(runner.n_layers):
                total = cache[("z", layer)].double().sum(0)
                sums[layer] = total if layer not in sums else sums[layer] + total
        means[group.length] = {l: (t / len(group.index)).to(runner.dtype) for l, t in sums.items()}
    return means


def faithfulness(
    model,
    task: Task,
    circuits: Sequence[Head] | Mapping[str, Sequence[Head]],
    *,
    tokenizer=None,
    prompts: str = "clean",
    dtype: torch.dtype = torch.float32,
    batch_items: int = 64,
    progress: bool = True,
) -> Faithfulness:
    """Mean-ablate every head outside each circuit; how much of the model's accuracy remains?

    ``model`` is a model (with ``tokenizer=``) or a pair's side, e.g.
    ``pair.model("base")`` with ``tokenizer=pair.tokenizer``. ``circuits``: a list
    of ``(layer, head)`` or a dict name → list. Means are taken per position over
    the task's ``prompts`` of the same token length.
    """
    from interp.pairs import ModelPair

    if isinstance(model, ModelPair):
        raise InterpError("faithfulness takes one model: pass pair.model('base') (or 'finetuned') "
                          "with tokenizer=pair.tokenizer")
    circuits = dict(circuits) if isinstance(circuits, Mapping) else {"circuit": list(circuits)}
    run = prepare(model, None, task, tokenizer=tokenizer, target_tokenizer=None, direction="ft->base",
                  dtype=dtype, source_prompts=prompts, target_prompts=prompts, engine="fast")
    runner = _need_fast(run["target"])
    n_layers, n_heads = runner.n_layers, runner.n_heads
    everything = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    kept = {name: {s[:2] for s in _check_heads(heads, n_layers, n_heads, f"circuit {name!r}")}
            for name, heads in circuits.items()}
    names = list(kept) + ["no heads"]
    kept["no heads"] = set()
    means = _mean_z(runner, run["groups"], batch_items)

    def variants(length: int, n: int) -> list[list[Op]]:
        return [[Op("z", l, h, None, "mean") for l, h in everything if (l, h) not in kept[name]]
                for name in names]

    def values(source_cache, target_cache, length, index):
        n = len(index)
        return {("mean", "z", l): z.expand(n, *z.shape) for l, z in means[length].items()}

    metrics, baselines = run_variants(
        runner, runner, run["groups"], variants, answers=run["answers"], counter=run["counter"],
        n_items=len(run["task"]), n_variants=len(names), values_fn=values, batch_items=batch_items,
        progress=progress, desc="mean ablation")
    model_acc = float(baselines["target_accuracy"].mean())
    model_ld = float(baselines["target_logit_diff"].mean())
    none_ld = float(metrics["logit_diff"][-1].mean())
    rows = [{"circuit": "model", "n_heads": len(everything), "accuracy": model_acc, "logit_diff": model_ld,
             "prob": float(baselines["target_prob"].mean()), "faithfulness": 1.0,
             "logit_diff_faithfulness": 1.0}]
    for i, name in enumerate(names):
        acc = float(metrics["accuracy"][i].mean())
        ld = float(metrics["logit_diff"][i].mean())
        rows.append({"circuit": name, "n_heads": len(kept[name]), "accuracy": acc, "logit_diff": ld,
                     "prob": float(metrics["prob"][i].mean()),
                     "faithfulness": acc / model_acc if model_acc > 0 else float("nan"),
                     "logit_diff_faithfulness": recovered(ld, model_ld, none_ld)})
    options = {"circuits": {k: sorted(v) for k, v in kept.items() if k != "no heads"}, "prompts": prompts,
               "task": run["task"].name, "n_items": len(run["task"]), "dtype": str(dtype),
               "ablation": "mean over same-length prompts, per position"}
    return Faithfulness(table=pd.DataFrame(rows), options=options)


# ---------------------------------------------------------------------------
# CMAP
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CmapTable(Result):
    """The paper's CMAP table: base, fine-tune, and base + fine-tune's activations per group.

    Rows: ``target`` (unpatched), ``source`` (unpatched), then one per group
    and ``all groups``; ``n_sites`` counts the heads (or other sites) patched.
    ``recovered`` is of the chosen metric (accuracy by default, as in the paper).
    """

    summary_columns = ("model", "group", "n_sites", "accuracy", "logit_diff", "recovered")


def cmap(
    source,
    target=None,
    task: Task | None = None,
    *,
    groups: Mapping[str, Sequence[tuple]],
    metric: str = "accuracy",
    direction: str = "ft->base",
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    batch_items: int = 64,
    progress: bool = True,
) -> CmapTable:
    """Accuracy of target, of source, and of target with the source's ``hook_z`` patched into each group.

    ``groups``: name → heads, each ``(layer, head)`` (every position) or
    ``(layer, head, pos)`` (one window position, -1 = last token). Patched head
    outputs go through the target's own ``W_O``, as the paper recomputes the
    base's output projection. Beyond the paper, a group may also list
    :class:`~interp.analysis.patching.Site` objects (e.g. ``Site("mlp_out", 0)``).
    """
    if not groups:
        raise InterpError("cmap needs at least one group of heads")
    if metric not in METRICS:
        raise InterpError(f"metric must be one of {METRICS}, not {metric!r}")
    run = prepare(source, target, task, tokenizer=tokenizer, target_tokenizer=None, direction=direction,
                  dtype=dtype, source_prompts="clean", target_prompts="clean", engine="auto")
    if run["counter"] is None and metric == "logit_diff":
        raise TaskError("the logit difference needs counterfactual answers")
    n_layers, n_heads, width = run["target"].n_layers, run["target"].n_heads, run["width"]
    checked = {}
    for name, members in groups.items():
        sites = [m for m in members if isinstance(m, Site)]
        heads = _check_heads([m for m in members if not isinstance(m, Site)], n_layers, n_heads,
                             f"group {name!r}")
        checked[name] = heads + parse_sites(sites, n_layers, n_heads, width)
    if len(checked) > 1:
        union = list(dict.fromkeys(h for heads in checked.values() for h in heads))
        checked["all groups"] = union
    names = list(checked)

    def ops(members, length: int, n: int) -> list[Op]:
        heads = [m for m in members if not isinstance(m, Site)]
        sites = [op for m in members if isinstance(m, Site) for op in site_ops(m, length, width, n)]
        return _head_ops(heads, length, width, n) + sites

    def variants(length: int, n: int) -> list[list[Op]]:
        return [ops(checked[name], length, n) for name in names]

    metrics, baselines = run_variants(
        run["source"], run["target"], run["groups"], variants, answers=run["answers"], counter=run["counter"],
        n_items=len(run["task"]), n_variants=len(names), batch_items=batch_items, progress=progress,
        desc="CMAP")
    source_v = float(baselines[f"source_{metric}"].mean())
    target_v = float(baselines[f"target_{metric}"].mean())
    source_label, target_label = run["labels"]
    rows = []
    for side, label in (("target", target_label), ("source", source_label)):
        values = {m: float(baselines[f"{side}_{m}"].mean()) for m in METRICS}
        rows.append({"model": label, "group": "", "n_sites": 0, **values,
                     "recovered": 0.0 if side == "target" else 1.0})
    for i, name in enumerate(names):
        values = {m: float(metrics[m][i].mean()) for m in METRICS}
        rows.append({"model": f"{target_label} + {source_label}", "group": name,
                     "n_sites": len({m if isinstance(m, Site) else m[:2] for m in checked[name]}), **values,
                     "recovered": recovered(values[metric], source_v, target_v)})
    options = {"metric": metric, "direction": direction, "task": run["task"].name,
               "n_items": len(run["task"]),
               "groups": {k: [m.name if isinstance(m, Site) else list(m) for m in v] for k, v in checked.items()},
               "dtype": str(dtype)}
    return CmapTable(table=pd.DataFrame(rows), options=options)


def compare_maps(results: Mapping[str, PatchResult], reference: str, column: str = "recovered") -> pd.DataFrame:
    """Does each result's map look like ``reference``'s? Pearson r of ``column`` over shared sites.

    One row per other result, with r over component sites (attention and MLP
    outputs, heads; every position) and over the residual layer × position
    grid, and the reference's top component site's value in the other map.
    """
    ref = results[reference].table.set_index("site")
    components = ref[ref["pos"] < 0].index
    grid = ref[(ref["kind"] == "resid_pre") & (ref["pos"] >= 0)].index
    top = ref.loc[components, column].idxmax() if len(components) else None
    rows = []
    for label, result in results.items():
        if label == reference:
            continue
        other = result.table.set_index("site")
        row = {"pair": label, "reference": reference}
        for name, sites in (("components", components), ("resid_grid", grid)):
            shared = [s for s in sites if s in other.index]
            a = ref.loc[shared, column].to_numpy(dtype=float)
            b = other.loc[shared, column].to_numpy(dtype=float)
            ok = np.isfinite(a) & np.isfinite(b)
            row[f"r_{name}"] = float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")
        if top is not None and top in other.index:
            row["reference_top_site"] = top
            row["its_value_here"] = float(other.loc[top, column])
            row["reference_value"] = float(ref.loc[top, column])
        rows.append(row)
    return pd.DataFrame(rows)
