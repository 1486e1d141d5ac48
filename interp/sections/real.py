"""`make real`: the analyses on SmolLM2-135M-Instruct and its real-capitals fine-tunes.

The LoRA r=1/8/64 and full fine-tunes of :mod:`interp.zoo.real` (built by
``python -m interp.zoo.real``) go through the weight-space analyses (weight
change, intruder dimensions), cross-model patching of attention and MLP
outputs on the real intent task, and the context knob: found by DAS in the
LoRA r=8 fine-tune at layer 20 and carried to the base and every other
fine-tune. Results are cached under a content key like every section; figures
and ``findings.md`` go to ``figures/real/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from interp.cache import atomic_dir, content_key, entry
from interp.sections import source_digest

VERSION = 2
COMMAND = "make real   # = python -m interp.zoo.real && python -m interp.cli figures --real"
OPTIONS = {"k": 10, "eps": 0.5, "n_fit": 160, "n_test": 80, "n_bare": 40, "n_calibration": 40,
           "n_patch": 24, "n_points": 9, "reach": 6.0, "layer": 20,
           "das": {"epochs": 3, "lr": 1e-2, "batch_size": 8}, "home": "lora-r8"}
# Layer 20 of 30 and a ±6 half-gap steering grid: a DAS sweep over layers 8/14/20/25 of the
# LoRA r=8 fine-tune found steering only at 20, and only beyond ±3 half-gaps of the intent means.
_SOURCES = ("sections/real.py", "analysis/intruders.py", "analysis/intruders_svd.py",
            "analysis/patching.py", "analysis/patching_engine.py", "analysis/context.py",
            "analysis/context_transfer.py", "analysis/weight_change.py", "zoo/real.py")


def real_pairs() -> dict[str, Any]:
    """``lora-r1``, ``lora-r8``, ``lora-r64``, ``full`` -> the SmolLM2 pair (built if missing)."""
    from interp.zoo import real

    pairs = {f"lora-r{rank}": real.real_pair("intent", "lora", rank) for rank in real.RANKS}
    pairs["full"] = real.real_pair("intent", "full", None)
    for label, pair in pairs.items():
        pair.label = f"real-{label}"
    return pairs


def compute(pairs: dict[str, Any], options: dict[str, Any] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run (or load from the cache) every analysis of the real case."""
    from interp.analysis.context import ContextKnob, context_knob
    from interp.analysis.context_transfer import KnobTransfer, knob_transfer
    from interp.analysis.intruders import IntruderReport, intruder_dimensions
    from interp.analysis.patching import PatchResult, patch
    from interp.analysis.weight_change import WeightChange, weight_change
    from interp.zoo import real

    options = {**OPTIONS, **(options or {})}
    key = content_key("real-section", VERSION, options, [p.identity() for p in pairs.values()],
                      source_digest(*_SOURCES))
    folder = entry("real_section", key)
    if (folder / "done.json").exists():
        meta = json.loads((folder / "done.json").read_text())
        return {"change": WeightChange.load(folder / "change"),
                "intruders": IntruderReport.load(folder / "intruders"),
                "knob": ContextKnob.load(folder / "knob"),
                "transfer": KnobTransfer.load(folder / "transfer"),
                "patching": {label: PatchResult.load(folder / f"patch-{label}")
                             for label in meta["patched"]}, **meta}

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    change = weight_change(list(pairs.values()), progress=progress)
    intruders = intruder_dimensions(list(pairs.values()), k=options["k"], eps=options["eps"],
                                    progress=progress)
    seconds["weights"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    first = next(iter(pairs.values()))
    tokenizer = first.tokenizer
    fit = real.real_intent_task(tokenizer, "train", n=options["n_fit"])
    test = real.real_intent_task(tokenizer, "test", n=options["n_test"])
    calibration = real.real_bare_task(tokenizer, "train", n=options["n_calibration"])
    bare = real.real_bare_task(tokenizer, "test", n=options["n_bare"])
    models = {"base": first.model("base"), **{p.label: p.model("finetuned") for p in pairs.values()}}
    home = pairs[options["home"]].label
    layer = options["layer"]
    knob = context_knob(models[home], fit, layer=layer, tokenizer=tokenizer, progress=progress,
                        **options["das"])
    transfer = knob_transfer(knob, models, test, bare, calibration=calibration, tokenizer=tokenizer,
                             n_points=options["n_points"], reach=options["reach"],
                             progress=progress)
    seconds["knob"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    patch_task = test.subset(range(options["n_patch"]))
    patched = {}
    for label in ("full", options["home"]):
        patched[pairs[label].label] = patch(pairs[label], patch_task, sites=["attn_out", "mlp_out"],
                                            direction="ft->base", progress=progress)
    seconds["patching"] = round(time.perf_counter() - clock, 1)

    meta = {"home": home, "layer": layer, "patched": list(patched), "options": options,
            "seconds": seconds}
    with atomic_dir(folder) as tmp:
        change.save(tmp / "change")
        intruders.save(tmp / "intruders")
        knob.save(tmp / "knob")
        transfer.save(tmp / "transfer")
        for label, result in patched.items():
            result.save(tmp / f"patch-{label}")
        (tmp / "done.json").write_text(json.dumps(meta, indent=2))
    return {"change": change, "intruders": intruders, "knob": knob, "transfer": transfer,
            "patching": patched, **meta}


def findings(results: dict[str, Any]) -> str:
    """Markdown: the measured numbers, with the command that made them."""
    from interp.zoo import real

    lines = [f"# Findings on SmolLM2-135M-Instruct (real capitals)\n\nMade by `{COMMAND}`.\n"]
    metas = real.build_real(progress=False)
    rows = ["| fine-tune | capital-intent accuracy | PairAcc | capital recall after | train s |",
            "|---|---|---|---|---|"]
    for meta in metas:
        name = "full" if meta["method"] == "full" else f"LoRA r={meta['lora_rank']}"
        rows.append(f"| {name} | {meta['accuracy_before']:.3f} → {meta['accuracy_after']:.3f} | "
                    f"{meta['scores_before']['real_intent_pair']:.3f} → "
                    f"{meta['scores_after']['real_intent_pair']:.3f} | "
                    f"{meta['scores_after']['real_capitals']:.3f} | {meta['train_seconds']:.0f} |")
    lines.append("## The fine-tunes\n\n" + "\n".join(rows))
    change = results["change"].summary()
    lines.append("## Weight change\n\n" + change.to_markdown(index=False, floatfmt=".4g"))
    intruders = results["intruders"]
    lines.append(f"## Intruder dimensions (k = {intruders.options.get('k')}, "
                 f"ε = {intruders.eps})\n\n" + intruders.summary().to_markdown(index=False, floatfmt=".3g")
                 + "\n\nAt other thresholds:\n\n"
                 + intruders.sweep([0.3, 0.5, 0.7, 0.9]).pivot(index="pair", columns="eps",
                                                                 values="n_intruders").to_markdown())
    transfer = results["transfer"]
    lines.append(f"## Context knob (DAS in {results['home']}, blocks.{results['layer']}"
                 ".hook_resid_pre, last token)\n\n"
                 + transfer.summary().to_markdown(index=False, floatfmt=".3f"))
    rows = []
    for label, result in results["patching"].items():
        table = result.table
        top = table.loc[table["recovered"].idxmax()]
        base = result.baseline()
        rows.append({"fine-tune": label, "base acc": base.get("target_accuracy"),
                     "fine-tune acc": base.get("source_accuracy"), "top component": top["site"],
                     "its recovered": top["recovered"]})
    import pandas as pd

    lines.append("## Cross-model patching (attention and MLP outputs, fine-tune → base)\n\n"
                 + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    lines.append(f"Compute: {results['seconds']} s.")
    return "\n\n".join(lines) + "\n"


def make_real_figures(out: str | Path = "figures/real", progress: bool = True) -> list:
    """Compute (or load) the real case and write its figures, gallery and findings to ``out``."""
    from interp.figures import Context, write_gallery
    from interp.plots import context as context_plots
    from interp.plots import intruders as intruder_plots
    from interp.plots import patching as patching_plots
    from interp.plots.style import write_if_changed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = real_pairs()
    results = compute(pairs, progress=progress)
    ctx = Context(out=out, pairs=pairs, progress=progress)
    report, transfer, patched = results["intruders"], results["transfer"], results["patching"]
    gallery = [
        ctx.save("real_intruders_eps", intruder_plots.intruder_eps_figure(report),
                 intruder_plots.intruder_eps_plotly(report), "SmolLM2: intruder count vs ε",
                 "Intruders among the top-10 left singular vectors of all 210 matrices, per fine-tune."),
        ctx.save("real_intruders_rank", intruder_plots.intruder_rank_figure(report),
                 intruder_plots.intruder_rank_plotly(report), "SmolLM2: intruders vs LoRA rank",
                 "Model-level count at ε = 0.5 against LoRA rank; full fine-tuning dashed."),
        ctx.save("real_context_steering", context_plots.steering_sweep_figure(transfer),
                 context_plots.steering_sweep_plotly(transfer), "SmolLM2: steering with the knob",
                 "Instruction-free prompts answered from context / memory as the knob coordinate is set."),
        ctx.save("real_context_separation", context_plots.separation_scatter_figure(transfer),
                 context_plots.separation_scatter_plotly(transfer), "SmolLM2: separation vs PairAcc",
                 "How well the LoRA r=8 knob separates the intents in each model, against PairAcc."),
        ctx.save("real_patching_components", patching_plots.component_figure(patched),
                 patching_plots.component_plotly(patched), "SmolLM2: where the improvement lives",
                 "Recovered fraction per layer's attention and MLP output, fine-tune → base."),
    ]
    write_gallery(out, gallery)
    write_if_changed(out / "findings.md", findings(results).encode())
    return gallery
