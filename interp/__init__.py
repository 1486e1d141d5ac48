"""interp: find out what fine-tuning changed inside a language model.

The public surface, re-exported explicitly. A *pair* (base + fine-tuned) goes
in; an analysis returns a result with a tidy ``.table``; ``interp.plots``
turns results into figures.
"""

from interp.analysis.circuits import CmapTable, Faithfulness, cmap, faithfulness, path_patch
from interp.analysis.context import ContextKnob, Separation, context_knob
from interp.analysis.context_task import PairAcc, bare_task, intent_task, pair_acc
from interp.analysis.context_transfer import KnobTransfer, knob_transfer, steering_sweep
from interp.analysis.grafting import graft, skill_mask, skill_masks
from interp.analysis.grafting_eval import (
    GraftEvaluation,
    MaskOverlap,
    graft_evaluation,
    mask_overlap,
)
from interp.analysis.grafting_mask import GraftMask
from interp.analysis.intruders import IntruderReport, intruder_dimensions
from interp.analysis.intruders_mitigation import (
    IntruderTradeoff,
    intruder_tradeoff,
    scale_intruders,
)
from interp.analysis.layer_search import LayerSearch, layer_search
from interp.analysis.patching import PatchResult, patch
from interp.analysis.weight_change import WeightChange, weight_change
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
from interp.pairs import ModelPair, load_pair
from interp.tasks import Task

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "ArchitectureMismatchError",
    "CheckpointError",
    "CmapTable",
    "ContextKnob",
    "Faithfulness",
    "GraftEvaluation",
    "GraftMask",
    "InterpError",
    "IntruderReport",
    "IntruderTradeoff",
    "KnobTransfer",
    "LayerSearch",
    "MaskOverlap",
    "ModelPair",
    "NonFiniteWeightError",
    "PairAcc",
    "PatchResult",
    "Separation",
    "Task",
    "TaskError",
    "TokenizerMismatchError",
    "UnsupportedArchitectureError",
    "WeightChange",
    "bare_task",
    "cmap",
    "context_knob",
    "faithfulness",
    "graft",
    "graft_evaluation",
    "intent_task",
    "intruder_dimensions",
    "intruder_tradeoff",
    "knob_transfer",
    "layer_search",
    "load_pair",
    "mask_overlap",
    "pair_acc",
    "patch",
    "path_patch",
    "scale_intruders",
    "skill_mask",
    "skill_masks",
    "steering_sweep",
    "weight_change",
]
