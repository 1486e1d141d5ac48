"""load_pair and ModelPair on tiny checkpoints written to a temp folder, in every accepted form."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from interp import load_pair
from interp.errors import (
    AdapterMismatchError,
    ArchitectureMismatchError,
    CheckpointError,
    NonFiniteWeightError,
    TokenizerMismatchError,
)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny.llama(seed=0)
    tiny.save(base, root / "base")
    tiny.save(tiny.perturbed(base), root / "ft")
    tiny.lora_adapter(root / "base", root / "lora", r=4, alpha=8)
    tiny.lora_adapter(root / "base", root / "rslora", r=4, alpha=8, rslora=True)
    return root


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny.gpt2(seed=0)
    tiny.save(base, root / "base")
    tiny.save(tiny.perturbed(base), root / "ft")
    tiny.lora_adapter(root / "base", root / "lora", r=2, alpha=4)
    return root


def test_full_pair_matrices_are_the_checkpoint_weights(llama_pair):
    pair = load_pair(llama_pair / "base", llama_pair / "ft")
    base = tiny.llama(seed=0)
    ft = tiny.perturbed(base)
    names = [name for name, _, _ in pair.matrices()]
    assert len(names) == 2 * 7 and names[0] == "blocks.0.attn.q" and names[-1] == "blocks.1.mlp.down"
    for name, w0, wt in pair.matrices():
        layer = int(name.split(".")[1])
        module = name.split(".")[-1]
        group = "self_attn" if module in "qkvo" else "mlp"
        hf = f"model.layers.{layer}.{group}.{module}_proj.weight"
        assert torch.equal(w0, base.state_dict()[hf])
        assert torch.equal(wt, ft.state_dict()[hf])
        assert torch.equal(pair.delta(name), wt - w0)
    assert pair.method == "full" and pair.label == "full FT"


def test_gpt2_conv1d_is_transposed_and_split_into_q_k_v(gpt2_pair):
    pair = load_pair(gpt2_pair / "base", gpt2_pair / "ft")
    model = tiny.gpt2(seed=0)
    x = torch.randn(5, 32)
    attn = model.transformer.h[1].attn
    fused = attn.c_attn(x) - attn.c_attn.bias  # [5, 3*32]
    for index, module in enumerate("qkv"):
        w = pair.base_matrix(f"blocks.1.attn.{module}")
        assert w.shape == (32, 32)
        torch.testing.assert_close(x @ w.T, fused[:, index * 32 : (index + 1) * 32])
    mlp = model.transformer.h[1].mlp
    up = pair.base_matrix("blocks.1.mlp.up")
    assert up.shape == (128, 32)  # [d_out, d_in]
    torch.testing.assert_close(x @ up.T, mlp.c_fc(x) - mlp.c_fc.bias)
    assert pair.matrix_names("mlp") == ["blocks.0.mlp.up", "blocks.0.mlp.down",
                                        "blocks.1.mlp.up", "blocks.1.mlp.down"]


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_merge_equals_peft_merge_and_unload(llama_pair, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pair = load_pair(llama_pair / "base", adapter=llama_pair / kind)
    assert pair.method == "lora" and pair.lora_rank == 4 and pair.lora_alpha == 8
    assert pair.rslora is (kind == "rslora")
    scaling = 8 / 2 if kind == "rslora" else 8 / 4
    assert pair.lora_factors("blocks.0.attn.q").scaling == pytest.approx(scaling)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_pair / "base"), llama_pair / kind
    ).merge_and_unload()
    state = reference.state_dict()
    for name, _, wt in pair.matrices():
        layer, module = int(name.split(".")[1]), name.split(".")[-1]
        group = "self_attn" if module in "qkvo" else "mlp"
        torch.testing.assert_close(wt, state[f"model.layers.{layer}.{group}.{module}_proj.weight"],
                                   atol=1e-6, rtol=0)
    merged = pair.model("finetuned")
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=1e-6, rtol=0)


def test_gpt2_lora_fan_in_fan_out_merges_like_peft(gpt2_pair):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pair = load_pair(gpt2_pair / "base", gpt2_pair / "lora")  # detected as an adapter
    assert pair.adapter is not None
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gpt2_pair / "base"), gpt2_pair / "lora"
    ).merge_and_unload()
    fused = reference.transformer.h[0].attn.c_attn.weight.T  # [3d, d]
    for index, module in enumerate("qkv"):
        torch.testing.assert_close(
            pair.finetuned_matrix(f"blocks.0.attn.{module}"), fused[index * 32 : (index + 1) * 32],
            atol=1e-6, rtol=0,
        )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_onto_a_base_matrix_already_read_gives_the_same_bits(llama_pair, gpt2_pair, kind):
    root = llama_pair if kind == "llama" else gpt2_pair
    pair = load_pair(root / "base", adapter=root / "lora")
    for name in pair.matrix_names():
        w0 = pair.base_matrix(name)
        assert torch.equal(pair.finetuned_matrix(name, base_weight=w0), pair.finetuned_matrix(name))


def test_matrices_stream_one_matrix_at_a_time(llama_pair):
    """Each yielded matrix is freed once the caller moves on: nothing accumulates."""
    pair = load_pair(llama_pair / "base", llama_pair / "lora")
    alive = []
    for _, w0, wt in pair.matrices():
        alive.append((weakref.ref(w0), weakref.ref(wt)))
        del w0, wt
        gc.collect()
        assert sum(ref() is not None for pair_refs in alive[:-1] for ref in pair_refs) == 0


def test_hooked_logits_equal_hf_and_user_model_untouched(llama_pair):
    from transformers import AutoModelForCausalLM

    pair = load_pair(llama_pair / "base", llama_pair / "lora")
    ids = torch.tensor([[1, 5, 9, 12, 7, 30]])
    for side in ("base", "finetuned"):
        hf = pair.model(side)
        with torch.no_grad():
            expected = hf(ids).logits
            got = pair.hooked(side)(ids)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    user_model = AutoModelForCausalLM.from_pretrained(llama_pair / "base").eval()
    before = {k: v.clone() for k, v in user_model.state_dict().items()}
    in_memory = load_pair(user_model, llama_pair / "ft", tokenizer=pair.tokenizer)
    with torch.no_grad():
        hooked_logits = in_memory.hooked("base")(ids)
        torch.testing.assert_close(hooked_logits, user_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert type(user_model).__name__ == "LlamaForCausalLM"
    for key, value in user_model.state_dict().items():
        assert torch.equal(value, before[key])


def test_hub_id_resolves_from_local_cache_only(llama_pair, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(llama_pair / "base", snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    pair = load_pair("someone/tiny-llama", llama_pair / "ft")
    assert torch.equal(pair.base_matrix("blocks.0.attn.q"),
                       load_pair(llama_pair / "base", llama_pair / "ft").base_matrix("blocks.0.attn.q"))
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        load_pair("someone/not-downloaded", llama_pair / "ft")


def test_bare_safetensors_state_dict_as_finetuned(llama_pair, tmp_path):
    state = load_file(llama_pair / "ft" / "model.safetensors")
    save_file(state, tmp_path / "weights.safetensors")
    pair = load_pair(llama_pair / "base", tmp_path / "weights.safetensors")
    reference = load_pair(llama_pair / "base", llama_pair / "ft")
    assert torch.equal(pair.finetuned_matrix("blocks.1.mlp.up"),
                       reference.finetuned_matrix("blocks.1.mlp.up"))


def test_metadata_file_sets_provenance(llama_pair, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(llama_pair / "ft", ft)
    (ft / "interp.json").write_text(json.dumps({"method": "full", "task": "tracking"}))
    pair = load_pair(llama_pair / "base", ft, label="mine")
    assert pair.task == "tracking" and pair.label == "mine"


# ----------------------------------------------------------------------------- bad input


def test_truncated_safetensors_is_a_checkpoint_error(llama_pair, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(llama_pair / "ft", ft)
    data = (ft / "model.safetensors").read_bytes()
    (ft / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        pair = load_pair(llama_pair / "base", ft)
        list(pair.matrices())


def test_nan_weight_is_named(llama_pair, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(llama_pair / "ft", ft)
    state = load_file(ft / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
    pair = load_pair(llama_pair / "base", ft)
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        list(pair.matrices())
    with pytest.raises(NonFiniteWeightError, match="up_proj"):
        pair.model("finetuned")


def test_adapter_for_another_width_is_rejected(tmp_path):
    tiny.save(tiny.llama(seed=0, hidden=32), tmp_path / "base")
    tiny.save(tiny.llama(seed=0, hidden=48), tmp_path / "wide")
    tiny.lora_adapter(tmp_path / "wide", tmp_path / "wide_lora")
    with pytest.raises(AdapterMismatchError, match=r"B@A is \[48, 96\] but the base weight is \[32, 64\]"):
        load_pair(tmp_path / "base", adapter=tmp_path / "wide_lora")


def test_adapter_naming_another_base_warns(llama_pair, tmp_path):
    shutil.copytree(llama_pair / "base", tmp_path / "other_base")
    with pytest.warns(UserWarning, match="says its base is"):
        load_pair(tmp_path / "other_base", adapter=llama_pair / "lora")


def test_mismatched_architectures_name_the_difference(llama_pair, gpt2_pair, tmp_path):
    with pytest.raises(ArchitectureMismatchError, match="model_type"):
        load_pair(llama_pair / "base", gpt2_pair / "ft")
    tiny.save(tiny.llama(seed=0, layers=3), tmp_path / "deeper")
    with pytest.raises(ArchitectureMismatchError, match="num_hidden_layers"):
        load_pair(llama_pair / "base", tmp_path / "deeper")


def test_missing_files_are_checkpoint_errors(llama_pair, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pair(tmp_path / "nowhere", llama_pair / "ft")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pair(empty, llama_pair / "ft")
    with pytest.raises(CheckpointError, match="exactly|one of them"):
        load_pair(llama_pair / "base")
    broken = tmp_path / "broken"
    shutil.copytree(llama_pair / "ft", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pair(llama_pair / "base", broken)


def test_different_tokenizers_are_rejected_when_shared_one_is_needed(llama_pair, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(llama_pair / "ft", ft)
    tiny.word_tokenizer(ft, [f"x{i}" for i in range(60)])
    pair = load_pair(llama_pair / "base", ft)  # weight-space work needs no tokenizer
    assert len(list(pair.matrices())) == 14
    with pytest.raises(TokenizerMismatchError, match="only in base"):
        pair.tokenizer


def test_float64_option(llama_pair):
    pair = load_pair(llama_pair / "base", llama_pair / "lora", dtype=torch.float64)
    name, w0, wt = next(pair.matrices())
    assert w0.dtype == wt.dtype == torch.float64
    assert pair.delta(name, torch.float32).dtype == torch.float32
