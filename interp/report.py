"""`interp report`: every analysis that applies, on a researcher's own checkpoints, in one HTML page.

Weight-space analyses (weight change, intruder dimensions) always run. With a
task (a zoo task name or a JSON file written by ``Task.save``) the activation
analyses that fit it run too: task accuracy of every model; cross-model
patching when the task has counterfactual prompts; the context knob when it is
an intent task (extras ``intent``/``ctx_answer``/``prior_answer``/``item``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from interp.cache import atomic_write_text
from interp.errors import CheckpointError, TaskError
from interp.pairs import ModelPair, load_pair
from interp.tasks import Task, accuracy

INTENT_EXTRAS = ("intent", "ctx_answer", "prior_answer", "item")


@dataclass
class _Block:
    title: str
    stem: str | None
    table: pd.DataFrame | None
    caption: str = ""


def resolve_task(task: str | Path | Task | None) -> Task | None:
    """A Task from a Task, a JSON file written by ``Task.save``, or a zoo task name."""
    if task is None or isinstance(task, Task):
        return task
    path = Path(task)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise TaskError(f"task file {path} does not exist")
        try:
            return Task.load(path)
        except Exception as error:
            raise TaskError(f"{path} is not a task file written by Task.save: {error}") from error
    from interp import zoo

    if str(task) not in zoo.tasks():
        raise TaskError(f"unknown task {task!r}: not a file, and the zoo's tasks are {zoo.tasks()}")
    return zoo.task(str(task))


def _save(figure_mpl, figure_plotly, out: Path, stem: str) -> str:
    from interp.plots.style import save_matplotlib, save_plotly

    save_matplotlib(figure_mpl, out / stem)
    save_plotly(figure_plotly, out / stem)
    return stem


def _weight_space(pairs: list[ModelPair], out: Path, k: int, eps: float, progress: bool) -> list[_Block]:
    from interp.analysis.intruders import intruder_dimensions
    from interp.analysis.weight_change import weight_change
    from interp.plots import intruders as ip
    from interp.plots.weight_change import weight_change_figure, weight_change_plotly

    blocks = []
    change = weight_change(pairs, progress=progress)
    blocks.append(_Block("Weight change", _save(weight_change_figure(change), weight_change_plotly(change),
                                                out, "weight_change"),
                         change.summary(), "‖ΔW‖_F / ‖W₀‖_F per matrix"))
    report = intruder_dimensions(pairs, k=k, eps=eps, progress=progress)
    blocks.append(_Block(f"Intruder dimensions (k={k}, ε={eps})",
                         _save(ip.intruder_eps_figure(report), ip.intruder_eps_plotly(report), out,
                               "intruders_eps"), report.summary(),
                         "Top-k fine-tuned singular vectors with no base counterpart above ε"))
    _save(ip.intruder_layers_figure(report), ip.intruder_layers_plotly(report), out, "intruders_layers")
    blocks.append(_Block("Intruders per layer and module", "intruders_layers", None))
    return blocks


def _task_blocks(pairs: list[ModelPair], task: Task, out: Path, progress: bool) -> list[_Block]:
    tokenizer = pairs[0].tokenizer
    rows = [{"model": "base", "accuracy": accuracy(pairs[0].model("base"), tokenizer, task)}]
    rows += [{"model": p.label, "accuracy": accuracy(p.model("finetuned"), tokenizer, task)} for p in pairs]
    blocks = [_Block(f"Task accuracy on {task.name!r} ({len(task)} prompts)", None, pd.DataFrame(rows))]
    if task.counterfactual_prompts is not None:
        from interp.analysis.patching import patch
        from interp.plots.patching import component_figure, component_plotly

        results = {p.label: patch(p, task=task, direction="ft->base", progress=progress) for p in pairs}
        stem = _save(component_figure(results), component_plotly(results), out, "patching_components")
        summary = pd.concat([r.summary().assign(pair=label) for label, r in results.items()])
        blocks.append(_Block("Cross-model patching (fine-tuned → base)", stem, summary,
                             "Recovered fraction of the fine-tune's improvement per component"))
    if all(column in task.extras for column in INTENT_EXTRAS):
        from interp.analysis.context_task import pair_acc

        rows = [{"model": "base", **_pair_acc_row(pair_acc(pairs[0], task, side="base"))}]
        rows += [{"model": p.label, **_pair_acc_row(pair_acc(p, task))} for p in pairs]
        blocks.append(_Block("Context vs prior: PairAcc with instructions", None, pd.DataFrame(rows)))
    return blocks


def _pair_acc_row(result: Any) -> dict[str, float]:
    summary = result.summary()
    return summary.iloc[0].to_dict() if len(summary) else {}


def make_report(
    base: Any,
    finetuned: Sequence[Any],
    *,
    task: str | Path | Task | None = None,
    out: str | Path = "report",
    labels: Sequence[str] | None = None,
    k: int = 10,
    eps: float = 0.5,
    progress: bool = True,
) -> Path:
    """Run what applies on ``base`` paired with each of ``finetuned``; write ``out/index.html``."""
    if not finetuned:
        raise CheckpointError("a report needs at least one fine-tuned checkpoint or adapter")
    if labels is not None and len(labels) != len(finetuned):
        raise ValueError(f"{len(labels)} labels for {len(finetuned)} fine-tuned checkpoints")
    resolved_task = resolve_task(task)
    pairs = [load_pair(base, ft, label=None if labels is None else labels[i])
             for i, ft in enumerate(finetuned)]
    seen: dict[str, int] = {}
    for pair in pairs:  # two checkpoints of one kind get distinct labels
        seen[pair.label] = seen.get(pair.label, 0) + 1
        if seen[pair.label] > 1:
            pair.label = f"{pair.label} #{seen[pair.label]}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = _weight_space(pairs, out, k, eps, progress)
    if resolved_task is not None:
        blocks += _task_blocks(pairs, resolved_task, out, progress)
    provenance = pd.DataFrame([{"label": p.label, "method": p.method, "lora_rank": p.lora_rank,
                                "lora_alpha": p.lora_alpha, "rslora": p.rslora,
                                "finetuned": str(p.adapter.folder if p.adapter else p.finetuned.description)}
                               for p in pairs])
    blocks.insert(0, _Block("Pairs", None, provenance, f"base: {pairs[0].base.description}"))
    return _write_html(out, blocks)


def _write_html(out: Path, blocks: list[_Block]) -> Path:
    parts = []
    for block in blocks:
        parts.append(f"<section><h2>{html.escape(block.title)}</h2>")
        if block.caption:
            parts.append(f"<p>{html.escape(block.caption)}</p>")
        if block.stem:
            parts.append(f'<a href="{block.stem}.html"><img src="{block.stem}.png" '
                         f'alt="{html.escape(block.title)}"></a>')
        if block.table is not None:
            parts.append(block.table.to_html(index=False, float_format=lambda x: f"{x:.4g}"))
        parts.append("</section>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>interp report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "</style></head><body><h1>interp report</h1>" + "".join(parts) + "</body></html>")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
