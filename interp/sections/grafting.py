"""`make figures` section: skill localization by grafting on the zoo's fine-tunes (methods.md §2).

For every intent pair in ``ctx.pairs`` (LoRA r=1/8/64, rsLoRA r=64, full FT)
a mask is learned on the intent train split at each sparsity of the grid
(the full and LoRA r=8 pairs get the whole grid, the others its middle point),
and scored on the test split next to the base patch, a random mask, the
fine-tune and the base. Masks for the "tracking" fine-tunes of the same base
(full and LoRA r=8) give the task-overlap map. Everything is cached under a
content key (checkpoint file digests, options, this code), so a warm rerun
only redraws.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from interp.cache import atomic_dir, content_key, entry
from interp.sections import source_digest

VERSION = 1
OPTIONS = {"sparsities": (1e-4, 1e-3, 1e-2), "middle": 1e-3, "steps": 8, "n_prompts": 192,
           "n_test": 300, "seed": 0, "n_bins": 10, "rounded_steps": 12}
GRID_PAIRS = ("full", "lora-r8")  # label suffixes that get the whole sparsity grid
_SOURCES = ("analysis/grafting.py", "analysis/grafting_space.py", "analysis/grafting_mask.py",
            "analysis/grafting_eval.py", "sections/grafting.py")






def _tracking_pairs(pairs: dict[str, Any]) -> dict[str, Any]:
    """The zoo's tracking fine-tunes (full and LoRA r=8) of the same base."""
    from interp import zoo

    return {f"tracking-{m}" + (f"-r{r}" if r else ""): zoo.pair("tracking", m, r)
            for m, r in (("full", None), ("lora", 8))}


