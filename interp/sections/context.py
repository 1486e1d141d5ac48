"""Gallery section: the context-sensitivity knob on the zoo's intent fine-tunes (methods.md §4).

The knob is found in the fine-tune that solves the instructed task best (full
FT on ties), by DAS at the layer the layer search suggests and at every layer
below it, keeping the layer whose knob flips the most answers; it is then applied to the base and to every
variant (LoRA r=1/8/64, rsLoRA r=64, full FT): PairAcc with instructions, PairAcc
steered along the knob without instructions (steering values calibrated per
model on the train split's bare prompts, measured on the test split), and how
well the knob coordinate separates the intents. Results are cached under a
content key of the pairs, the options and this analysis's source.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd

from interp.cache import atomic_dir, content_key, entry
from interp.sections import source_digest

VERSION = 2
OPTIONS = {"n_fit": 300, "n_test": 320, "n_calibration": 150, "n_points": 11,
           "search_items": 64, "n_profile": 120, "das": None}
#: Smaller sizes for the notebook (same analysis, fewer items; its own cache entry).
QUICK = {"n_fit": 150, "n_test": 160, "n_calibration": 80, "n_points": 9, "search_items": 32,
         "n_profile": 60}
_SOURCES = ("analysis/context.py", "analysis/context_task.py", "analysis/context_hooks.py",
            "analysis/context_transfer.py", "analysis/context_profile.py",
            "analysis/layer_search.py", "sections/context.py")






def compute(pairs: dict[str, Any], *, options: dict[str, Any] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run (or load from the cache) the layer search, knobs and transfer table for ``pairs``."""
    from interp import zoo
    from interp.analysis.context import ZOO_DAS, ContextKnob, context_knob
    from interp.analysis.context_profile import (
        SteeringBound,
        SubspaceProfile,
        intent_subspace_profile,
        steering_bound,
    )
    from interp.analysis.context_task import pair_acc
    from interp.analysis.context_transfer import KnobTransfer, knob_transfer, steering_sweep
    from interp.analysis.layer_search import PAIRINGS, LayerSearch, layer_search

    options = {**OPTIONS, **(options or {})}
    das = {**ZOO_DAS, **(options["das"] or {})}
    identities = [p.identity() for p in pairs.values()]
    folder = None
    if all(identities):
        key = content_key("context-section", VERSION, options, das, identities, source_digest(*_SOURCES))
        folder = entry("context_section", key)
        if (folder / "done.json").exists():
            return {"search": LayerSearch.load(folder / "search"),
                    "knob": ContextKnob.load(folder / "knob"),
                    "transfer": KnobTransfer.load(folder / "transfer"),
                    "profile": SubspaceProfile.load(folder / "profile"),
                    "bound": SteeringBound.load(folder / "bound"),
                    "methods": pd.read_json(folder / "methods.json"),
                    "layer_sweep": pd.read_json(folder / "layer_sweep.json"),
                    **json.loads((folder / "done.json").read_text())}

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    fit = zoo.task("intent", split="train", n=2 * options["n_fit"])
    test = zoo.task("intent", split="test", n=options["n_test"])
    # intent counts prompts (two per item), intent_bare counts items: the same first items
    bare_test = zoo.task("intent_bare", split="test",
                         n=None if options["n_test"] is None else options["n_test"] // 2)
    calibration = zoo.task("intent_bare", split="train", n=options["n_calibration"])
    first = next(iter(pairs.values()))
    tokenizer = first.tokenizer
    models = {"base": first.model("base")}
    models.update({label: pair.model("finetuned") for label, pair in pairs.items()})
    train_acc = {label: pair_acc(m, fit, tokenizer=tokenizer).value
                 for label, m in models.items() if label != "base"}
    # ties (several fine-tunes solve the task) go to full FT, the reference of the comparison
    home = max(train_acc, key=lambda label: (train_acc[label], pairs[label].method == "full"))
    lap("load")
    search = layer_search(models[home], fit, PAIRINGS, tokenizer=tokenizer,
                          n=options["search_items"], progress=progress)
    suggested = search.suggest_layer()
    lap("layer_search")
    # DAS at the suggested layer and every one below it; the knob is where the interchange
    # flips the most answers (ties: the later layer). The search locates attention that moves
    # the intent to the last token; where the intent is the last token itself (the zoo's task)
    # that is no attention at all, and only the sweep finds the knob (at blocks.0).
    knobs = {candidate: context_knob(models[home], fit, layer=candidate, tokenizer=tokenizer,
                                     progress=progress, **das)
             for candidate in range(suggested + 1)}
    layer = max(knobs, key=lambda candidate: (knobs[candidate].interchange_accuracy, candidate))
    knob = knobs[layer]
    layer_sweep = pd.DataFrame([{"layer": candidate, "interchange_acc": k.interchange_accuracy,
                                 "auc": k.options["auc"], "chosen": candidate == layer}
                                for candidate, k in knobs.items()])
    lap("das")
    transfer = knob_transfer(knob, models, test, bare_test, calibration=calibration,
                             tokenizer=tokenizer, n_points=options["n_points"], progress=progress)
    lap("transfer")
    rows = []
    for method in ("das", "mean_diff", "probe"):
        other = knob if method == "das" else context_knob(models[home], fit, layer=layer,
                                                          method=method, tokenizer=tokenizer)
        sweep = steering_sweep(other, models[home], calibration, tokenizer=tokenizer, intent=fit,
                               n_points=options["n_points"], eval_task=bare_test)
        sep = other.separation(models[home], test, tokenizer=tokenizer)
        rows.append({"method": method, "layer": layer,
                     "abs_cos_with_das": abs(float(other.u @ knob.u)),
                     "interchange_acc": other.interchange(models[home], test, tokenizer=tokenizer),
                     "auc": sep.auc, "d_prime": sep.d_prime, "steered_pair_acc": sweep.pair_acc})
    methods = pd.DataFrame(rows)
    lap("methods")
    profile = intent_subspace_profile(models[home], fit, ks=(1, 2, 4, 8, 16, 32),
                                      tokenizer=tokenizer, n=options["n_profile"])
    lap("profile")
    bound = steering_bound(models[home], calibration, eval_task=bare_test, tokenizer=tokenizer,
                           progress=progress)
    lap("steering_bound")
    meta = {"home": home, "layer": layer, "suggested_layer": suggested,
            "train_pair_acc": train_acc, "das_settings": das, "options": options,
            "seconds": seconds}
    if folder is not None:
        with atomic_dir(folder) as tmp:
            search.save(tmp / "search")
            knob.save(tmp / "knob")
            transfer.save(tmp / "transfer")
            profile.save(tmp / "profile")
            bound.save(tmp / "bound")
            methods.to_json(tmp / "methods.json")
            layer_sweep.to_json(tmp / "layer_sweep.json")
            (tmp / "done.json").write_text(json.dumps(meta, indent=2))
    return {"search": search, "knob": knob, "transfer": transfer, "methods": methods,
            "layer_sweep": layer_sweep, "profile": profile, "bound": bound, **meta}


def findings_markdown(results: dict[str, Any]) -> str:
    """The measured numbers as a markdown block for ``figures/findings.md`` and the README."""
    transfer, profile = results["transfer"], results["profile"].table
    table = transfer.table[["model", "instructed_pair_acc", "steered_pair_acc",
                            "steered_over_instructed", "auc", "d_prime", "c_ctx", "c_prior"]]
    corr = transfer.correlations()
    ranges = ", ".join(f"{p}: {r}" for p, r in results["search"].ranges.items())
    return (
        "## Context-sensitivity knob (methods.md §4)\n\n"
        f"Knob found by DAS in **{results['home']}** (best instructed PairAcc on the train split) "
        f"at `blocks.{results['layer']}.hook_resid_pre`, last token; DAS settings "
        f"{results['das_settings']}. Layer search (attention outputs patched at the last token): "
        f"{ranges}; suggested layer {results['suggested_layer']}. DAS at that layer and every "
        "one below it (interchange accuracy on the train split; the knob is the best):\n\n"
        + results["layer_sweep"].to_markdown(index=False, floatfmt=".3f")
        + "\n\nPer model, on the test split (steering values calibrated on the train "
        "split's bare prompts):\n\n" + table.to_markdown(index=False, floatfmt=".3f")
        + "\n\nSeparation vs PairAcc across models:\n\n"
        + corr.to_markdown(index=False, floatfmt=".3f")
        + f"\n\nDAS vs cheap alternatives in {results['home']}:\n\n"
        + results["methods"].to_markdown(index=False, floatfmt=".3f")
        + f"\n\nHow many dimensions the intent needs in {results['home']} (answers flipped by "
        "swapping the top-k principal directions of h_ctx − h_prior, last token):\n\n"
        + profile.pivot(index="k", columns="layer", values="interchange_acc")
        .rename(columns=lambda layer: f"resid_pre {layer}").reset_index().astype({"k": str})
        .to_markdown(index=False, floatfmt=".3f")
        + f"\n\nThe most any rank-1 last-token edit could steer {results['home']} without "
        "instructions (a direction and two values trained directly to steer the calibration "
        "split's bare prompts; PairAcc on the test split):\n\n"
        + results["bound"].table.astype({"layer": str}).to_markdown(index=False, floatfmt=".3f")
    )


def section(ctx) -> list:
    """Figures: layer-search trace, violins by intent, steering sweeps, separation vs PairAcc."""
    from interp.plots.context import (
        layer_search_figure,
        layer_search_plotly,
        projection_violins_figure,
        projection_violins_plotly,
        separation_scatter_figure,
        separation_scatter_plotly,
        steering_sweep_figure,
        steering_sweep_plotly,
        subspace_profile_figure,
        subspace_profile_plotly,
    )

    results = compute(ctx.pairs, progress=ctx.progress)
    search, transfer = results["search"], results["transfer"]
    plots = [
        ("context_layer_search", layer_search_figure(search), layer_search_plotly(search),
         "Layer search for the context knob",
         ("Attention outputs at the last token patched from the other intent (or another item) "
          f"into {results['home']}; binary searches over layer ranges, then refinement.")),
        ("context_violins", projection_violins_figure(transfer), projection_violins_plotly(transfer),
         "Knob coordinate by intent, per model",
         (f"u·h at blocks.{results['layer']}.hook_resid_pre (last token) for ctx- and "
          "prior-intent prompts; the knob comes from one fine-tune and is applied to every model.")),
        ("context_steering", steering_sweep_figure(transfer), steering_sweep_plotly(transfer),
         "Steering without instructions",
         ("Fraction of instruction-free prompts answered from the context / from memory as the "
          "knob coordinate is set to c (calibration split).")),
        ("context_separation", separation_scatter_figure(transfer),
         separation_scatter_plotly(transfer), "Separation vs PairAcc",
         "How well the knob separates the intents (AUC) against PairAcc, instructed and steered."),
        ("context_rank", subspace_profile_figure(results["profile"]),
         subspace_profile_plotly(results["profile"]), "Is the intent one-dimensional?",
         (f"Answers of {results['home']} flipped by swapping the top-k principal directions of "
          "the intent difference at the last token, per layer: a rank-1 knob shows as k = 1 "
          "already flipping most answers.")),
    ]
    gallery = [ctx.save(*entry) for entry in plots]
    ctx.findings.append(findings_markdown(results))
    return gallery
