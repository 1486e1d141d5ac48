"""The zoo's word-level tokenizer: one token per world word, so every answer is one token.

Built with ``tokenizers`` (WordLevel model, whitespace pre-tokenizer, a ``<bos>``
prepended by the post-processor) and wrapped as a ``PreTrainedTokenizerFast``
so it saves into, and loads from, an ordinary Hugging Face checkpoint folder.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from interp.zoo.world import World


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is exactly ``world.vocabulary()``."""
    vocab = {word: index for index, word in enumerate(world.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )
    return tokenizer