def compute(pairs: dict[str, Any], *, options: dict[str, Any] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Learn and evaluate the masks for ``pairs`` (intent) plus the tracking masks; cached."""
    from interp import zoo
    from interp.analysis.grafting import GraftMask, GraftSpace, skill_mask
    from interp.analysis.grafting_eval import GraftEvaluation, graft_evaluation, mask_overlap

    options = {**OPTIONS, **(options or {})}
    tracking = _tracking_pairs(pairs)
    identities = [p.identity() for p in [*pairs.values(), *tracking.values()]]
    key = content_key("grafting-section", VERSION, options, identities, source_digest(*_SOURCES))
    folder = entry("grafting_section", key)
    if (folder / "done.json").exists():
        masks = {name: GraftMask.load(folder / sub) for name, sub in
                 json.loads((folder / "done.json").read_text())["masks"].items()}
        return {"evaluation": GraftEvaluation.load(folder / "evaluation"), "masks": masks,
                "overlap": mask_overlap({k: masks[k] for k in _overlap_keys(masks)}),
                "cached": True}

    masks: dict[str, GraftMask] = {}
    evaluations = []
    jobs = [("intent", label, pair) for label, pair in pairs.items()]
    jobs += [("tracking", label, pair) for label, pair in tracking.items()]
    for task_name, label, pair in jobs:
        train = zoo.task(task_name, split="train", n=options["n_prompts"])
        full_grid = task_name == "intent" and label.endswith(GRID_PAIRS)
        grid = options["sparsities"] if full_grid else (options["middle"],)
        space = GraftSpace(pair)
        learned = [skill_mask(pair, train, sparsity=s, steps=options["steps"], seed=options["seed"],
                              n_prompts=options["n_prompts"], space=space, progress=progress)
                   for s in grid]
        for mask in learned:
            masks[f"{label}@{mask.options['sparsity']:g}"] = mask
        if task_name == "intent":
            test = zoo.task("intent", split="test", n=options["n_test"])
            evaluations.append(graft_evaluation(pair, test, learned, n_bins=options["n_bins"],
                                                seed=options["seed"], progress=progress))
        if task_name == "intent" and label.endswith("full"):
            # the repository's rounding (γ > 0.5): the size drifts; how many entries does it take?
            rounded = skill_mask(pair, train, sparsity=options["middle"], keep_size=False,
                                 steps=options["rounded_steps"], seed=options["seed"],
                                 n_prompts=options["n_prompts"], space=space, progress=progress)
            masks[f"{label} rounded@{options['middle']:g}"] = rounded
            result = graft_evaluation(pair, test, [rounded], n_bins=options["n_bins"],
                                      seed=options["seed"], progress=progress)
            result.table["pair"] = f"{label} (γ>0.5)"
            result.reliability["pair"] = f"{label} (γ>0.5)"
            evaluations.append(result)
        del space
    evaluation = GraftEvaluation.concat(evaluations)
    with atomic_dir(folder) as tmp:
        evaluation.save(tmp / "evaluation")
        names = {}
        for i, (name, mask) in enumerate(masks.items()):
            mask.save(tmp / f"mask{i}")
            names[name] = f"mask{i}"
        (tmp / "done.json").write_text(json.dumps({"masks": names, "options": options}, default=str))
    return {"evaluation": evaluation, "masks": masks,
            "overlap": mask_overlap({k: masks[k] for k in _overlap_keys(masks)}), "cached": False}


def _overlap_keys(masks: dict[str, Any]) -> list[str]:
    """Intent and tracking masks at the middle sparsity, full and LoRA r=8."""
    middle = f"@{OPTIONS['middle']:g}"
    wanted = [k for k in masks if k.endswith(middle) and ("-full@" in k or "-lora-r8@" in k)
              and "rounded" not in k]
    return sorted(wanted, key=lambda k: ("tracking" in k, "lora" in k))


def findings(result: dict[str, Any]) -> str:
    """Markdown block with the measured numbers."""
    table = result["evaluation"].table
    lines = ["## Skill localization by grafting (methods.md §2)", ""]
    masked = table[table["sparsity"].notna()]
    wide = masked.pivot_table(index=["pair", "sparsity"], columns="variant", values="accuracy",
                              sort=False).reset_index()
    refs = table[table["sparsity"].isna()].pivot_table(index="pair", columns="variant",
                                                      values="accuracy")
    wide["finetuned"] = wide["pair"].map(refs["finetuned"])
    wide["base"] = wide["pair"].map(refs["base"])
    graft = masked[masked["variant"] == "graft"].set_index(["pair", "sparsity"])
    wide["graft/FT"] = [graft.loc[(p, s), "retained"] for p, s in zip(wide["pair"], wide["sparsity"])]
    wide["gain recovered"] = [graft.loc[(p, s), "gain_recovered"]
                              for p, s in zip(wide["pair"], wide["sparsity"])]
    columns = ["pair", "sparsity", "graft", "base patch", "random", "finetuned", "base", "graft/FT",
               "gain recovered"]
    lines += [("Intent test accuracy (exact-k masks; graft/FT = accuracy kept; gain recovered = "
              "(graft − base)/(FT − base)):"), "",
              wide[columns].to_markdown(index=False, floatfmt=".3g"), ""]
    ece_rows = []
    for pair in dict.fromkeys(table["pair"]):
        ref = table[(table["pair"] == pair) & table["sparsity"].isna()].set_index("variant")["ece"]
        middle = masked[(masked["pair"] == pair) & (masked["sparsity"] == OPTIONS["middle"])]
        row = {"pair": pair, "ECE FT": ref.get("finetuned"), "ECE base": ref.get("base")}
        row.update({f"ECE {v} @1e-3": float(middle.loc[middle["variant"] == v, "ece"].iloc[0])
                    for v in ("graft", "base patch") if (middle["variant"] == v).any()})
        ece_rows.append(row)
    lines += [(f"Calibration (ECE, {result['evaluation'].options.get('n_bins')} equal-width bins of "
              "top-1 confidence):"), "", pd.DataFrame(ece_rows).to_markdown(index=False,
                                                                        floatfmt=".3f"), ""]
    location_rows = []
    for name, mask in result["masks"].items():
        if not name.endswith(f"@{OPTIONS['middle']:g}"):
            continue
        loc = mask.location()
        by_module = loc.groupby("module")["share"].sum().sort_values(ascending=False)
        by_layer = loc.groupby("layer")["share"].sum()
        top = ", ".join(f"{m} {v:.0%}" for m, v in by_module.head(3).items())
        location_rows.append({"mask": name, "k": mask.k, "top modules": top,
                              "per layer (0, 1, ...)": " / ".join(f"{v:.0%}" for v in by_layer)})
    lines += ["Where the masks at sparsity 1e-3 live (share of the mask):", "",
              pd.DataFrame(location_rows).to_markdown(index=False), ""]
    overlap = result["overlap"].summary()
    lines += ["Overlap of intent and tracking masks (chance = expected_intersection):", "",
              overlap.to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines)


def section(ctx) -> list:
    """Figures + findings for the gallery (see module docstring)."""
    from interp.plots.grafting import (
        graft_accuracy_figure,
        graft_accuracy_plotly,
        mask_location_figure,
        mask_location_plotly,
        mask_overlap_figure,
        mask_overlap_plotly,
        reliability_figure,
        reliability_plotly,
    )

    result = compute(ctx.pairs, progress=ctx.progress)
    evaluation, masks = result["evaluation"], result["masks"]
    exact = evaluation.select(list(ctx.pairs))  # without the rounded (size-drifting) run
    middle = {k: v for k, v in masks.items() if k.endswith(f"@{OPTIONS['middle']:g}")
              and k.startswith("intent") and "rounded" not in k}
    outputs = [
        ("grafting_accuracy", graft_accuracy_figure(evaluation), graft_accuracy_plotly(evaluation),
         "Graft accuracy vs sparsity",
         ("Intent test accuracy of the learned mask (exactly k entries) vs the top-|Δθ| base patch "
         "and a random mask of the same size; dashed: full fine-tune and base.")),
        ("grafting_location", mask_location_figure(middle), mask_location_plotly(middle),
         "Where the skill mask lives",
         "Share of each sparsity-1e-3 intent mask per layer and module (norms included)."),
        ("grafting_overlap", mask_overlap_figure(result["overlap"]),
         mask_overlap_plotly(result["overlap"]), "Overlap of intent and tracking masks",
         "Jaccard and |A∩B|/min(|A|,|B|) of the masks learned for the two tasks' fine-tunes."),
        ("grafting_reliability", reliability_figure(exact, OPTIONS["middle"]),
         reliability_plotly(exact, OPTIONS["middle"]), "Reliability of grafted models",
         "Accuracy vs top-1 confidence per bin at sparsity 1e-3; ECE in the legend."),
    ]
    figures = [ctx.save(*entry) for entry in outputs]
    ctx.findings.append(findings(result))
    return figures
