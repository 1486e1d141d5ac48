"""Write notebooks/01_intruder_dimensions.ipynb (no outputs): intruder dimensions on the zoo.

    .venv/bin/python notebooks/build_intruders.py

The notebook computes every number it quotes, so it never goes stale: the
markdown says what to look for, the code cells print the measured values.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbcells import write_notebook

CELLS = [
    ("md", """# Intruder dimensions: where LoRA's weight updates diverge from full fine-tuning

Shuttleworth et al. (*LoRA vs Full Fine-tuning: An Illusion of Equivalence*, arXiv 2410.21228)
look at the **left singular vectors** of every fine-tuned weight matrix. For each of the top
`k = 10` of them they take the largest absolute cosine with **any** left singular vector of the
base matrix. A fine-tuned vector with no base vector closer than `ε = 0.5` is an **intruder
dimension**: a new, high-ranking direction that the base never had. They find that LoRA at low
rank grows intruders while full fine-tuning has few or none, and that scaling the intruders
down brings back some of the pretraining behaviour.

Here we measure this on the built-in zoo: one tiny Llama base pretrained on a procedural world,
fine-tuned on the *intent* task (answer from the context or from memory, as the instruction
says) with full fine-tuning, LoRA r = 1, 8, 64 (α = 2r) and rsLoRA r = 64. Every number below
is computed when the notebook runs."""),
    ("code", """import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import time

import pandas as pd
import torch

from interp import zoo
from interp.analysis.intruders import intruder_dimensions, naive_intruder_counts
from interp.analysis.intruders_mitigation import intruder_tradeoff
from interp.analysis.weight_change import weight_change
from interp.plots import intruders as plots

torch.set_num_threads(1)
VARIANTS = [("lora", 1), ("lora", 8), ("lora", 64), ("rslora", 64), ("full", None)]
zoo.build(["base"] + [zoo.catalog.recipe_name("intent", m, r) for m, r in VARIANTS], progress=False)
pairs = {p.label: p for p in (zoo.pair("intent", m, r) for m, r in VARIANTS)}
accuracy = zoo.summary().set_index("name")
accuracy.loc[list(pairs), ["method", "rank", "alpha", "accuracy_before", "accuracy_after"]]"""),
    ("md", """## The scan

