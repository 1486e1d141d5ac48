"""The built-in zoo: what the issue promises of it, measured on the models themselves.

Accuracies are recomputed here from the saved checkpoints (not read back from
the metadata the build wrote), so a broken save or a stale cache fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from interp import zoo
from interp.pairs import load_pair
from interp.tasks import accuracy
from interp.zoo.catalog import FINETUNES, build, path_of, recipe_name

# Full FT and LoRA r >= 8 must reach this on the analyses' two tasks (the issue's bar).
STRONG = 0.90
STRONG_TASKS = ("intent", "tracking")
# Every fine-tune, LoRA r=1 included, must close at least this share of the base's gap to a
# perfect score (the base tracks 84% already, so "well above" is measured against the headroom).
HEADROOM_CLOSED = 0.5


def _test_task(name: str):
    """The test split the build scored (interp.zoo.train.evaluate: all of facts/add, 400 else)."""
    return zoo.task(name, "test", n=None if name in ("facts", "add") else 400)


@pytest.fixture(scope="module")
def base_model(zoo_ready):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = zoo.base_path()
    return LlamaForCausalLM.from_pretrained(folder).eval(), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def base_scores(base_model):
    model, tokenizer = base_model
    return {name: accuracy(model, tokenizer, _test_task(name))
            for name in ("facts", "tracking", "intent", "add")}


def test_base_recalls_facts(base_scores):
    assert base_scores["facts"] >= 0.90


def test_base_tracks_entities_only_partly(base_scores):
    task = _test_task("tracking")
    chance = sum(task.extras["chance"]) / len(task)
    assert chance + 0.1 < base_scores["tracking"] < 0.95


@pytest.mark.parametrize("task,method,rank", [f for f in FINETUNES], ids=lambda v: str(v))
def test_finetune_learns_its_task(zoo_ready, base_scores, task, method, rank):
    pair = zoo.pair(task, method, rank)
    score = accuracy(pair.model("finetuned"), pair.tokenizer, _test_task(task))
    meta = zoo.metadata(recipe_name(task, method, rank))
    assert abs(score - meta["accuracy_after"]) < 1e-3, "metadata disagrees with the saved weights"
    base = base_scores[task]
    assert score >= base + HEADROOM_CLOSED * (1 - base)
    if task in STRONG_TASKS and (method == "full" or rank >= 8):
        assert score >= STRONG
    assert {"method", "lora_rank", "lora_alpha", "task", "steps", "lr", "seed",
            "accuracy_before", "accuracy_after"} <= set(meta)


def test_zoo_pair_is_what_load_pair_loads(zoo_ready):
    pair = zoo.pair("intent", "lora", 8)
    again = load_pair(zoo.base_path(), adapter=zoo.finetune_path("intent", "lora", 8))
    assert pair.lora_rank == again.lora_rank == 8
    for name in pair.matrix_names()[:7]:
        assert torch.equal(pair.finetuned_matrix(name), again.finetuned_matrix(name))
    full = zoo.pair("intent", "full")
    again = load_pair(zoo.base_path(), zoo.finetune_path("intent", "full"))
    name = full.matrix_names()[-1]
    assert torch.equal(full.delta(name), again.delta(name))


def test_unknown_finetune_is_a_clear_error():
    with pytest.raises(KeyError, match="no fine-tune"):
        zoo.finetune_path("intent", "lora", 3, build_if_missing=False)


def _weights(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def test_small_zoo_is_deterministic_and_a_rebuild_is_a_noop(tmp_path, monkeypatch):
    """Same recipe, two empty caches -> byte-identical weights; a second build touches nothing."""
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "a"))
    first = build(config="small", progress=False)
    stamps = {n: os.stat(f / "interp.json").st_mtime_ns for n, f in first.items()}
    assert build(config="small", progress=False) == first
    assert {n: os.stat(f / "interp.json").st_mtime_ns for n, f in first.items()} == stamps
    assert not list((tmp_path / "a").rglob("*.tmp*")), "a finished build leaves no temp folder"

    # The second build runs from a caller on another thread count (as a test session pinned to
    # one thread is): recipes train on their own fixed counts, so the weights are the same.
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "b"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        second = build(config="small", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert [f.name for f in second.values()] == [f.name for f in first.values()]
    for name in first:
        assert _weights(first[name]) == _weights(second[name]), name
    assert path_of("base", "small").parent == tmp_path / "b" / "zoo"
