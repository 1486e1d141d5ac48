"""The intent task of methods.md §4 as data, PairAcc, and the model plumbing the knob shares.

An *intent task* is an ordinary :class:`~interp.tasks.Task` whose prompts come
in pairs: the same (context, query) once with an instruction to use the
context (intent ``"ctx"``) and once with an instruction to ignore it
(``"prior"``). Extras name the pairing: ``item``, ``intent``, ``ctx_answer``,
``prior_answer`` (the zoo's ``interp.zoo.task("intent")`` has exactly these).
A *bare* task has one prompt per item with no instruction at all (the zoo's
``"intent_bare"``); the knob steers it.

:func:`prepare_intent` / :func:`prepare_bare` turn either into aligned tensors,
dropping items whose two answers share a first token (and counting them):
such an item cannot tell context from prior at the first token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from interp.errors import CheckpointError, TaskError
from interp.results import Result
from interp.tasks import Task, first_token_ids

INTENTS = ("ctx", "prior")
#: The zoo's prompt format (``interp.zoo.world.World.intent_prompt``), as a template.
ZOO_TEMPLATE = ("Context: {context} Query: {query} Instruction: consider the context: "
                "{instruction}")
ZOO_BARE_TEMPLATE = "Context: {context} Query: {query} Answer:"
#: The zoo's two instructions: one word, the prompt's last token (see interp.zoo.world).
ZOO_INSTRUCTIONS = {"ctx": "Only", "prior": "Never"}
_REQUIRED = ("item", "intent", "ctx_answer", "prior_answer")


# ---------------------------------------------------------------------------
# building tasks from a user's items
# ---------------------------------------------------------------------------


def _as_item(raw: Any, index: int) -> tuple[str, str, str, str]:
    if isinstance(raw, Mapping):
        try:
            return (raw["context"], raw["query"], raw["ctx_answer"], raw["prior_answer"])
        except KeyError as missing:
            raise TaskError(f"item {index} lacks key {missing}; items need context, query, "
                            "ctx_answer, prior_answer") from None
    values = tuple(raw)
    if len(values) != 4:
        raise TaskError(f"item {index} has {len(values)} fields; expected "
                        "(context, query, ctx_answer, prior_answer)")
    return values  # type: ignore[return-value]


def _spaced(answer: str, prefix: str) -> str:
    return answer if not prefix or answer.startswith(prefix) else prefix + answer


def intent_task(
    items: Iterable[Any],
    *,
    template: str = ZOO_TEMPLATE,
    instructions: Mapping[str, str] | None = None,
    answer_prefix: str = " ",
    name: str = "intent",
) -> Task:
    """Both intents of every ``(context, query, ctx_answer, prior_answer)`` item, in adjacent pairs.

    ``template`` holds ``{context}``, ``{instruction}`` and ``{query}`` (default:
    the zoo's format); ``instructions`` maps ``"ctx"``/``"prior"`` to the
    instruction text. Answers get ``answer_prefix`` (a leading space) when they
    lack it, so they continue the prompt as written. The counterfactual of each
    prompt is the same item with the other intent.
    """
    instructions = dict(instructions or ZOO_INSTRUCTIONS)
    if set(instructions) != set(INTENTS):
        raise TaskError(f"instructions must have keys {INTENTS}, got {sorted(instructions)}")
    for field_name in ("{context}", "{instruction}", "{query}"):
        if field_name not in template:
            raise TaskError(f"template {template!r} lacks {field_name}")
    prompts, answers, cf_prompts, cf_answers = [], [], [], []
    extras: dict[str, list[Any]] = {k: [] for k in (*_REQUIRED, "context", "query")}
    for index, raw in enumerate(items):
        context, query, ctx_answer, prior_answer = _as_item(raw, index)
        answer = {"ctx": _spaced(ctx_answer, answer_prefix),
                  "prior": _spaced(prior_answer, answer_prefix)}
        text = {i: template.format(context=context, instruction=instructions[i], query=query)
                for i in INTENTS}
        for intent, opposite in (("ctx", "prior"), ("prior", "ctx")):
            prompts.append(text[intent])
            answers.append(answer[intent])
            cf_prompts.append(text[opposite])
            cf_answers.append(answer[opposite])
            extras["item"].append(f"{index}: {query} | {context}")
            extras["intent"].append(intent)
            extras["ctx_answer"].append(answer["ctx"])
            extras["prior_answer"].append(answer["prior"])
            extras["context"].append(context)
            extras["query"].append(query)
    if not prompts:
        raise TaskError("intent_task got no items")
    return Task(name=name, prompts=prompts, answers=answers, counterfactual_prompts=cf_prompts,
                counterfactual_answers=cf_answers, extras=extras,
                description="answer from the context or from memory, as the instruction says")


def bare_task(
    items: Iterable[Any],
    *,
    template: str = ZOO_BARE_TEMPLATE,
    answer_prefix: str = " ",
    name: str = "intent_bare",
) -> Task:
    """One prompt per item with no instruction (for steering); ``answers`` are the context's."""
    prompts, extras = [], {k: [] for k in ("item", "ctx_answer", "prior_answer")}
    for index, raw in enumerate(items):
        context, query, ctx_answer, prior_answer = _as_item(raw, index)
        prompts.append(template.format(context=context, query=query))
        extras["item"].append(f"{index}: {query} | {context}")
        extras["ctx_answer"].append(_spaced(ctx_answer, answer_prefix))
        extras["prior_answer"].append(_spaced(prior_answer, answer_prefix))
    if not prompts:
        raise TaskError("bare_task got no items")
    return Task(name=name, prompts=prompts, answers=list(extras["ctx_answer"]), extras=extras,
                description="context QA without an instruction; read ctx_answer / prior_answer")


# ---------------------------------------------------------------------------
# validated, aligned views
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IntentData:
    """An intent task aligned by item: ``ctx_prompts[i]`` and ``prior_prompts[i]`` are item i."""

    items: list[str]
    ctx_prompts: list[str]
    prior_prompts: list[str]
    ctx_ids: Tensor    # [n_items] first token of the context answer
    prior_ids: Tensor  # [n_items] first token of the prior answer
    n_shared_first_token: int  # items dropped: both answers start with the same token
    n_unpaired: int            # items dropped: only one intent present

    def __len__(self) -> int:
        return len(self.items)

    def prompts(self, intent: str) -> list[str]:
        return self.ctx_prompts if intent == "ctx" else self.prior_prompts

    def answer_ids(self, intent: str) -> Tensor:
        return self.ctx_ids if intent == "ctx" else self.prior_ids

    def subset(self, index: Sequence[int]) -> IntentData:
        index = list(index)
        return dataclasses.replace(
            self, items=[self.items[i] for i in index],
            ctx_prompts=[self.ctx_prompts[i] for i in index],
            prior_prompts=[self.prior_prompts[i] for i in index],
            ctx_ids=self.ctx_ids[index], prior_ids=self.prior_ids[index])


@dataclass(frozen=True)
class BareData:
    """A bare (no-instruction) task: one prompt per item and both candidate answers."""

    items: list[str]
    prompts: list[str]
    ctx_ids: Tensor    # [n_items]
    prior_ids: Tensor  # [n_items]
    n_shared_first_token: int

    def __len__(self) -> int:
        return len(self.items)


def _require_extras(task: Task, needed: Sequence[str]) -> None:
    missing = [k for k in needed if k not in task.extras]
    if missing:
        raise TaskError(
            f"task {task.name!r} lacks extras {missing}; an intent task needs {list(needed)} "
            "(build one with interp.analysis.context_task.intent_task or take the zoo's 'intent')"
        )


def prepare_intent(task: Task, tokenizer) -> IntentData:
    """Align an intent task by item, check both intents are there, drop unusable items."""
    _require_extras(task, _REQUIRED)
    intents = set(task.extras["intent"])
    unknown = intents - set(INTENTS)
    if unknown:
        raise TaskError(f"task {task.name!r} has intents {sorted(unknown)}; use 'ctx' and 'prior'")
    if len(intents) < 2:
        (only,) = intents
        raise TaskError(
            f"task {task.name!r} has only intent {only!r} ({len(task)} prompts); the knob is the "
            "difference between the two intents, so every item needs a 'ctx' and a 'prior' prompt"
        )
    by_item: dict[Any, dict[str, int]] = {}
    for position, (item, intent) in enumerate(zip(task.extras["item"], task.extras["intent"])):
        by_item.setdefault(item, {})[intent] = position
    paired = [(item, slots) for item, slots in by_item.items() if len(slots) == 2]
    n_unpaired = len(by_item) - len(paired)
    if not paired:
        raise TaskError(f"task {task.name!r}: no item has both a 'ctx' and a 'prior' prompt")
    ctx_ans = first_token_ids(tokenizer, [task.extras["ctx_answer"][s["ctx"]] for _, s in paired])
    prior_ans = first_token_ids(tokenizer,
                                [task.extras["prior_answer"][s["ctx"]] for _, s in paired])
    keep = (ctx_ans != prior_ans).tolist()
    if not any(keep):
        raise TaskError(f"task {task.name!r}: every item's two answers share a first token")
    kept = [p for p, k in zip(paired, keep) if k]
    return IntentData(
        items=[str(item) for item, _ in kept],
        ctx_prompts=[task.prompts[s["ctx"]] for _, s in kept],
        prior_prompts=[task.prompts[s["prior"]] for _, s in kept],
        ctx_ids=ctx_ans[torch.tensor(keep)], prior_ids=prior_ans[torch.tensor(keep)],
        n_shared_first_token=len(keep) - sum(keep), n_unpaired=n_unpaired,
    )


def prepare_bare(task: Task, tokenizer) -> BareData:
    """A bare task's prompts and both answers per item, dropping shared-first-token items."""
    _require_extras(task, ("ctx_answer", "prior_answer"))
    ctx_ans = first_token_ids(tokenizer, task.extras["ctx_answer"])
    prior_ans = first_token_ids(tokenizer, task.extras["prior_answer"])
    keep = ctx_ans != prior_ans
    if not bool(keep.any()):
        raise TaskError(f"task {task.name!r}: every item's two answers share a first token")
    items = task.extras.get("item", list(range(len(task))))
    flags = keep.tolist()
    return BareData(
        items=[str(i) for i, k in zip(items, flags) if k],
        prompts=[p for p, k in zip(task.prompts, flags) if k],
        ctx_ids=ctx_ans[keep], prior_ids=prior_ans[keep],
        n_shared_first_token=len(flags) - sum(flags),
    )


# ---------------------------------------------------------------------------
# model plumbing: resolve, encode, read logits
# ---------------------------------------------------------------------------


def resolve_model(model: Any, tokenizer: Any = None, side: str = "finetuned"):
    """(HF model in eval mode, tokenizer) from an HF model or a :class:`ModelPair` + ``side``."""
    from interp.pairs import ModelPair

    if isinstance(model, ModelPair):
        return model.model(side), tokenizer or model.tokenizer
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a Hugging Face model or a ModelPair, got {type(model).__name__}")
    if tokenizer is None:
        folder = getattr(getattr(model, "config", None), "_name_or_path", "")
        if folder and Path(folder).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            raise CheckpointError("this model carries no tokenizer; pass tokenizer=...")
    return model.eval(), tokenizer


def encode_left(tokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` ``[batch, pos]``: position −1 is the last real token."""
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers ship without one
        import copy

        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def final_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Next-token logits after each prompt, left-padded: ``[n_prompts, d_vocab]`` float32."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_left(tokenizer, prompts[start:start + batch_size])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        outputs.append(logits[:, -1, :].float().cpu())
    return torch.cat(outputs)


# ---------------------------------------------------------------------------
# PairAcc
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairAcc(Result):
    """PairAcc = mean over items of min(correct under ctx intent, correct under prior intent)."""

    value: float = float("nan")
    ctx_accuracy: float = float("nan")
    prior_accuracy: float = float("nan")
    n_items: int = 0
    n_dropped: int = 0

    summary_columns = ("item", "ctx_correct", "prior_correct", "pair_correct")

    def __float__(self) -> float:
        return float(self.value)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{"pair_acc": self.value, "ctx_acc": self.ctx_accuracy,
                              "prior_acc": self.prior_accuracy, "n_items": self.n_items,
                              "n_dropped": self.n_dropped}])


def pair_acc_from_predictions(items: Sequence[str], ctx_pred: Tensor, prior_pred: Tensor,
                              data: IntentData | BareData, n_dropped: int,
                              options: dict[str, Any]) -> PairAcc:
    """Build a :class:`PairAcc` from predicted token ids under each intent (``[n_items]`` each)."""
    ctx_ok = ctx_pred == data.ctx_ids
    prior_ok = prior_pred == data.prior_ids
    both = ctx_ok & prior_ok
    table = pd.DataFrame({
        "item": list(items), "ctx_pred": ctx_pred.tolist(), "prior_pred": prior_pred.tolist(),
        "ctx_correct": ctx_ok.tolist(), "prior_correct": prior_ok.tolist(),
        "pair_correct": both.tolist(),
    })
    return PairAcc(table=table, options=options, value=float(both.float().mean()),
                   ctx_accuracy=float(ctx_ok.float().mean()),
                   prior_accuracy=float(prior_ok.float().mean()),
                   n_items=len(items), n_dropped=n_dropped)


def pair_acc(model, task: Task, *, tokenizer=None, side: str = "finetuned",
             batch_size: int = 64) -> PairAcc:
    """PairAcc of a model on an intent task (both intents per item, instructed).

    ``model`` is an HF model (with ``tokenizer``) or a ModelPair (``side`` picks
    which model). Items whose two answers share a first token are dropped and
    counted in ``n_dropped`` (with items missing one intent).
    """
    model, tokenizer = resolve_model(model, tokenizer, side)
    data = prepare_intent(task, tokenizer)
    ctx_pred = final_logits(model, tokenizer, data.ctx_prompts, batch_size).argmax(-1)
    prior_pred = final_logits(model, tokenizer, data.prior_prompts, batch_size).argmax(-1)
    return pair_acc_from_predictions(
        data.items, ctx_pred, prior_pred, data, data.n_shared_first_token + data.n_unpaired,
        {"task": task.name, "instructed": True, "n_shared_first_token": data.n_shared_first_token,
         "n_unpaired": data.n_unpaired})
