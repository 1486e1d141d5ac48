"""`make figures` section: cross-model activation patching on the zoo's entity-tracking fine-tunes (§3).

For each tracking fine-tune (full FT, LoRA r=1/8/64, rsLoRA r=64) the
fine-tune's activations are patched into the base, one site at a time
(residual stream × position, attention and MLP outputs, every head), on
tracking prompts with a fixed number of boxes, so positions line up. It
answers the paper's question for the zoo: which components carry the
improvement, and does LoRA's improvement live where full FT's does
(correlation of the recovered-fraction maps, and a CMAP table: the base with
each fine-tune's head outputs patched into head groups chosen from full FT's
map, plus every MLP output as a group of its own). Results are cached under a content key (weights, task, options, code).
"""

from __future__ import annotations

import json
from typing import Any

from interp.cache import atomic_dir, content_key, entry
from interp.sections import source_digest

VERSION = 2
TASK = "tracking"
N_BOXES = 3
N_ITEMS = 96
VARIANTS = (("full", None), ("lora", 1), ("lora", 8), ("lora", 64), ("rslora", 64))
SITES = ("resid_pre", "attn_out", "mlp_out", "z")
TOP_HEADS = 3
_SOURCES = ("analysis/patching.py", "analysis/patching_engine.py", "analysis/circuits.py",
            "sections/patching.py")






def tracking_pairs() -> dict[str, Any]:
    """The zoo's tracking fine-tunes, label -> pair (built if missing)."""
    from interp import zoo

    return {pair.label: pair for pair in (zoo.pair(TASK, m, r) for m, r in VARIANTS)}


def tracking_task(n_items: int = N_ITEMS, n_boxes: int = N_BOXES):
    """Test tracking prompts with ``n_boxes`` boxes (one token length, so positions align)."""
    from interp import zoo

    task = zoo.task(TASK, "test", n=max(400, 8 * n_items))
    keep = [i for i, b in enumerate(task.extras["n_boxes"]) if b == n_boxes][:n_items]
    return task.subset(keep)


def head_groups(full_result, k: int = TOP_HEADS) -> dict[str, list]:
    """CMAP groups from full FT's map: its top-k heads, every head, every MLP (beyond the paper)."""
    from interp.analysis.patching import Site

    heads = full_result.table[full_result.table["kind"] == "z"]
    top = heads.sort_values("recovered", ascending=False).head(k)
    return {
        f"top {k} heads (full FT)": [(int(r.layer), int(r.head)) for r in top.itertuples()],
        "all heads": [(int(r.layer), int(r.head)) for r in heads.itertuples()],
        "all MLPs": [Site("mlp_out", layer) for layer in range(full_result.n_layers)],
    }


