"""Pretrain the zoo's tiny Llama base on world text; fine-tune it fully or with LoRA.

Plain torch + transformers + peft (never through TransformerLens), seeded and
deterministic on one machine: the same config gives the same weights. The base
is a ``LlamaForCausalLM`` with SmolLM2's module names (``q/k/v/o_proj``,
``gate/up/down_proj``), so every analysis has one code path for both.

Pretraining adds, for its first ``lookup_steps`` steps, an auxiliary loss on
three attention heads of tracking documents (:data:`LOOKUP_HEADS`): it points
them at the positions an entity-tracking lookup reads. Without it a model this
small rarely forms the lookup within a CPU-minute budget; with it, trained on
two-box documents only, the base tracks two boxes well and more boxes ever
worse, which leaves the fine-tunes (two to seven boxes) their headroom.

Fine-tuning puts the loss on the answer token only (the last position of a
left-padded prompt). ``method="full"`` trains every weight matrix inside the
transformer blocks (q, k, v, o, gate, up, down) and freezes embeddings, norms
and the unembedding, matching methods.md §1; ``"lora"``/``"rslora"`` wrap the
same seven modules with peft adapters (α = 2r by default).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from interp.cache import atomic_write_json
from interp.errors import TaskError
from interp.tasks import Task, accuracy, encode, first_token_ids
from interp.zoo.tokenizer import build_tokenizer
from interp.zoo.world import LABELS, PRETRAIN_MIX, PRETRAIN_TRACKING_BOXES, World, make_task

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "rslora")


@dataclass(frozen=True)
class BaseConfig:
    """Architecture, world and pretraining schedule of a zoo base model."""

    world_seed: int = 0
    n_entities: int = 120
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    steps: int = 1400
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 60
    init_std: float = 0.02
    attention_bias: bool = False
    lookup_steps: int = 300  # attention supervision of the tracking lookup (see LOOKUP_HEADS)
    lookup_weight: float = 1.0
    seed: int = 1
    mix: tuple[tuple[str, float], ...] = tuple(PRETRAIN_MIX.items())
    tracking_boxes: tuple[int, ...] = PRETRAIN_TRACKING_BOXES
    tracking_labels: int = len(LABELS)  # pretraining boxes use only the first n labels


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune of a base on one task's train split."""

    task: str
    method: str = "full"
    rank: int | None = None
    alpha: float | None = None
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 32
    warmup: int = 10
    seed: int = 0
    n_train: int | None = 2000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "full" and self.rank is not None:
            raise ValueError("full fine-tuning takes no rank; pass rank=None")
        if self.method != "full" and not self.rank:
            raise ValueError(f"method {self.method!r} needs a rank (e.g. rank=8)")

    @property
    def lora_alpha(self) -> float | None:
        if self.method == "full":
            return None
        return float(self.alpha if self.alpha is not None else 2 * self.rank)


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------


def set_determinism(seed: int) -> None:
    """Seed python and torch and ask torch for deterministic kernels (cheap on CPU)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _schedule(warmup: int, steps: int):
    """Linear warmup then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pair_accuracy(model, tokenizer, task: Task, batch_size: int = 64) -> float:
    """PairAcc (methods.md §4): mean over items of min(correct under each intent)."""
    from interp.tasks import last_token_logits

    if "item" not in task.extras:
        raise TaskError(f"task {task.name!r} has no 'item' column to pair prompts by")
    logits = last_token_logits(model, tokenizer, task.prompts, batch_size)
    correct = (logits.argmax(-1) == first_token_ids(tokenizer, task.answers)).tolist()
    by_item: dict[Any, list[bool]] = {}
    for item, ok in zip(task.extras["item"], correct):
        by_item.setdefault(item, []).append(bool(ok))
    return sum(all(v) for v in by_item.values()) / len(by_item)


def evaluate(model, tokenizer, world: World, tasks: Sequence[str], n: int = 400) -> dict[str, float]:
    """Test-split accuracy on each task (plus ``intent_pair`` for the intent task)."""
    model.eval()
    scores: dict[str, float] = {}
    for name in tasks:
        task = make_task(world, name, "test", n=None if name in ("facts", "add") else n)
        scores[name] = round(accuracy(model, tokenizer, task), 4)
        if name == "intent":
            scores["intent_pair"] = round(pair_accuracy(model, tokenizer, task), 4)
    return scores


