"""Write notebooks/03_cross_model_patching.ipynb (no outputs): cross-model activation patching on the zoo.

    .venv/bin/python notebooks/build_patching.py

The notebook computes every number it quotes; the markdown says what to look
for and the code cells print the measured values.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbcells import write_notebook

CELLS = [
    ("md", """# Cross-model activation patching: which components carry what fine-tuning improved?

Prakash et al. (*Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity Tracking*,
ICLR 2024) ask where a fine-tune's gain on entity tracking lives. Their tool is **cross-model
activation patching (CMAP)**: run the *base* model, but overwrite some of its activations with
the *fine-tuned* model's activations on the same prompt, and see how much of the fine-tune's
improvement comes back. They find that the fine-tune's gain sits in the same circuit the base
already used — patching only its "value fetcher" heads recovers all of it.

`interp.patch` generalises this from a chosen head group to **every component**: the residual
stream at each layer and position, each attention head's output, each attention and MLP output.
Everything runs on the built-in zoo: a tiny Llama whose pretraining shows
only two boxes at a time (the task asks about two to five), fine-tuned on entity tracking with full fine-tuning and LoRA.

Task format: `The cup is in Box K, the map is in Box R, and the key is in Box D. Box R contains
the` → ` map`. The counterfactual answer is the object in another box (the metric is the logit
difference between the two)."""),
    ("code", """import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import time

import pandas as pd
import torch
import transformers

from interp import zoo
from interp.analysis.circuits import cmap, compare_maps, faithfulness, path_patch
from interp.analysis.patching import PatchResult, Site, patch
from interp.plots import patching as plots

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
VARIANTS = [("full", None), ("lora", 8), ("lora", 1)]
zoo.build(["base"] + [zoo.catalog.recipe_name("tracking", m, r) for m, r in VARIANTS], progress=False)
pairs = {p.label: p for p in (zoo.pair("tracking", m, r) for m, r in VARIANTS)}
FULL = "tracking-full"

# one number of boxes, so every prompt has the same tokens at the same positions
N_BOXES, N_ITEMS = 3, 64
task = zoo.task("tracking", "test", n=600)
task = task.subset([i for i, b in enumerate(task.extras["n_boxes"]) if b == N_BOXES][:N_ITEMS])
print(len(task), "prompts, e.g.", repr(task.prompts[0]), "->", repr(task.answers[0]))"""),
    ("md", """## Base vs fine-tunes

Accuracy = the answer is the argmax at the last token. Chance is 1/3 with three boxes."""),
    ("code", """from interp.tasks import accuracy

tokenizer = pairs[FULL].tokenizer
rows = [{"model": "base", "accuracy": accuracy(pairs[FULL].model("base"), tokenizer, task)}]
for label, pair in pairs.items():
    rows.append({"model": label, "accuracy": accuracy(pair.model("finetuned"), tokenizer, task)})
pd.DataFrame(rows)"""),
    ("md", """## Every component, fine-tune → base

`patch(pair, task, direction="ft->base")` copies one site at a time from the fine-tune's run
into the base's run on the same prompt and reads the logit difference at the last token.
`recovered` = (patched − base) / (fine-tune − base): 1 means that single site carries the whole
improvement. Sites: `resid_pre` (layer × position), `z` (each head's output, pushed through
the base's own output projection, as CMAP does), `attn_out` and `mlp_out` per layer.

Many sites share one batched forward, and each starts from the base's cached activations at
its own layer and position, so the whole grid takes seconds. The result shows itself: the
unpatched runs first, then the sites that recover most."""),
    ("code", """start = time.perf_counter()
results = {FULL: patch(pairs[FULL], task, direction="ft->base", progress=False)}
print(f"{len(results[FULL].table)} sites in {time.perf_counter() - start:.1f} s")
results[FULL]"""),
    ("code", """plots.patching_plotly(results[FULL])"""),
    ("md", """Reading the map: a residual-stream cell near 1 means that position, entering that block,
already holds everything the fine-tune does differently; the row where the last position turns
red is where the fine-tune's extra computation has happened by. Among components (attention and
MLP outputs at every position, single heads), the table lists those that carry most of the gap
on their own — their recovered fractions need not add up to 1, since components interact."""),
    ("code", """table = results[FULL].table
components = table[table["pos"] < 0].sort_values("recovered", ascending=False)
components[["site", "logit_diff", "accuracy", "recovered"]].head(8)"""),
    ("md", """## Does LoRA's improvement live in the same components?

