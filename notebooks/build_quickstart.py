"""Build notebooks/00_quickstart.ipynb (no outputs): ``.venv/bin/python notebooks/build_quickstart.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbcells import write_notebook

CELLS = [
    ("md", """# 00 · Quickstart: what did fine-tuning change?

interp pairs a **base** checkpoint with a **fine-tuned** version of it and runs four analyses on
the pair. Each is one function call that returns a result object with a tidy `.table`, a
`.summary()`, `.save()` / `.load()`, and plots in `interp.plots`.

This notebook uses the built-in zoo (a tiny Llama pretrained here on a procedural world and
fine-tuned with full FT and LoRA; `interp.zoo.build()` makes it once, in minutes, and caches it).
Your own checkpoints load the same way:

```python
pair = interp.load_pair("path/or/hub-id/of/base", "path/to/full-finetune")
pair = interp.load_pair("path/to/base", adapter="path/to/peft-adapter")
pair = interp.load_pair("model.gguf", "finetuned.gguf")
```"""),
    ("code", """import torch

torch.set_num_threads(2)
import interp
from interp import zoo

full = zoo.pair("intent", "full")          # base + full fine-tune (HF folders)
lora = zoo.pair("intent", "lora", rank=8)  # base + PEFT adapter (merged on the fly, one matrix at a time)
print(full, lora, sep="\\n")
zoo.summary()"""),
    ("md", """## 1 · Intruder dimensions (weights only)
Top singular vectors of each fine-tuned matrix with no close counterpart (|cos| < ε) among the
base's. The base is decomposed once and reused for every fine-tune of it."""),
    ("code", """report = interp.intruder_dimensions([lora, full], k=10, eps=0.5, progress=False)
report.summary()"""),
    ("code", """report.sweep([0.3, 0.5, 0.7, 0.9])   # re-thresholds without new SVDs"""),
    ("md", """## 2 · Skill localization by grafting
A mask over a tiny fraction of parameters (here 1e-3) whose fine-tuned values, grafted onto the
base, recover the skill. Compared with the top-|Δθ| patch, a random mask, the fine-tune and
the base."""),
    ("code", """train, test = zoo.task("intent", "train", n=256), zoo.task("intent", "test", n=200)
mask = interp.skill_mask(full, train, sparsity=1e-3, steps=5, progress=False)
evaluation = interp.graft_evaluation(full, test, mask, progress=False)
evaluation.summary()"""),
    ("md", """## 3 · Cross-model activation patching
Entity tracking: the fine-tune's activations patched into the base one site at a time; `recovered`
is the fraction of the fine-tune − base gap a site closes. Prompts must tokenize to one length."""),
    ("code", """from interp.sections.patching import tracking_task

tracking = zoo.pair("tracking", "full")
result = interp.patch(tracking, tracking_task(n_items=48), sites=["attn_out", "mlp_out"],
                      direction="ft->base", progress=False)
result.summary()"""),
    ("md", """## 4 · The context-sensitivity knob
A rank-1 direction at one layer's residual stream (last token) that decides whether the model
answers from the context or from memory; found with DAS in the fine-tune."""),
    ("code", """fit = zoo.task("intent", "train", n=256)
knob = interp.context_knob(full, fit, method="mean_diff", progress=False)
print(knob.summary())
knob.separation(full, test).summary()"""),
    ("md", """Every result saves and reloads:"""),
    ("code", """import tempfile, pathlib

folder = pathlib.Path(tempfile.mkdtemp())
report.save(folder / "intruders")
again = interp.IntruderReport.load(folder / "intruders")
assert again.table.equals(report.table)"""),
]


def build(path: Path | None = None) -> Path:
    return write_notebook(CELLS, path or Path(__file__).with_name("00_quickstart.ipynb"), "quickstart")


if __name__ == "__main__":
    print(build())