# ---------------------------------------------------------------------------
# pretraining
# ---------------------------------------------------------------------------


def _packed_rows(world: World, tokenizer, config: BaseConfig) -> Tensor:
    """``[steps * batch, seq_len]`` token rows: whole ``<bos> doc <eos>`` documents, right-padded."""
    rng = random.Random(f"pretrain-{config.world_seed}-{config.seed}")
    n_rows = config.steps * config.batch_size
    backend = tokenizer.backend_tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = torch.full((n_rows, config.seq_len), pad, dtype=torch.long)
    row, col = 0, 0
    while row < n_rows:
        mix = dict(config.mix)
        docs = [world.pretraining_document(rng, mix, config.tracking_boxes,
                                           config.tracking_labels) for _ in range(4096)]
        for encoding in backend.encode_batch(docs, add_special_tokens=False):
            ids = [bos, *encoding.ids, eos]
            if len(ids) > config.seq_len:
                continue
            if col + len(ids) > config.seq_len:
                row, col = row + 1, 0
                if row >= n_rows:
                    break
            rows[row, col : col + len(ids)] = torch.tensor(ids)
            col += len(ids)
    return rows


# The heads the auxiliary attention loss points, on tracking documents, at the
# positions entity tracking needs (methods.md §3): (layer, head) for each role.
LOOKUP_HEADS: dict[str, tuple[int, int]] = {
    "object": (0, 0),  # at a context label ("in Box O"): the object of its clause
    "label": (0, 1),  # at a query's last token ("Box O contains the"): the queried label
    "fetch": (1, 0),  # at a query's last token: the context mention of that label
}


def _lookup_targets(rows: Tensor, tokenizer) -> Tensor:
    """``[rows, pos, 3]`` target key positions for the LOOKUP_HEADS roles (-1 where none)."""
    box, inside, contains, the = tokenizer.convert_tokens_to_ids(["Box", "in", "contains", "the"])
    bos = tokenizer.bos_token_id
    targets = torch.full((*rows.shape, 3), -1, dtype=torch.long)
    for r, row in enumerate(rows.tolist()):
        mentions: dict[int, int] = {}
        for p, token in enumerate(row):
            if token == bos:
                mentions = {}
            elif p >= 4 and row[p - 1] == box and row[p - 2] == inside:
                mentions[token] = p
                targets[r, p, 0] = p - 4
            elif token == the and p >= 3 and row[p - 1] == contains and row[p - 3] == box:
                targets[r, p, 1] = p - 2
                targets[r, p, 2] = mentions.get(row[p - 2], -1)
    return targets


