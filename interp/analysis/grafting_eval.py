"""What a graft keeps: accuracy and calibration against baselines, and how masks overlap.

:func:`graft_evaluation` scores each learned mask on a held-out task next to
the base patch of the same size (top-|Δθ| only), a random mask of the same
size, the full fine-tune and the base. Calibration is the expected calibration
error over ``n_bins`` equal-width bins of the top-1 softmax probability over the
whole vocabulary (confidence), against top-1 correctness (the task accuracy):
``ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b|``. :func:`mask_overlap`
compares masks of different tasks on one base (Jaccard and ``|A ∩ B| / min``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.grafting import (
    GraftMask,
    GraftSpace,
    MaskMismatchError,
    _Prompts,
    base_patch,
    check_task,
    last_logits,
    random_mask,
)
from interp.results import Result
from interp.tasks import Task

VARIANTS = ("graft", "base patch", "random", "finetuned", "base")


# --------------------------------------------------------------------------- calibration


def calibration(logits: Tensor, targets: Tensor, n_bins: int = 10) -> tuple[float, pd.DataFrame]:
    """ECE of next-token predictions and the reliability table behind it.

    ``logits`` ``[n, d_vocab]``, ``targets`` ``[n]``. Bins are equal-width on
    [0, 1] (the last closed); empty bins have NaN accuracy and confidence.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    probs = torch.softmax(logits.double(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = torch.clamp(torch.bucketize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows, ece, n = [], 0.0, len(targets)
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else float("nan")
        conf = float(confidence[inside].mean()) if count else float("nan")
        if count:
            ece += count / n * abs(acc - conf)
        rows.append({"bin": b, "low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "accuracy": acc, "confidence": conf})
    return ece, pd.DataFrame(rows)


def _metrics(logits: Tensor, targets: Tensor, n_bins: int) -> tuple[dict, pd.DataFrame]:
    logits = logits.float()
    ece, bins = calibration(logits, targets, n_bins)
    return {
        "accuracy": float((logits.argmax(-1) == targets).float().mean()),
        "nll": float(torch.nn.functional.cross_entropy(logits.double(), targets)),
        "ece": ece,
        "confidence": float(torch.softmax(logits.double(), -1).max(-1).values.mean()),
    }, bins


@torch.no_grad()
def _logits(model, params, prompts: _Prompts) -> Tensor:
    return torch.cat([last_logits(model, params, ids, mask).float()
                      for ids, mask, _ in prompts.batches])


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class GraftEvaluation(Result):
    """One row per (pair, sparsity, variant): accuracy, NLL, ECE, size; plus reliability bins.

    Variants: ``graft`` (the learned mask), ``base patch`` (top-|Δθ|, same k),
    ``random`` (uniform, same k), ``finetuned`` and ``base`` (sparsity NaN).
    ``retained`` = accuracy / fine-tune accuracy; ``gain_recovered`` =
    (accuracy − base) / (fine-tune − base); ``delta_energy`` = ‖mask ⊙ Δθ‖² /
    ‖Δθ‖² over the eligible tensors (how much of the update the mask holds).
    ``reliability``: one row per (pair, sparsity, variant, bin).
    """

    reliability: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    summary_columns = ("pair", "sparsity", "variant", "k", "accuracy", "retained", "ece")

    def summary(self) -> pd.DataFrame:
        table = self.table.copy()
        table["sparsity"] = table["sparsity"].map(lambda s: "—" if pd.isna(s) else f"{s:.0e}")
        return table[list(self.summary_columns)].head(40)

    @staticmethod
    def concat(results: Sequence[GraftEvaluation]) -> GraftEvaluation:
        """Stack evaluations of several pairs (the options of the first are kept)."""
        return GraftEvaluation(
            table=pd.concat([r.table for r in results], ignore_index=True),
            options={**results[0].options, "pairs": [r.options.get("pair") for r in results]},
            reliability=pd.concat([r.reliability for r in results], ignore_index=True),
        )

    def select(self, pairs: Sequence[str]) -> GraftEvaluation:
        """The rows of the named pairs only."""
        return dataclasses.replace(self, table=self.table[self.table["pair"].isin(pairs)],
                                   reliability=self.reliability[self.reliability["pair"].isin(pairs)])

    def pivot(self, value: str = "accuracy") -> pd.DataFrame:
        """``value`` with sparsity × variant per pair (fine-tune and base as columns too)."""
        masked = self.table[self.table["sparsity"].notna()]
        wide = masked.pivot_table(index=["pair", "sparsity"], columns="variant", values=value,
                                  sort=False)
        for variant in ("finetuned", "base"):
            refs = self.table[self.table["variant"] == variant].set_index("pair")[value]
            wide[variant] = [refs.get(p, np.nan) for p, _ in wide.index]
        return wide[[v for v in VARIANTS if v in wide.columns]]


def graft_evaluation(
    pair,
    task: Task,
    masks: GraftMask | Sequence[GraftMask],
    *,
    n_bins: int = 10,
    seed: int = 0,
    strict: bool = True,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> GraftEvaluation:
    """Score each mask's graft on ``task`` next to base patch, random mask, fine-tune and base.

    ``task`` should be held out from the prompts the masks were learned on.
    Every mask must belong to ``pair`` (checked; ``strict=False`` skips the
    weight fingerprint so a mask can be transferred on purpose). The random
    mask of each size is drawn with ``seed``.
    """
    masks = [masks] if isinstance(masks, GraftMask) else list(masks)
    if not masks:
        raise ValueError("graft_evaluation needs at least one mask")
    names = list(masks[0].shapes)
    for mask in masks[1:]:
        if list(mask.shapes) != names:
            raise MaskMismatchError(f"mask {mask.label!r} covers other tensors than {masks[0].label!r}; "
                                    "evaluate masks over different eligible sets separately")
    space = GraftSpace(pair, names, dtype)
    for mask in masks:
        mask.check_fits(space, strict=strict)
    tokenizer = pair.tokenizer
    vocab = space.model.get_output_embeddings().weight.shape[0]
    targets = check_task(tokenizer, task, vocab)
    prompts = _Prompts.build(tokenizer, task, targets, batch_size)

    rows, bins_rows = [], []

    energy = float(space.delta.double().pow(2).sum()) or 1.0

    def record(variant: str, sparsity: float, k: int, logits: Tensor,
               flat: Tensor | None = None) -> None:
        values, bins = _metrics(logits, targets, n_bins)
        share = {"finetuned": 1.0, "base": 0.0}.get(variant)
        if flat is not None:
            share = float(space.delta[flat].double().pow(2).sum()) / energy
        rows.append({"pair": pair.label, "task": task.name, "sparsity": sparsity, "variant": variant,
                     "k": k, **values, "delta_energy": share})
        bins.insert(0, "variant", variant)
        bins.insert(0, "sparsity", sparsity)
        bins.insert(0, "pair", pair.label)
        bins_rows.append(bins)

    finetuned = pair.model("finetuned", dtype=dtype)
    record("finetuned", float("nan"), int(torch.count_nonzero(space.delta)), _logits(finetuned, None, prompts))
    del finetuned
    record("base", float("nan"), 0, _logits(space.model, None, prompts))
    for mask in tqdm(masks, desc=f"graft evaluation {pair.label}", disable=not progress, leave=False):
        k = mask.k
        # the requested sparsity for exact-k masks; the actual one where the size drifted
        exact = mask.options.get("keep_size", True) and "sparsity" in mask.options
        sparsity = float(mask.options["sparsity"]) if exact else mask.sparsity
        for variant, flat in (("graft", space.from_indices(mask.indices)),
                              ("base patch", base_patch(space, k)),
                              ("random", random_mask(space, k, seed))):
            record(variant, sparsity, k, _logits(space.model, space.grafted(flat), prompts), flat)
    table = pd.DataFrame(rows)
    ft_acc = float(table.loc[table["variant"] == "finetuned", "accuracy"].iloc[0])
    base_acc = float(table.loc[table["variant"] == "base", "accuracy"].iloc[0])
    table["retained"] = table["accuracy"] / ft_acc if ft_acc > 0 else np.nan
    gain = ft_acc - base_acc
    table["gain_recovered"] = (table["accuracy"] - base_acc) / gain if gain != 0 else np.nan
    table["actual_sparsity"] = table["k"] / space.n
    options = {"pair": pair.label, "task": task.name, "n_prompts": len(task), "n_bins": n_bins,
               "seed": seed, "strict": strict, "dtype": str(dtype), "n_eligible": space.n,
               "confidence": "top-1 softmax probability over the full vocabulary"}
    return GraftEvaluation(table=table, options=options,
                           reliability=pd.concat(bins_rows, ignore_index=True))


# --------------------------------------------------------------------------- overlap


@dataclasses.dataclass(frozen=True)
class MaskOverlap(Result):
    """One row per ordered pair of masks (a, b): |a ∩ b|, Jaccard, |a ∩ b| / min(|a|, |b|).

    ``expected_intersection`` = |a|·|b| / N is what two independent random
    masks of those sizes would share, the chance level to read the rest against.
    """

    summary_columns = ("a", "b", "size_a", "size_b", "intersection", "jaccard", "overlap_min",
                       "expected_intersection")

    def summary(self) -> pd.DataFrame:
        return self.table[self.table["a"] < self.table["b"]][list(self.summary_columns)]

    def matrix(self, value: str = "jaccard") -> pd.DataFrame:
        """Square table of ``value`` (labels in input order)."""
        labels = self.options["labels"]
        return self.table.pivot(index="a", columns="b", values=value).loc[labels, labels]


def mask_overlap(masks: Mapping[str, GraftMask] | Sequence[GraftMask]) -> MaskOverlap:
    """Pairwise overlap of masks over the same eligible tensors (e.g. two tasks' fine-tunes of one base)."""
    if isinstance(masks, Mapping):
        labeled = list(masks.items())
    else:
        labeled = [(m.label, m) for m in masks]
    if len(labeled) < 1:
        raise ValueError("mask_overlap needs at least one mask")
    first_label, first = labeled[0]
    for label, mask in labeled[1:]:
        if mask.shapes != first.shapes:
            raise MaskMismatchError(
                f"masks {first_label!r} and {label!r} cover different tensors or shapes; overlap is "
                "only defined for masks over one base model's eligible set"
            )
    n = first.n_eligible
    flats = {label: mask.global_indices() for label, mask in labeled}
    rows = []
    for a, _ in labeled:
        for b, _ in labeled:
            fa, fb = flats[a], flats[b]
            inter = int(torch.isin(fa, fb).sum())
            union = len(fa) + len(fb) - inter
            rows.append({
                "a": a, "b": b, "size_a": len(fa), "size_b": len(fb), "intersection": inter,
                "union": union, "jaccard": inter / union if union else float("nan"),
                "overlap_min": inter / min(len(fa), len(fb)) if min(len(fa), len(fb)) else float("nan"),
                "expected_intersection": len(fa) * len(fb) / n,
            })
    return MaskOverlap(table=pd.DataFrame(rows),
                       options={"labels": [label for label, _ in labeled], "n_eligible": n})


def mask_location(masks: Mapping[str, GraftMask] | Sequence[GraftMask]) -> pd.DataFrame:
    """Long table: per mask, selected entries per (layer, module) with share and density."""
    labeled = list(masks.items()) if isinstance(masks, Mapping) else [(m.label, m) for m in masks]
    frames = []
    for label, mask in labeled:
        location = mask.location()
        location.insert(0, "mask", label)
        frames.append(location)
    return pd.concat(frames, ignore_index=True)
