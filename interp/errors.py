"""Error types raised by interp.

Every error names what mismatched and, where there is one, how to fix it.
"""

from __future__ import annotations


class InterpError(Exception):
    """Base class for every error interp raises on bad input."""


class CheckpointError(InterpError):
    """A checkpoint is missing, truncated, unreadable or of an unknown form."""


class ArchitectureMismatchError(InterpError):
    """Base and fine-tuned checkpoints do not share an architecture or tensor shapes."""


class AdapterMismatchError(InterpError):
    """A PEFT adapter does not fit the base model it is applied to."""


class NonFiniteWeightError(InterpError):
    """A weight tensor holds NaN or Inf values."""


class TokenizerMismatchError(InterpError):
    """Two models that must share a tokenizer do not."""


class TaskError(InterpError):
    """A task's prompts or answers are unusable for the requested analysis."""


class UnsupportedArchitectureError(InterpError):
    """interp has no table entry mapping this architecture's weights to canonical names."""


class GraftError(InterpError, ValueError):
    """Bad options for a grafting analysis (sparsity, eligible tensors, steps)."""


class MaskMismatchError(GraftError):
    """A mask was learned on another pair (different tensors, shapes or weights)."""


class LayerRangeError(InterpError, ValueError):
    """A layer index outside the model's blocks."""
