"""Benchmark: ``interp.skill_mask`` against the straightforward grafting loop.

The straightforward loop (what the paper's repository does, made explicit)
materialises the grafted model every step: copy the base model, write
``θ_pre + γ ⊙ (θ_ft − θ_pre)`` into it, backpropagate to the copy's
parameters, then chain-rule the parameter gradients to S by hand; the rounded
candidate is scored on another grafted copy. interp instead swaps grafted
tensors into one base model with ``torch.func.functional_call`` and lets a
custom autograd function hand the gradient straight to S.

Both run the same optimisation (same split, init, lr rule, exact-k candidates,
best by train + validation accuracy), each in its own fresh subprocess so that
each peak-memory figure (highest RSS above the RSS just before the call,
sampled every 2 ms) is its own. The script checks they choose the same mask and
prints time and peak memory with the ratios.

    .venv/bin/python benchmarks/bench_grafting.py             # zoo pair (if built) + synthetic
    .venv/bin/python benchmarks/bench_grafting.py --steps 5 --only synthetic
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
WORKLOADS = ("zoo", "synthetic", "smollm-shape")


# --------------------------------------------------------------------------- memory


class PeakRSS:
    """Highest resident set size while the block runs, minus the RSS at its start (bytes)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE

    @property
    def used(self) -> int:
        return self.peak - self.start


# --------------------------------------------------------------------------- workloads


