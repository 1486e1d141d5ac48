"""Tiny random checkpoints written to a temp folder, for loader and analysis tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(folder: Path, words: list[str] = WORDS):
    """A word-level tokenizer saved to ``folder`` and loaded back (as users have them)."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def perturbed(model, seed: int = 1, scale: float = 0.02):
    """A copy of ``model`` with small random changes to every parameter (a 'full fine-tune')."""
    import copy

    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter += scale * torch.randn_like(parameter)
    return other


def save(model, folder: Path, tokenizer_words: list[str] = WORDS) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    word_tokenizer(folder, tokenizer_words)
    return folder


def lora_adapter(base_folder: Path, out: Path, r: int = 4, alpha: float = 8, rslora: bool = False,
                 targets=None, seed: int = 3) -> Path:
    """A PEFT LoRA adapter over ``base_folder`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    is_gpt2 = base.config.model_type == "gpt2"
    if targets is None:
        targets = ["c_attn", "c_proj", "c_fc"] if is_gpt2 else [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        fan_in_fan_out=is_gpt2, init_lora_weights=True)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(out)
    return Path(out)