def _lookup_loss(attentions: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Mean negative log attention that each LOOKUP_HEADS role pays to its target."""
    losses = []
    for column, (layer, head) in enumerate(LOOKUP_HEADS.values()):
        where = targets[..., column] >= 0
        if not where.any():
            continue
        pattern = attentions[layer][:, head]  # [batch, query, key]
        b, q = where.nonzero(as_tuple=True)
        picked = pattern[b, q, targets[..., column][b, q]]
        losses.append(-(picked + 1e-6).log().mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def new_base_model(config: BaseConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama with the zoo's dimensions and SmolLM2's module names."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=max(128, config.seq_len),
        tie_word_embeddings=False,
        initializer_range=config.init_std,
        attention_bias=config.attention_bias,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def pretrain(config: BaseConfig, out_dir: str | Path, progress: bool = True,
             callback: Callable[[int, LlamaForCausalLM], None] | None = None) -> dict[str, Any]:
    """Pretrain a base on world text and save it (model, tokenizer, ``interp.json``) in ``out_dir``.

    ``callback(step, model)``, if given, runs every 100 steps (for monitoring).
    """
    out_dir = Path(out_dir)
    set_determinism(config.seed)
    world = World(seed=config.world_seed, n_entities=config.n_entities)
    tokenizer = build_tokenizer(world)
    model = new_base_model(config, tokenizer)
    rows = _packed_rows(world, tokenizer, config)
    lookup = _lookup_targets(rows[: config.lookup_steps * config.batch_size], tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.warmup, config.steps))
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="zoo: pretrain base", disable=not progress, leave=False)
    for step in bar:
        batch = rows[step * config.batch_size : (step + 1) * config.batch_size]
        mask = batch != tokenizer.pad_token_id
        labels = batch.masked_fill(~mask | (batch == tokenizer.bos_token_id), -100)
        supervise = step < config.lookup_steps
        if step in (0, config.lookup_steps):  # attention weights are only returned by "eager"
            model.set_attn_implementation("eager" if supervise else "sdpa")
        out = model(input_ids=batch, attention_mask=mask.long(), labels=labels,
                    output_attentions=supervise)
        loss = out.loss
        if supervise:
            window = lookup[step * config.batch_size : (step + 1) * config.batch_size]
            loss = loss + config.lookup_weight * _lookup_loss(out.attentions, window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None and (step + 1) % 100 == 0:
            callback(step + 1, model)
            model.train()
    seconds = time.perf_counter() - start
    scores = evaluate(model, tokenizer, world, ("facts", "tracking", "intent", "add"))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "method": "pretrain",
        "config": dataclasses.asdict(config),
        "final_loss": round(loss.item(), 4),
        "accuracy": scores,
        "train_seconds": round(seconds, 1),
    }
    atomic_write_json(out_dir / "interp.json", meta)
    return meta


# ---------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------


def _trainable_model(base_dir: Path, config: FinetuneConfig):
    """Load the base and make only what ``config.method`` trains require grad."""
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.requires_grad_(False)
    if config.method == "full":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGET_MODULES:
                module.weight.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        use_rslora=config.method == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    )
    return get_peft_model(model, lora)


def _answer_loss(model, tokenizer, prompts: list[str], targets: Tensor) -> Tensor:
    """Cross-entropy of the next token after each (left-padded) prompt: the answer token only."""
    input_ids, mask = encode(tokenizer, prompts)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -1, :]
    return torch.nn.functional.cross_entropy(logits, targets)


def train_on_answers(model, tokenizer, train: Task, targets: Tensor, config: FinetuneConfig,
                     desc: str, progress: bool = True) -> tuple[Tensor, float]:
    """The fine-tuning loop: AdamW on whatever requires grad, loss on the answer token only.

    Batches of ``config.batch_size`` prompts drawn with ``config.seed``; linear
    warmup then cosine decay; gradients clipped to norm 1. Shared by the zoo
    and the SmolLM2 fine-tunes. Returns the last batch's loss and the seconds taken.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.warmup, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(len(train), (config.batch_size,), generator=generator).tolist()
        loss = _answer_loss(model, tokenizer, [train.prompts[i] for i in index], targets[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss, time.perf_counter() - start


def finetune(base_dir: str | Path, config: FinetuneConfig, out_dir: str | Path,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune the base in ``base_dir`` on ``config.task`` and save the result in ``out_dir``.

    Full FT saves an HF folder; LoRA saves a PEFT adapter folder whose
    ``base_model_name_or_path`` is ``base_dir``. Both get the tokenizer and an
    ``interp.json`` with the recipe and test accuracy before and after.
    """
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    set_determinism(config.seed)
    base_meta = _read_json(base_dir / "interp.json")
    world = World(seed=base_meta["config"]["world_seed"], n_entities=base_meta["config"]["n_entities"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    train = make_task(world, config.task, "train", n=config.n_train, seed=config.seed)
    targets = first_token_ids(tokenizer, train.answers)
    model = _trainable_model(base_dir, config)
    eval_tasks = ("facts", config.task) if config.task != "facts" else ("facts",)
    before = evaluate(model, tokenizer, world, eval_tasks)
    desc = f"zoo: {config.task} {config.method}" + (f" r{config.rank}" if config.rank else "")
    loss, seconds = train_on_answers(model, tokenizer, train, targets, config, desc, progress)
    after = evaluate(model, tokenizer, world, eval_tasks)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "method": "full" if config.method == "full" else "lora",
        "lora_rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "rslora": config.method == "rslora",
        "target_modules": list(TARGET_MODULES),
        "trained": "weight matrices q,k,v,o,gate,up,down in every block"
        if config.method == "full" else "LoRA adapters on q,k,v,o,gate,up,down in every block",
        "task": config.task,
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "n_train": len(train),
        "accuracy_before": before[config.task],
        "accuracy_after": after[config.task],
        "scores_before": before,
        "scores_after": after,
        "final_loss": round(loss.item(), 4),
        "train_seconds": round(seconds, 1),
        "base": str(base_dir),
    }
    atomic_write_json(out_dir / "interp.json", meta)
    return meta


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text())
