"""Named zoo recipes -> content-hashed checkpoint folders in the interp cache.

Each recipe (the base, or one fine-tune of it) lives at
``cache_root()/zoo/<name>-<key>`` where ``key`` hashes the recipe, the parent's
key, :data:`ZOO_VERSION`, the zoo's source files and the versions of the
libraries that produce the weights. Change any of them and the folder name
changes, so a stale model is never reused; build into a temporary folder and
rename, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from interp.cache import atomic_dir, content_key, entry

ZOO_VERSION = "zoo-1"
_SOURCES = ("world.py", "tokenizer.py", "train.py")
KIND = "zoo"


@dataclass(frozen=True)
class Recipe:
    """One buildable zoo model: the base (``finetune is None``) or a fine-tune of ``parent``."""

    name: str
    base: Any  # train.BaseConfig
    finetune: Any = None  # train.FinetuneConfig | None
    parent: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": dataclasses.asdict(self.base),
            "finetune": None if self.finetune is None else dataclasses.asdict(self.finetune),
        }


def recipe_name(task: str, method: str, rank: int | None = None) -> str:
    """Recipe name for a fine-tune: ``intent-full``, ``tracking-lora-r8``, ``intent-rslora-r64``."""
    return f"{task}-{method}" if method == "full" else f"{task}-{method}-r{rank}"


# Learning rates and steps chosen so full FT and LoRA r>=8 pass 90% on their task
# in a few seconds each; LoRA's lr is high, as in the intruder-dimension paper.
_SCHEDULES: dict[tuple[str, str], dict[str, Any]] = {
    ("intent", "full"): dict(steps=150, lr=1e-3),
    ("intent", "lora"): dict(steps=150, lr=3e-3),
    ("intent", "rslora"): dict(steps=150, lr=1e-3),
    ("tracking", "full"): dict(steps=200, lr=1e-3),
    ("tracking", "lora"): dict(steps=200, lr=3e-3),
    ("tracking", "rslora"): dict(steps=200, lr=1e-3),
    ("add", "full"): dict(steps=150, lr=1e-3),
    ("add", "lora"): dict(steps=150, lr=3e-3),
}

# (task, method, rank): the fine-tunes the zoo ships.
FINETUNES: tuple[tuple[str, str, int | None], ...] = (
    *(
        (task, method, rank)
        for task in ("intent", "tracking")
        for method, rank in (("full", None), ("lora", 1), ("lora", 8), ("lora", 64), ("rslora", 64))
    ),
    ("add", "full", None),
    ("add", "lora", 8),
)


def _configs(size: str):
    from interp.zoo.train import BaseConfig, FinetuneConfig

    if size == "default":
        return BaseConfig(), FINETUNES, lambda **kw: FinetuneConfig(**kw)
    if size == "small":  # seconds, for tests of the plumbing only; accuracies are meaningless
        small = BaseConfig(n_layers=2, d_model=64, n_heads=2, d_mlp=128, steps=30, warmup=5)
        jobs = (("intent", "full", None), ("intent", "lora", 4))
        return small, jobs, lambda **kw: FinetuneConfig(**{**kw, "steps": 5, "n_train": 64})
    raise ValueError(f"zoo config must be 'default' or 'small', got {size!r}")


def recipes(config: str = "default") -> dict[str, Recipe]:
    """Every recipe of a zoo config, the base first."""
    base, jobs, make = _configs(config)
    out = {"base": Recipe("base", base)}
    for task, method, rank in jobs:
        schedule = _SCHEDULES.get((task, method), {})
        finetune = make(task=task, method=method, rank=rank, **schedule)
        name = recipe_name(task, method, rank)
        out[name] = Recipe(name, base, finetune, parent="base")
    return out


def _source_digest() -> str:
    here = Path(__file__).parent
    return content_key(*[(here / name).read_bytes() for name in _SOURCES])


def _library_versions() -> dict[str, str]:
    import peft
    import tokenizers
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, transformers, peft, tokenizers)}


def recipe_key(recipe: Recipe, config: str = "default") -> str:
    """Content key of a recipe: itself, its parent's key, the zoo version and sources."""
    parent = None
    if recipe.parent is not None:
        parent = recipe_key(recipes(config)[recipe.parent], config)
    return content_key(recipe.as_dict(), parent, ZOO_VERSION, _source_digest(), _library_versions())


def path_of(name: str, config: str = "default") -> Path:
    """Cache folder of recipe ``name`` (it may not be built yet)."""
    table = recipes(config)
    if name not in table:
        raise KeyError(f"no zoo recipe {name!r}; known: {', '.join(table)}")
    prefix = name if config == "default" else f"{config}-{name}"
    return entry(KIND, f"{prefix}-{recipe_key(table[name], config)}")


def _build_one(recipe: Recipe, folders: dict[str, Path], progress: bool) -> Path:
    from interp.zoo.train import finetune, pretrain

    final = folders[recipe.name]
    if final.exists():
        return final
    with atomic_dir(final) as tmp:
        if recipe.finetune is None:
            pretrain(recipe.base, tmp, progress=progress)
        else:
            finetune(folders[recipe.parent], recipe.finetune, tmp, progress=progress)
    return final


def build(names: Iterable[str] | None = None, config: str = "default",
          progress: bool = True) -> dict[str, Path]:
    """Build every missing recipe in ``names`` (default: all), parents first; return their folders.

    Keys are computed once, before anything is trained, so a source edit in
    mid-build cannot give a fine-tune a parent other than the one it names.
    A second call finds everything in place and touches no file.
    """
    table = recipes(config)
    wanted = list(table) if names is None else list(names)
    for name in wanted:
        if name not in table:
            raise KeyError(f"no zoo recipe {name!r}; known: {', '.join(table)}")
    order = [n for n in table if n in wanted or any(table[w].parent == n for w in wanted)]
    folders = {name: path_of(name, config) for name in order}
    missing = [n for n in order if not folders[n].exists()]
    start = time.perf_counter()
    bar = tqdm(missing, desc="zoo build", disable=not progress or not missing, unit="model")
    for name in bar:
        bar.set_postfix_str(name)
        _build_one(table[name], folders, progress)
    if missing and progress:
        tqdm.write(f"zoo: built {len(missing)} model(s) in {time.perf_counter() - start:.0f} s")
    return folders


def metadata(name: str, config: str = "default") -> dict[str, Any]:
    """The ``interp.json`` of a built recipe."""
    path = path_of(name, config) / "interp.json"
    if not path.exists():
        raise FileNotFoundError(f"zoo model {name!r} is not built yet; run interp.zoo.build()")
    return json.loads(path.read_text())
