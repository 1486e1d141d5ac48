"""The built-in model zoo: a tiny Llama pretrained on a procedural world, and its fine-tunes.

Everything is trained here, offline, into the interp cache (``$INTERP_CACHE``)::

    import interp.zoo as zoo
    zoo.build()                                   # builds what is missing (~minutes once)
    zoo.tasks()                                   # ['add', 'facts', 'intent', 'intent_bare', 'tracking']
    task = zoo.task("tracking")                   # an interp.tasks.Task (test split)
    pair = zoo.pair("tracking", "lora", rank=8)   # an interp.pairs.ModelPair

Fine-tunes are named by task and method: ``method`` is ``"full"``, ``"lora"``
(α = 2r) or ``"rslora"``, with ``rank`` for the last two.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from interp.tasks import Task
from interp.zoo.catalog import (
    FINETUNES,
    ZOO_VERSION,
    build,
    metadata,
    path_of,
    recipe_name,
    recipes,
)
from interp.zoo.world import TASKS, World, make_task

__all__ = [
    "FINETUNES",
    "ZOO_VERSION",
    "World",
    "base_path",
    "build",
    "describe",
    "finetune_path",
    "finetunes",
    "metadata",
    "pair",
    "pretraining_text",
    "recipes",
    "summary",
    "task",
    "tasks",
    "tokenizer",
    "world",
]


@lru_cache(maxsize=4)
def world(seed: int | None = None) -> World:
    """The world the default zoo base was pretrained on (or another seed's)."""
    base = recipes()["base"].base
    return World(seed=base.world_seed if seed is None else seed, n_entities=base.n_entities)


def tasks() -> list[str]:
    """Names of the tasks :func:`task` can build."""
    return sorted(TASKS)


def task(name: str, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """Task ``name`` on the zoo's world; ``train`` and ``test`` splits never share an item."""
    return make_task(world(), name, split=split, n=n, seed=seed)


def pretraining_text(n: int = 512, seed: int = 1_000_003) -> list[str]:
    """Held-out documents from the base's pretraining mixture (for a pretraining-loss measure)."""
    return world().pretraining_text(n=n, seed=seed)


def tokenizer():
    """The zoo's word-level tokenizer (the same one saved in every zoo folder)."""
    from interp.zoo.tokenizer import build_tokenizer

    return build_tokenizer(world())


def finetunes() -> list[dict[str, Any]]:
    """The shipped fine-tunes as ``{"task", "method", "rank"}`` dicts."""
    return [{"task": t, "method": m, "rank": r} for t, m, r in FINETUNES]


def base_path(build_if_missing: bool = True) -> Path:
    """Folder of the zoo's base model (an ordinary HF checkpoint with its tokenizer)."""
    if build_if_missing:
        build(["base"], progress=True)
    return path_of("base")


def finetune_path(task: str, method: str, rank: int | None = None,
                  build_if_missing: bool = True) -> Path:
    """Folder of a fine-tune: an HF checkpoint (full) or a PEFT adapter folder (lora, rslora)."""
    name = recipe_name(task, method, rank)
    if name not in recipes():
        known = ", ".join(f"({t!r}, {m!r}, {r})" for t, m, r in FINETUNES)
        raise KeyError(f"the zoo has no fine-tune ({task!r}, {method!r}, {rank}); it has {known}")
    if build_if_missing:
        build([name], progress=True)
    return path_of(name)


def pair(task: str, method: str, rank: int | None = None):
    """The (base, fine-tune) pair as an ``interp.pairs.ModelPair``, building it if missing."""
    from interp.pairs import load_pair

    finetuned = finetune_path(task, method, rank)
    label = recipe_name(task, method, rank)
    if method == "full":
        return load_pair(base_path(), finetuned, label=label)
    return load_pair(base_path(), adapter=finetuned, label=label)


def summary():
    """One row per built zoo model: method, rank, task and test accuracy before and after."""
    import pandas as pd

    rows = []
    for name, recipe in recipes().items():
        try:
            meta = metadata(name)
        except FileNotFoundError:
            continue
        if recipe.finetune is None:
            rows.append({"name": name, "method": "pretrain", **{
                f"base_{k}": v for k, v in meta["accuracy"].items()}})
            continue
        rows.append({
            "name": name,
            "task": meta["task"],
            "method": "rslora" if meta["rslora"] else meta["method"],
            "rank": meta["lora_rank"],
            "alpha": meta["lora_alpha"],
            "accuracy_before": meta["accuracy_before"],
            "accuracy_after": meta["accuracy_after"],
            "train_seconds": meta["train_seconds"],
        })
    return pd.DataFrame(rows)


def describe() -> list[str]:
    """One line per zoo model: name, built or missing, accuracies, folder (for ``interp zoo list``)."""
    lines = []
    for name, recipe in recipes().items():
        folder = path_of(name)
        if not folder.exists():
            lines.append(f"{name:<22} missing   (interp zoo build)")
            continue
        meta = metadata(name)
        if recipe.finetune is None:
            scores = " ".join(f"{k}={v:.2f}" for k, v in meta["accuracy"].items())
        else:
            scores = f"{meta['task']} {meta['accuracy_before']:.2f} -> {meta['accuracy_after']:.2f}"
        lines.append(f"{name:<22} built     {scores:<48} {folder}")
    return lines


def __getattr__(name: str):
    # The SmolLM2 case lives in interp/zoo/real.py (built separately); forward to it lazily.
    if name in ("smollm2", "real_pair"):
        from interp.zoo import real

        return getattr(real, name)
    raise AttributeError(f"module 'interp.zoo' has no attribute {name!r}")