`intruder_dimensions` takes a list of fine-tunes of one base. It decomposes each base matrix
once (exact thin SVD, cached on disk by the matrix's content) and, for each fine-tune, finds
only the top-k singular vectors (here from the Gram matrix's eigendecomposition). Whenever an
intruder flag lies within numerical error of `ε`, it redoes that matrix with the dense SVD, so
the flags equal the paper's direct computation. The result shows itself as a per-pair summary."""),
    ("code", """report = intruder_dimensions(list(pairs.values()), k=10, eps=0.5, progress=False)
report"""),
    ("md", """## Which variant has intruders?

The model-level count is the number of flagged (matrix, vector) pairs over every scanned
matrix (each layer's q, k, v, o, gate, up, down), each contributing at most `k = 10`."""),
    ("code", """counts = report.summary().set_index("pair")
for label, row in counts.iterrows():
    print(f"{label:20s} {int(row.n_intruders):4d} intruders in {int(row.matrices_with_intruders):2d} "
          f"of {int(row.n_matrices)} matrices; lowest top-1 max|cos| = {row.lowest_top1_max_sim:.3f}")
order = [label for label in pairs if label != "intent-full"]
ranking = counts.loc[order + ["intent-full"], "n_intruders"].tolist()
print("\\nLoRA r=1 > r=8 > r=64 >= full FT:",
      ranking[0] > ranking[1] > ranking[2] >= ranking[4], ranking)"""),
    ("md", """## At which ε?

`max |cos|` does not depend on `ε`, so the report re-thresholds without any new SVD. The
paper's curves: counts fall as `ε` drops; the question is which fine-tunes keep intruders at
strict thresholds."""),
    ("code", """sweep = report.sweep([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
display(sweep.pivot(index="pair", columns="eps", values="n_intruders").loc[list(pairs)])
plots.intruder_eps_plotly(report)"""),
    ("md", """## Where are they?

Counts per layer and module at `ε = 0.5`."""),
    ("code", """display(report.counts(by=("pair", "module")).pivot(index="pair", columns="module",
                                                   values="n_intruders").loc[list(pairs)])
plots.intruder_layers_plotly(report)"""),
    ("md", """## What an intruder looks like

The heat map shows `|Utᵀ U0|` for the matrix with the most intruders: row `j` is the j-th
fine-tuned left singular vector, column `i` the i-th base one. Fine-tuning that only rotates
existing directions keeps a bright cell in every row (near the diagonal); an intruder is a
row with no bright cell."""),
    ("code", """matrix = plots.busiest_matrix(report)
full = intruder_dimensions(list(pairs.values()), k=10, eps=0.5, matrices=[matrix],
                           keep_full=[matrix], progress=False)
display(report.intruders().query("matrix == @matrix")[["pair", "j", "sigma_j", "max_sim",
                                                        "matched_base_index"]])
plots.intruder_similarity_plotly(full, matrix)"""),
    ("md", """## Count vs rank"""),
    ("code", """plots.intruder_rank_plotly(report)"""),
    ("md", """## Why the counts come out as they do

The paper's ordering (LoRA r=1 > r=8 > r=64 ≳ full) is a tendency, not a law; the appendix
has a case where r=64 has fewer intruders than full fine-tuning. Two properties of an update
decide whether it creates intruders: how **large** its top directions are relative to the
base's top-k singular values (an update smaller than the gaps only rotates existing vectors
slightly), and how **concentrated** it is (a rank-1 update puts all its norm in one new
direction). The table gives, per fine-tune, the update's size relative to the base
(`‖ΔW‖/‖W0‖`), its stable rank, and the largest ratio `σ₁(ΔW) / σ_k(W0)` over matrices."""),
    ("code", """changes = weight_change(list(pairs.values()), progress=False).table
rows = []
for label, pair in pairs.items():
    ratios = []
    for name in pair.matrix_names():
        w0, delta = pair.base_matrix(name), pair.delta(name)
        ratios.append(float(torch.linalg.matrix_norm(delta, ord=2) / torch.linalg.svdvals(w0)[9]))
    part = changes[changes["pair"] == label]
    rows.append({"pair": label, "intruders": int(counts.loc[label, "n_intruders"]),
                 "mean ‖ΔW‖/‖W0‖": part["relative_change"].mean(),
                 "median stable rank of ΔW": part["stable_rank"].median(),
                 "max σ1(ΔW)/σ10(W0)": max(ratios),
                 "matrices with σ1(ΔW) > σ10(W0)": sum(r > 1 for r in ratios)})
pd.DataFrame(rows).set_index("pair")"""),
    ("md", """## Mitigation: scale the intruders down

`scale_intruders(pair, lam)` replaces each intruder triplet `(u, s, v)` of the merged matrix by
`(u, λs, v)`. Sweeping λ for the LoRA fine-tune with the most intruders trades held-out
pretraining-text loss (documents from the base's pretraining mixture that it never saw)
against intent accuracy; λ = 1 is the fine-tune, λ = 0 removes the intruders."""),
    ("code", """lora = [label for label, p in pairs.items() if p.adapter is not None]
target = max(lora, key=lambda label: counts.loc[label, "n_intruders"])
tradeoff = intruder_tradeoff(pairs[target], zoo.task("intent", "test", n=200),
                             zoo.pretraining_text(256), lams=(0.0, 0.25, 0.5, 0.75, 1.0),
                             progress=False)
print(target, tradeoff.reference)
display(tradeoff.table)
plots.intruder_tradeoff_plotly(tradeoff)"""),
    ("md", """## Same counts as the paper's script, in less time

The straightforward computation takes two dense SVDs per matrix per fine-tune. The scan above
shares one base SVD across all fine-tunes (on disk, so a rerun reads it back) and needs only the
fine-tuned top-k. The counts must be identical, matrix by matrix."""),
    ("code", """start = time.perf_counter()
naive = {label: naive_intruder_counts(pair, k=10, eps=0.5) for label, pair in pairs.items()}
t_naive = time.perf_counter() - start
start = time.perf_counter()
again = intruder_dimensions(list(pairs.values()), k=10, eps=0.5, progress=False)
t_fast = time.perf_counter() - start
per_matrix = again.counts(by=("pair", "matrix"))
same = all(per_matrix[per_matrix["pair"] == label].set_index("matrix")["n_intruders"].to_dict()
           == naive[label] for label in pairs)
print(f"identical counts: {same}; dense SVDs {t_naive:.2f} s, interp {t_fast:.2f} s "
      f"(×{t_naive / t_fast:.1f}; base SVDs read from the cache)")
again.solver.groupby("method").size()"""),
]


def build(path: Path | None = None) -> Path:
    """Write the notebook without outputs (fixed cell ids: a rebuild gives the same file)."""
    return write_notebook(CELLS, path or Path(__file__).with_name("01_intruder_dimensions.ipynb"), "intruders")


if __name__ == "__main__":
    print(build())
