"""Residual-stream patching grid (layer × position): transformer_lens.patching vs interp.patch.

Run directly: ``.venv/bin/python benchmarks/bench_patching.py [--items N] [--skip-smollm2]``.

Both sides patch the same cross-model grid — every ``blocks.{l}.hook_resid_pre``
at every position, source = the fine-tuned model, target = the base — and read
the logit difference (answer − counterfactual answer) at the last token:

* **TransformerLens**: ``transformer_lens.patching.get_act_patch_resid_pre``
  on the target's ``TransformerBridge`` (it works on 4.3 bridges unchanged) with
  the source bridge's ``run_with_cache`` as the "clean cache": one full hooked
  forward per (layer, position), logits at every position.
* **interp**: ``interp.patch(..., sites="resid_pre", metrics=("logit_diff",))``,
  the batched engine (variants stacked along the batch, layers below the patch
  and positions before it reused from the target's cache, and at the last
  position only the two unembedding rows the logit difference reads).

A second row per model patches within one model, TransformerLens's own use
case: the clean prompts' residuals into the run on the counterfactual prompts
(query label swapped). There interp also skips sites whose source and target
activations are identical (every position before the swapped label).

Models: the zoo's tracking base and its full fine-tune (interp.zoo), and
SmolLM2-135M-Instruct (interp.zoo.real.smollm2) against a seeded perturbed
copy of itself standing in for a fine-tune (1% Gaussian noise on every
matrix), on paper-style entity-tracking prompts of one token length.
Prints the time of each, the ratio, and the largest per-item difference.
The SmolLM2 grid takes every 5th layer from layer 2 by default (``--smollm2-layer-step``)
so the reference side finishes in minutes; both sides patch the same sites.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from interp.analysis.patching import Site, patch
from interp.pairs.hooked import bridge
from interp.tasks import Task

torch.set_num_threads(1)


def transformer_lens_grid(source, target, tokenizer, task: Task, layers: list[int]) -> tuple[torch.Tensor, tuple]:
    """[layers, pos, items] logit differences from get_act_patch_resid_pre, and (wall, CPU) seconds.

    ``target`` None: within-model, clean prompts' cache patched into the counterfactual run.
    """
    import pandas as pd
    from transformer_lens.patching import get_act_patch_resid_pre

    source_bridge = bridge(source, tokenizer)
    target_bridge = source_bridge if target is None else bridge(target, tokenizer)
    clean = torch.tensor([tokenizer(p)["input_ids"] for p in task.prompts])
    ids = clean if target is not None else torch.tensor(
        [tokenizer(p)["input_ids"] for p in task.counterfactual_prompts])
    answer = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in task.answers])
    counter = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0]
                            for a in task.counterfactual_answers])

    def logit_diff(logits):
        last = logits[:, -1]
        return last.gather(-1, answer[:, None])[:, 0] - last.gather(-1, counter[:, None])[:, 0]

    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        _, clean_cache = source_bridge.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        index = pd.DataFrame([(l, p) for l in layers for p in range(ids.shape[1])], columns=["layer", "pos"])
        result = get_act_patch_resid_pre(target_bridge, ids, clean_cache, logit_diff, reduce="none",
                                         index_axis_names=None, index_df=index)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return result.values.float().view(len(layers), ids.shape[1], -1), seconds


def interp_grid(source, target, tokenizer, task: Task, layers: list[int]) -> tuple[torch.Tensor, tuple]:
    """[layers, pos, items] logit differences from interp.patch, and (wall, CPU) seconds."""
    width = len(tokenizer(task.prompts[0])["input_ids"])
    sites = [Site("resid_pre", l, None, p) for l in layers for p in range(width)]
    start, cpu = time.perf_counter(), time.process_time()
    result = patch(source, target, task, tokenizer=tokenizer, sites=sites, progress=False,
                   metrics=("logit_diff",))  # what the reference's metric function reads
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return result.per_item["logit_diff"].view(len(layers), width, -1), seconds


def block_macs(config) -> tuple[float, float, float]:
    """Multiply-adds per token: a whole block, its key/value projections, the unembedding."""
    d = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_o = 2 * d * config.num_attention_heads * d_head
    k_v = 2 * d * config.num_key_value_heads * d_head
    mlp = 3 * d * config.intermediate_size
    return q_o + k_v + mlp, k_v, d * config.vocab_size


def work_ceiling(config, layers: list[int], length: int, first_live: int = 0,
                 metric_rows: int = 2) -> float:
    """The most any exact one-result-per-site method can gain over one full forward per site.

    A patch of ``resid_pre`` at (layer l, position p) changes every residual at
    layers ≥ l and positions ≥ p, and the last logit reads all of them, so an
    exact method must run at least: blocks l … L−2 on positions p … T−1, the last
    block's key/value projections on those positions and the rest of it on the
    last one, and the ``metric_rows`` rows of the unembedding the metric reads
    (two for a logit difference). The reference runs all L blocks and the whole
    unembedding on every position. Sites before ``first_live`` (where source and
    target activations are equal) cost nothing. Attention scores (≤ 5% here)
    are left out of both sides. Returns reference work / minimum work.
    """
    block, kv, unembed = block_macs(config)
    metric_unembed = config.hidden_size * metric_rows
    n_layers = config.num_hidden_layers
    reference = minimum = 0.0
    for layer in layers:
        for pos in range(length):
            reference += length * (n_layers * block + unembed)
            if pos < first_live:
                continue
            rows = length - pos
            minimum += (n_layers - 1 - layer) * rows * block + rows * kv + (block - kv) + metric_unembed
    return reference / minimum


def compare(name: str, source, target, tokenizer, task: Task, layer_step: int = 1) -> dict:
    length = len(tokenizer(task.prompts[0])["input_ids"])
    layers = list(range(layer_step // 2, source.config.num_hidden_layers, layer_step))
    print(f"\n== {name}: {len(task)} prompts × {length} tokens, layers {layers} × every position "
          f"→ {len(layers) * length} sites")
    ours, t_ours = interp_grid(source, target, tokenizer, task, layers)
    print(f"interp.patch                      {t_ours[0]:8.2f} s wall  {t_ours[1]:8.2f} s CPU")
    theirs, t_theirs = transformer_lens_grid(source, target, tokenizer, task, layers)
    print(f"transformer_lens get_act_patch_*  {t_theirs[0]:8.2f} s wall  {t_theirs[1]:8.2f} s CPU")
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    wall, cpu = t_theirs[0] / t_ours[0], t_theirs[1] / t_ours[1]
    print(f"max |difference| per item: {diff:.2e} (largest |logit diff| {scale:.1f})   "
          f"speed-up: {wall:.1f}× wall, {cpu:.1f}× CPU time")
    first_live = 0
    if target is None:  # within-model: positions before the first clean/counterfactual difference
        clean = torch.tensor([tokenizer(p)["input_ids"] for p in task.prompts])
        corrupt = torch.tensor([tokenizer(p)["input_ids"] for p in task.counterfactual_prompts])
        first_live = int(torch.nonzero((clean != corrupt).any(dim=0))[0])
    ceiling = work_ceiling(source.config, layers, length, first_live)
    print(f"skippable work: the reference does {ceiling:.1f}× the multiply-adds an exact per-site "
          f"method must; per multiply-add interp runs at {wall / ceiling:.2f}× the reference's speed")
    return {"name": name, "interp_s": t_ours[0], "tl_s": t_theirs[0], "ratio": wall, "cpu_ratio": cpu,
            "ceiling": ceiling, "max_diff": diff, "ok": diff <= 1e-5 * max(1.0, scale)}


# ---------------------------------------------------------------------------
# models and tasks
# ---------------------------------------------------------------------------


def zoo_case(n_items: int):
    from interp import zoo

    pair = zoo.pair("tracking", "full")  # builds the base and this fine-tune if missing
    task = zoo.task("tracking", "test")
    lengths = [len(pair.tokenizer(p)["input_ids"]) for p in task.prompts]
    common = max(set(lengths), key=lengths.count)
    task = task.subset([i for i, n in enumerate(lengths) if n == common][:n_items])
    return pair.model("finetuned"), pair.model("base"), pair.tokenizer, task


OBJECTS = ["apple", "car", "ball", "book", "cup", "key", "hat", "shoe", "lamp", "coin", "ring", "pen", "map", "bell", "fork", "drum"]
LETTERS = list("ABCDEFGHJKLMNOPQRSTUVWXZ")


def tracking_prompts(tokenizer, n_items: int, n_boxes: int = 3, seed: int = 0) -> Task:
    """Paper-style entity tracking prompts, kept only at the most common token length."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < 20 * n_items:
        objects, labels = rng.sample(OBJECTS, n_boxes), rng.sample(LETTERS, n_boxes)
        clauses = [f"the {o} is in Box {b}" for o, b in zip(objects, labels)]
        clauses[-1] = "and " + clauses[-1]
        body = ", ".join(clauses)
        body = body[0].upper() + body[1:]
        query, other = rng.sample(range(n_boxes), 2)
        rows.append((f"{body}. Box {labels[query]} contains the", f" {objects[query]}",
                     f"{body}. Box {labels[other]} contains the", f" {objects[other]}"))
    lengths = [len(tokenizer(r[0])["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    rows = [r for r, n in zip(rows, lengths) if n == common][:n_items]
    return Task("tracking-smollm2", *map(list, zip(*rows)))


def smollm2_case(n_items: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interp.zoo.real import smollm2

    folder = smollm2(progress=False)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter += 0.01 * parameter.std() * torch.randn(parameter.shape, generator=generator)
    return tuned, base, tokenizer, tracking_prompts(tokenizer, n_items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8, help="zoo prompts (all one token length)")
    parser.add_argument("--smollm2-items", type=int, default=4, help="SmolLM2 prompts")
    parser.add_argument("--smollm2-layer-step", type=int, default=5,
                        help="patch every k-th SmolLM2 layer (from k//2, so the mean depth matches "
                             "the full grid) at every position, to keep the one-forward-per-site "
                             "side to minutes; 1 = the full grid")
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    rows = []
    if not args.skip_zoo:
        tuned, base, tokenizer, task = zoo_case(args.items)
        rows.append(compare("zoo tracking: full FT → base", tuned, base, tokenizer, task))
        rows.append(compare("zoo tracking within base: clean → label swapped", base, None, tokenizer, task))
    if not args.skip_smollm2:
        tuned, base, tokenizer, task = smollm2_case(args.smollm2_items)
        rows.append(compare("SmolLM2-135M: perturbed → original", tuned, base, tokenizer, task,
                            layer_step=args.smollm2_layer_step))
        rows.append(compare("SmolLM2-135M within: clean → label swapped", base, None, tokenizer, task,
                            layer_step=args.smollm2_layer_step))
    print("\nsummary")
    for row in rows:
        print(f"  {row['name']:48s} TL {row['tl_s']:7.1f} s  interp {row['interp_s']:6.2f} s  "
              f"{row['ratio']:5.1f}× wall  {row['cpu_ratio']:5.1f}× CPU  (ceiling {row['ceiling']:.1f}×)  "
              f"max diff {row['max_diff']:.1e}")
    ok = all(row["ok"] for row in rows)
    print("numbers agree (to 1e-5 relative to the largest logit difference)" if ok else "NUMBERS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
