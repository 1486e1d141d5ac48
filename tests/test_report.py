"""`interp report` on checkpoints written to a temp folder: a full fine-tune and a LoRA adapter."""

from __future__ import annotations

import itertools

import pytest
import tiny

from interp.cli import main
from interp.figures import gallery_files
from interp.tasks import Task


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    base = tiny.llama(seed=0)
    tiny.save(base, root / "base")
    tiny.save(tiny.perturbed(base, scale=0.05), root / "full")
    tiny.lora_adapter(root / "base", root / "lora", r=2, alpha=4)
    return root


def test_report_without_task_runs_weight_space_analyses(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", str(checkpoints / "base"), str(checkpoints / "full"),
                 str(checkpoints / "lora"), "--out", str(out)])
    assert code == 0
    page = (out / "index.html").read_text()
    assert "Intruder dimensions" in page and "LoRA r=2" in page and "full FT" in page
    files = gallery_files(out)
    assert files and all(f.exists() and f.stat().st_size > 0 for f in files)


def test_report_with_a_task_adds_accuracy_and_patching(checkpoints, tmp_path):
    words = [f"w{i}" for i in range(10, 30)]
    task = Task(
        name="toy",
        prompts=[f"w1 {a} w2 {b}" for a, b in itertools.pairwise(words)],
        answers=[f" {b}" for b in words[1:]],
        counterfactual_prompts=[f"w1 {b} w2 {a}" for a, b in itertools.pairwise(words)],
        counterfactual_answers=[f" {a}" for a in words[:-1]],
    )
    task.save(tmp_path / "task.json")
    out = tmp_path / "out"
    assert main(["report", str(checkpoints / "base"), str(checkpoints / "lora"),
                 "--task", str(tmp_path / "task.json"), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "Task accuracy" in page and "Cross-model patching" in page
    assert all(f.exists() and f.stat().st_size > 0 for f in gallery_files(out))


def test_report_rejects_bad_input_clearly(checkpoints, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), str(checkpoints / "full"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    tiny.save(tiny.llama(seed=0, hidden=48), tmp_path / "wide")
    assert main(["report", str(tmp_path / "wide"), str(checkpoints / "lora"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "different base" in capsys.readouterr().err
    assert main(["report", str(checkpoints / "base"), str(checkpoints / "full"),
                 "--task", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
