"""interp: find out what fine-tuning changed inside a language model.

The public surface, re-exported explicitly. A *pair* (base + fine-tuned) goes
in; an analysis returns a result with a tidy ``.table``; ``interp.plots``
turns results into figures.
"""

from interp.errors import (
    AdapterMismatchError,
    ArchitectureMismatchError,
    CheckpointError,
    InterpError,
    NonFiniteWeightError,
    TaskError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from interp.analysis.weight_change import WeightChange, weight_change
from interp.pairs import ModelPair, load_pair
from interp.tasks import Task

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "ArchitectureMismatchError",
    "CheckpointError",
    "InterpError",
    "ModelPair",
    "NonFiniteWeightError",
    "Task",
    "TaskError",
    "TokenizerMismatchError",
    "UnsupportedArchitectureError",
    "WeightChange",
    "load_pair",
    "weight_change",
]
