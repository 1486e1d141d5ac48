"""Checkpoints in, :class:`ModelPair` out."""

from interp.pairs.pair import ModelPair, check_same_tokenizer, load_pair
from interp.pairs.sources import Adapter, Checkpoint, LoraFactors
from interp.pairs.weights import ALL_MODULES, ARCHITECTURES, parse_canonical

__all__ = [
    "ALL_MODULES",
    "ARCHITECTURES",
    "Adapter",
    "Checkpoint",
    "LoraFactors",
    "ModelPair",
    "check_same_tokenizer",
    "load_pair",
    "parse_canonical",
]