The same grid for LoRA r = 8 and r = 1, and the correlation of their recovered-fraction maps
with full fine-tuning's (over component sites, and over the residual layer × position grid)."""),
    ("code", """for label in pairs:
    if label not in results:
        results[label] = patch(pairs[label], task, direction="ft->base", progress=False)
compare_maps(results, FULL)"""),
    ("code", """plots.compare_plotly(results, "z")"""),
    ("code", """plots.component_figure(results)"""),
    ("md", """## CMAP in the paper's form

Groups chosen from full fine-tuning's map: its top-3 heads, all heads, and (beyond the paper's
head groups) every MLP output. For each fine-tune: the accuracy of the base, of the fine-tune,
and of the base with the fine-tune's activations patched into each group (head outputs
`hook_z`, through the base's own `W_O`). If LoRA's rows come close to LoRA's own accuracy for the
groups chosen from full FT's map, LoRA improved the same components."""),
    ("code", """heads = results[FULL].table[results[FULL].table["kind"] == "z"]
top = [(int(r.layer), int(r.head)) for r in heads.sort_values("recovered", ascending=False).head(3).itertuples()]
groups = {"top 3 heads (full FT)": top,
          "all heads": [(int(r.layer), int(r.head)) for r in heads.itertuples()],
          "all MLPs": [Site("mlp_out", layer) for layer in range(results[FULL].n_layers)]}
print("top heads of full FT:", top)
cmaps = {label: cmap(pair, task, groups=groups, progress=False) for label, pair in pairs.items()}
cmaps[FULL]"""),
    ("code", """rows = []
for label, t in cmaps.items():
    table = t.table
    row = {"fine-tune": label, "base": table["accuracy"].iloc[0], "fine-tune acc": table["accuracy"].iloc[1]}
    row.update(dict(zip(table["group"].iloc[2:], table["accuracy"].iloc[2:])))
    rows.append(row)
pd.DataFrame(rows)"""),
    ("md", """## Within one model: where does the query label travel?

Classic activation patching inside the fine-tuned model: the clean run's residual stream is
patched into the run on the counterfactual prompt (the query asks for another box). Only the
positions from the query label on differ between the two prompts; sites before it are skipped
(their activations are identical, so the patch provably does nothing)."""),
    ("code", """ft_model = pairs[FULL].model("finetuned")
within = patch(ft_model, None, task, tokenizer=tokenizer, sites=["resid_pre", "z"], progress=False)
plots.patching_figure(within)"""),
    ("md", """## Path patching and faithfulness

Path patching (direct paths, as `transformer_lens.patching.get_act_patch_direct_path` defines
them): each head's change of output on the clean prompt is routed only into the **queries** of
the strongest head found above, in the counterfactual run. Heads that move the metric feed
that head's query — the paper's "position transmitters" stage."""),
    ("code", """receiver = max(top, key=lambda h: h[0])
paths = path_patch(ft_model, task, tokenizer=tokenizer, receivers=[receiver], channel="q", progress=False)
print("receiver:", receiver)
paths.grid("path", "recovered")"""),
    ("md", """Mean-ablation faithfulness: replace every head *outside* a circuit by its mean output over
the task's prompts and compare accuracy with the intact model (the paper's measure:
circuit accuracy / model accuracy)."""),
    ("code", """circuits = {"top 3 heads": top, "top 3 + their layer-0 heads": sorted(set(top) | {(0, h) for h in range(4)})}
faithfulness(ft_model, task, circuits, tokenizer=tokenizer, progress=False)"""),
    ("md", """## Results are data

Every result is a frozen dataclass with a tidy `.table`, the per-item tensors behind it and the
options used; `save` / `load` round-trips it (safetensors + JSON)."""),
    ("code", """import tempfile
folder = results[FULL].save(os.path.join(tempfile.mkdtemp(), "patch"))
again = PatchResult.load(folder)
print(again.table.equals(results[FULL].table), again.per_item["logit_diff"].shape, again.options["metric"])"""),
]


def build(path: Path | None = None) -> Path:
    """Write the notebook without outputs (fixed cell ids: a rebuild gives the same file)."""
    return write_notebook(CELLS, path or Path(__file__).with_name("03_cross_model_patching.ipynb"), "patching")


if __name__ == "__main__":
    print(build())
