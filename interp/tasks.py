"""Tasks: prompt sets as data, and the few model calls every analysis shares.

A :class:`Task` is a list of prompts, each with the answer the model should
give next, optionally a counterfactual prompt (same length in tokens, used by
patching), and any per-item columns a method needs (``intent``,
``ctx_answer``, ...). Answers carry their leading space (``" apple"``) so they
continue the prompt exactly as written; the metric reads the first token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from interp.errors import TaskError


@dataclass(frozen=True)
class Task:
    """A prompt set with answers; every list has one entry per item."""

    name: str
    prompts: list[str]
    answers: list[str]
    counterfactual_prompts: list[str] | None = None
    counterfactual_answers: list[str] | None = None
    extras: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if n == 0:
            raise TaskError(f"task {self.name!r} has no prompts")
        columns = {"answers": self.answers, **self.extras}
        if self.counterfactual_prompts is not None:
            columns["counterfactual_prompts"] = self.counterfactual_prompts
        if self.counterfactual_answers is not None:
            columns["counterfactual_answers"] = self.counterfactual_answers
        for column, values in columns.items():
            if len(values) != n:
                raise TaskError(
                    f"task {self.name!r}: {column} has {len(values)} entries but there are "
                    f"{n} prompts; every column needs one entry per prompt"
                )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def table(self) -> pd.DataFrame:
        """One row per item: prompt, answer, counterfactuals and extras."""
        data: dict[str, list[Any]] = {"prompt": self.prompts, "answer": self.answers}
        if self.counterfactual_prompts is not None:
            data["counterfactual_prompt"] = self.counterfactual_prompts
        if self.counterfactual_answers is not None:
            data["counterfactual_answer"] = self.counterfactual_answers
        data.update(self.extras)
        return pd.DataFrame(data)

    def subset(self, index: Sequence[int] | slice) -> Task:
        """The items at ``index`` (a slice or a list of positions), as a new task."""
        positions = list(range(len(self)))[index] if isinstance(index, slice) else list(index)

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in positions]

        return dataclasses.replace(
            self,
            prompts=pick(self.prompts),
            answers=pick(self.answers),
            counterfactual_prompts=pick(self.counterfactual_prompts),
            counterfactual_answers=pick(self.counterfactual_answers),
            extras={k: pick(v) for k, v in self.extras.items()},
        )

    def split(self, fraction: float = 0.5) -> tuple[Task, Task]:
        """Split into (first, rest) at ``fraction`` of the items, keeping order."""
        cut = round(len(self) * fraction)
        if not 0 < cut < len(self):
            raise TaskError(f"split({fraction}) of {len(self)} items leaves an empty part")
        return self.subset(slice(0, cut)), self.subset(slice(cut, None))

    def save(self, path: str | Path) -> None:
        from interp.cache import atomic_write_json

        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Task:
        return cls(**json.loads(Path(path).read_text()))


def first_token_ids(tokenizer, texts: Sequence[str]) -> Tensor:
    """Id of the first token of each text (no special tokens): ``[len(texts)]``."""
    ids = []
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) == 0:
            raise TaskError(f"answer {text!r} tokenizes to nothing")
        ids.append(tokens[0])
    return torch.tensor(ids, dtype=torch.long)


def encode(tokenizer, prompts: Sequence[str], padding_side: str = "left") -> tuple[Tensor, Tensor]:
    """Tokenize with padding on ``padding_side``; returns (input_ids, attention_mask), ``[batch, pos]``.

    Left padding (the default) keeps position -1 the last real token of every prompt.
    """
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    return batch["input_ids"], batch["attention_mask"]


def check_same_lengths(tokenizer, prompts: Sequence[str], others: Sequence[str]) -> None:
    """Raise :class:`TaskError` naming the first pair of prompts whose token counts differ."""
    for i, (a, b) in enumerate(zip(prompts, others, strict=True)):
        na = len(tokenizer(a)["input_ids"])
        nb = len(tokenizer(b)["input_ids"])
        if na != nb:
            raise TaskError(
                f"item {i}: prompt and counterfactual tokenize to different lengths "
                f"({na} vs {nb} tokens): {a!r} vs {b!r}. Patching needs aligned positions; "
                "reword one of them or drop the item"
            )


@torch.no_grad()
def last_token_logits(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Next-token logits after each prompt, left-padded: ``[n_prompts, d_vocab]`` float32."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = encode(tokenizer, prompts[start : start + batch_size])
        device = next(model.parameters()).device
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        outputs.append(logits[:, -1, :].float().cpu())
    return torch.cat(outputs)


def accuracy(model, tokenizer, task: Task, batch_size: int = 64) -> float:
    """Fraction of prompts whose argmax next token is the answer's first token."""
    logits = last_token_logits(model, tokenizer, task.prompts, batch_size)
    targets = first_token_ids(tokenizer, task.answers)
    return float((logits.argmax(-1) == targets).float().mean())