def synthetic_pair(d_model: int, layers: int, vocab_words: int = 300, heads: int = 8,
                   kv_heads: int = 8, d_mlp: int | None = None, seed: int = 0):
    """A random Llama and a perturbed copy, with a word-level tokenizer and a lookup task."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from interp import Task, load_pair

    words = [f"w{i}" for i in range(vocab_words)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=d_model,
                         intermediate_size=d_mlp or 4 * d_model, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    base = LlamaForCausalLM(config).eval()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter += 0.01 * torch.randn_like(parameter)
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(words) for _ in range(24)) for _ in range(256)]
    answers = [" " + words[int(p.split()[-1][1:]) % 50] for p in prompts]
    return load_pair(base, finetuned, tokenizer=tokenizer), Task("lookup", prompts, answers)


def zoo_pair():
    """The zoo's full fine-tune on "intent" and its train split; None unless already built.

    ``GRAFT_BENCH_BASE`` / ``GRAFT_BENCH_FINETUNED`` name other zoo-built folders to use instead.
    """
    from interp import load_pair, zoo
    from interp.zoo.catalog import path_of

    if os.environ.get("GRAFT_BENCH_BASE"):
        pair = load_pair(os.environ["GRAFT_BENCH_BASE"], os.environ["GRAFT_BENCH_FINETUNED"])
        return pair, zoo.task("intent", split="train")
    if not all(path_of(name).exists() for name in ("base", "intent-full")):
        print("[bench] the zoo is not built (run `interp zoo` or interp.zoo.build()); skipping it",
              file=sys.stderr)
        return None
    return zoo.pair("intent", "full"), zoo.task("intent", split="train")


def workload(name: str):
    if name == "zoo":
        return zoo_pair()
    if name == "synthetic":  # 25M block parameters, small vocabulary
        return synthetic_pair(d_model=512, layers=6)
    if name == "smollm-shape":  # SmolLM2-135M's widths and 49k vocabulary, 4 of its 30 layers
        return synthetic_pair(d_model=576, layers=4, vocab_words=49150, heads=9, kv_heads=3,
                              d_mlp=1536)
    raise ValueError(name)


# --------------------------------------------------------------------------- the straightforward loop


def straightforward_skill_mask(pair, task, sparsity, steps, seed, n_prompts, batch_size=64,
                               val_fraction=0.25, bias=10.0):
    """The repository's loop with a grafted model copy per step; returns (indices [k], history)."""
    from interp.analysis.grafting import _Prompts, _split_task, check_task
    from interp.analysis.grafting_space import check_sparsity, default_eligible, top_k_mask

    base = pair.model("base")
    finetuned = dict(pair.model("finetuned").named_parameters())
    names = [n for n, _ in base.named_parameters() if default_eligible(n)]
    pre = {n: p.detach() for n, p in base.named_parameters()}
    sizes = [pre[n].numel() for n in names]
    delta_flat = torch.cat([(finetuned[n].detach() - pre[n]).reshape(-1) for n in names])
    n_total = delta_flat.numel()
    k = check_sparsity(sparsity, n_total)
    patch = top_k_mask(delta_flat.abs(), k)
    del delta_flat
    generator = torch.Generator().manual_seed(seed)
    S0 = torch.rand(n_total, generator=generator, dtype=torch.float32).to(torch.float16)
    S = S0.float()
    task = task.subset(slice(0, n_prompts))
    train_task, val_task = _split_task(task, val_fraction, seed)
    train = _Prompts.build(pair.tokenizer, train_task, check_task(pair.tokenizer, train_task),
                           batch_size)
    val = _Prompts.build(pair.tokenizer, val_task, check_task(pair.tokenizer, val_task), batch_size)

    def grafted_copy(gamma: torch.Tensor):
        model = copy.deepcopy(base)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, piece in zip(names, torch.split(gamma, sizes)):
                params[name].copy_(pre[name] + piece.view_as(pre[name]) * (finetuned[name] - pre[name]))
        return model, params

    def evaluate(mask):
        model, _ = grafted_copy(mask.float())
        out = []
        with torch.no_grad():
            for prompts in (train, val):
                correct, loss = 0, 0.0
                for ids, attention, targets in prompts.batches:
                    logits = model(input_ids=ids, attention_mask=attention).logits[:, -1].float()
                    correct += int((logits.argmax(-1) == targets).sum())
                    loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
                out += [correct / prompts.n, loss / prompts.n]
        return out

    lr, best, best_mask, previous, history = None, None, patch, None, []
    for step in range(steps + 1):
        if step > 0:
            s = torch.sigmoid(S - bias)
            model, params = grafted_copy(torch.where(patch, 1.0 - s, s))
            for ids, attention, targets in train.batches:
                logits = model(input_ids=ids, attention_mask=attention).logits[:, -1].float()
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / train.n
                loss.backward()
            grad = torch.cat([(params[n].grad * (finetuned[n].detach() - pre[n])).reshape(-1)
                              for n in names])
            del model, params
            grad = grad * torch.where(patch, -(s * (1 - s)), s * (1 - s))
            if lr is None:
                lr = bias / float(grad.abs().max())
            S = S - lr * grad
            moved = S - S0.float()
            moved[patch] *= -1
            delta_abs = lambda index: torch.cat(
                [(finetuned[n].detach() - pre[n]).reshape(-1) for n in names])[index].abs()
            mask = top_k_mask(moved, k, secondary=delta_abs)
        else:
            mask = patch
        scores = previous[1] if previous is not None and torch.equal(mask, previous[0]) else evaluate(mask)
        previous = (mask, scores)
        key = (scores[0] + scores[2], -(scores[1] * train.n + scores[3] * val.n) / (train.n + val.n))
        if best is None or key > best:
            best, best_mask = key, mask
        history.append(scores)
    return torch.nonzero(best_mask).reshape(-1), history


# --------------------------------------------------------------------------- worker and driver


def worker(method: str, name: str, steps: int, sparsity: float, n_prompts: int, out: str) -> None:
    torch.set_num_threads(1)
    loaded = workload(name)
    if loaded is None:
        Path(out).write_text(json.dumps({"skipped": True}))
        return
    pair, task = loaded
    _ = pair.tokenizer, pair.config  # resolve lazily-read metadata outside the measurement
    start, cpu_start = time.perf_counter(), time.process_time()
    with PeakRSS() as memory:
        if method == "interp":
            from interp.analysis.grafting import skill_mask

            mask = skill_mask(pair, task, sparsity=sparsity, steps=steps, seed=0,
                              n_prompts=n_prompts, progress=False)
            indices = mask.global_indices()
            history = mask.history[["train_accuracy", "train_loss", "val_accuracy", "val_loss"]]
            history = history.to_numpy().tolist()
        else:
            indices, history = straightforward_skill_mask(pair, task, sparsity, steps, 0, n_prompts)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    Path(out).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": memory.used,
                                     "indices": indices.tolist(), "history": history}))