def compute(ctx, pairs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Patch results and CMAP tables per tracking fine-tune, cached by content.

    ``pairs`` (label -> pair, one of them full FT) replaces the zoo's tracking
    fine-tunes, e.g. to rerun the section on checkpoints of an older zoo build.
    """
    from interp.analysis.circuits import CmapTable, cmap, compare_maps
    from interp.analysis.patching import PatchResult, patch

    pairs = tracking_pairs() if pairs is None else dict(pairs)
    task = tracking_task()
    key = content_key("section.patching", VERSION, N_BOXES, N_ITEMS, SITES, TOP_HEADS, task.prompts,
                      [p.identity() for p in pairs.values()], source_digest(*_SOURCES))
    folder = entry("sections", f"patching-{key}")
    if not (folder / "done.json").exists():
        results = {label: patch(pair, task, sites=SITES, direction="ft->base", progress=ctx.progress)
                   for label, pair in pairs.items()}
        full = next(label for label, p in pairs.items() if p.method == "full")
        groups = head_groups(results[full])
        tables = {label: cmap(pair, task, groups=groups, progress=ctx.progress)
                  for label, pair in pairs.items()}
        with atomic_dir(folder) as tmp:
            for i, label in enumerate(pairs):
                results[label].save(tmp / f"patch{i}")
                tables[label].save(tmp / f"cmap{i}")
            (tmp / "done.json").write_text(json.dumps({"labels": list(pairs), "full": full}))
    meta = json.loads((folder / "done.json").read_text())
    labels, full = meta["labels"], meta["full"]
    results = {label: PatchResult.load(folder / f"patch{i}") for i, label in enumerate(labels)}
    tables = {label: CmapTable.load(folder / f"cmap{i}") for i, label in enumerate(labels)}
    return {"results": results, "cmap": tables, "full": full, "task": task,
            "similarity": compare_maps(results, full)}


def findings(data: dict[str, Any]) -> str:
    """Markdown with the measured numbers."""
    import pandas as pd

    results, full = data["results"], data["full"]
    rows = []
    for label, result in results.items():
        base = result.baseline()
        table = result.table
        comp = table[table["pos"] < 0].sort_values("recovered", ascending=False)
        resid_last = table[(table["kind"] == "resid_pre") & (table["pos"] == result.options["width"] - 1)]
        rows.append({"fine-tune": label, "base acc": base["target_accuracy"], "fine-tune acc":
                     base["source_accuracy"], "base logit diff": base["target_logit_diff"],
                     "fine-tune logit diff": base["source_logit_diff"],
                     "top component": comp["site"].iloc[0], "its recovered": comp["recovered"].iloc[0],
                     "best resid @last": resid_last.sort_values("recovered")["site"].iloc[-1]})
    accuracy = pd.DataFrame(rows)
    cmap_rows = []
    for label, table in data["cmap"].items():
        t = table.table
        row = {"fine-tune": label, "base": t["accuracy"].iloc[0], "fine-tune acc": t["accuracy"].iloc[1]}
        for r in t.iloc[2:].itertuples():
            row[r.group] = r.accuracy
        cmap_rows.append(row)
    task = data["task"]
    text = [
        "## Cross-model activation patching (methods.md §3)",
        (f"Entity tracking, {len(task)} test prompts with {N_BOXES} boxes "
        f"({results[full].options['width']} tokens); each fine-tune's activations patched into the "
        "base one site at a time; metric: logit difference (answer − the other box's object) at "
        "the last token; recovered = (patched − base) / (fine-tune − base)."),
        "",
        accuracy.to_markdown(index=False, floatfmt=".3f"),
        "",
        (f"Does each fine-tune's map look like {full}'s? (Pearson r of the recovered fraction over "
        "component sites — attention/MLP outputs and heads — and over the residual layer × position grid):"),
        "",
        data["similarity"].to_markdown(index=False, floatfmt=".3f"),
        "",
        ("CMAP (accuracy of the base with the fine-tune's activations patched into each group — head "
         "outputs through the base's W_O; groups from full FT's map; 'all MLPs' goes beyond the "
         "paper's head groups):"),
        "",
        pd.DataFrame(cmap_rows).to_markdown(index=False, floatfmt=".3f"),
    ]
    return "\n".join(text)


def section(ctx, pairs: dict[str, Any] | None = None) -> list:
    """Figures and findings for the gallery (``pairs``: see :func:`compute`)."""
    from interp.plots import patching as plots

    data = compute(ctx, pairs)
    results, full = data["results"], data["full"]
    made = [
        ("patching_full_ft", plots.patching_figure(results[full]), plots.patching_plotly(results[full]),
         f"Where {full}'s improvement lives",
         ("The full fine-tune's activations patched into the base one site at a time: residual stream "
         "× position (token labels of the first prompt), each head's output, and attention / MLP "
         "outputs per layer. Colour: fraction of the fine-tune − base logit-difference gap recovered.")),
        ("patching_heads", plots.compare_figure(results, "z"), plots.compare_plotly(results, "z"),
         "Heads that carry each fine-tune's improvement",
         "Recovered fraction per head (hook_z patched through the base's W_O), one panel per fine-tune."),
        ("patching_resid", plots.compare_figure(results, "resid_pre"),
         plots.compare_plotly(results, "resid_pre"), "Residual stream × position, per fine-tune",
         "Recovered fraction when one position of the residual stream entering a block is patched."),
        ("patching_components", plots.component_figure(results), plots.component_plotly(results),
         "Recovered fraction by component",
         "Attention output, MLP output and the best single head per layer, for every fine-tune."),
        ("patching_cmap", plots.cmap_figure(data["cmap"][full]), plots.cmap_plotly(data["cmap"][full]),
         "CMAP table (full FT → base)",
         ("Accuracy of the base, of the full fine-tune, and of the base with the fine-tune's "
          "activations patched into each group (heads chosen from its map; every MLP).")),
    ]
    figures = [ctx.save(*entry) for entry in made]
    ctx.findings.append(findings(data))
    return figures


__all__ = ["compute", "findings", "head_groups", "section", "tracking_pairs", "tracking_task"]