def run(name: str, args) -> dict | None:
    results = {}
    args = argparse.Namespace(**vars(args))
    args.steps = args.steps or (8 if name == "zoo" else 3)
    args.n_prompts = args.n_prompts or (256 if name == "zoo" else 64)
    for method in ("interp", "straightforward"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = handle.name
        command = [sys.executable, __file__, "--worker", method, "--only", name, "--steps",
                   str(args.steps), "--sparsity", str(args.sparsity), "--n-prompts",
                   str(args.n_prompts), "--out", out]
        # big tensors always mmapped, so a freed tensor leaves the RSS (glibc otherwise keeps it)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        subprocess.run(command, check=True, env=env)
        results[method] = json.loads(Path(out).read_text())
        os.unlink(out)
        if results[method].get("skipped"):
            return None
    a, b = results["interp"], results["straightforward"]
    same = set(a["indices"]) == set(b["indices"])
    jaccard = len(set(a["indices"]) & set(b["indices"])) / len(set(a["indices"]) | set(b["indices"]))
    pairs = list(zip(a["history"], b["history"]))  # rows: train acc, train loss, val acc, val loss
    accuracy_gap = max(abs(ra[i] - rb[i]) for ra, rb in pairs for i in (0, 2))
    loss_gap = max(abs(ra[i] - rb[i]) / abs(rb[i]) for ra, rb in pairs for i in (1, 3))
    return {"workload": name, "k": len(a["indices"]), "steps": args.steps, "n_prompts": args.n_prompts,
            "interp_s": a["seconds"], "straightforward_s": b["seconds"],
            "time_ratio": b["seconds"] / a["seconds"],
            "interp_cpu_s": a["cpu_seconds"], "straightforward_cpu_s": b["cpu_seconds"],
            "cpu_ratio": b["cpu_seconds"] / a["cpu_seconds"],
            "interp_peak_MB": a["peak_bytes"] / 2**20, "straightforward_peak_MB": b["peak_bytes"] / 2**20,
            "memory_ratio": b["peak_bytes"] / max(a["peak_bytes"], 1),
            "same_mask": same, "mask_jaccard": jaccard, "max_accuracy_gap": accuracy_gap,
            "max_relative_loss_gap": loss_gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimisation steps (default 8 on the zoo, 3 on the synthetic models)")
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--n-prompts", type=int, default=None,
                        help="prompts, train + validation (default 256 zoo, 64 synthetic)")
    parser.add_argument("--only", choices=WORKLOADS, default=None)
    parser.add_argument("--worker", choices=["interp", "straightforward"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.only, args.steps, args.sparsity, args.n_prompts, args.out)
        return
    rows = []
    for name in [args.only] if args.only else WORKLOADS:
        row = run(name, args)
        if row is None:
            print(f"[bench] {name}: skipped")
            continue
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    for row in rows:
        print(f"{row['workload']:>12}: k={row['k']} steps={row['steps']} prompts={row['n_prompts']}: "
              f"time interp {row['interp_s']:.1f} s vs straightforward "
              f"{row['straightforward_s']:.1f} s (ratio {row['time_ratio']:.2f}x; CPU time "
              f"{row['interp_cpu_s']:.1f} s vs {row['straightforward_cpu_s']:.1f} s, ratio "
              f"{row['cpu_ratio']:.2f}x); peak memory {row['interp_peak_MB']:.0f} MB vs "
              f"{row['straightforward_peak_MB']:.0f} MB (ratio {row['memory_ratio']:.2f}x); "
              f"same mask: {row['same_mask']} (Jaccard {row['mask_jaccard']:.3f}), "
              f"history: accuracies differ by {row['max_accuracy_gap']:.2g}, losses by "
              f"{row['max_relative_loss_gap']:.1e} (relative)")
        # same masks and accuracies; losses differ only by float32 rounding (fused multiply-add,
        # last-position vs full logits)
        agree = row["same_mask"] and row["max_accuracy_gap"] == 0 and row["max_relative_loss_gap"] < 1e-3
        assert agree, "interp and the straightforward loop disagree"


if __name__ == "__main__":
    main()
