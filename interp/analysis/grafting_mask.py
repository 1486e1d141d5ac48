"""GraftMask: a saveable binary mask over a pair's eligible entries, with its provenance."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from interp.analysis.grafting_space import GraftSpace, MaskMismatchError, entry_modules, module_of
from interp.results import Result


@dataclasses.dataclass(frozen=True, repr=False)
class GraftMask(Result):
    """A binary mask over a pair's eligible entries, with how it was learned.

    ``indices``: {tensor name: sorted flat int64 indices of selected entries};
    ``shapes``: every eligible tensor's shape, in index order; ``provenance``:
    the pair it belongs to (label, method, rank, fingerprint); ``history``:
    one row per optimisation step. ``table``: one row per eligible tensor (and
    per q/k/v part of a fused GPT-2 ``c_attn``) with the selected count.
    """

    indices: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def __repr__(self) -> str:
        return (f"GraftMask({self.label!r}, k={self.k} of {self.n_eligible} eligible entries, "
                f"{len(self.indices)} tensors touched)")

    @property
    def k(self) -> int:
        """Number of selected entries."""
        return int(sum(len(v) for v in self.indices.values()))

    @property
    def n_eligible(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes.values()))

    @property
    def sparsity(self) -> float:
        """Actual fraction of eligible entries selected (= k / N)."""
        return self.k / self.n_eligible

    @property
    def label(self) -> str:
        return f"{self.provenance.get('label', '?')} · {self.options.get('task', '?')} · s={self.sparsity:.1e}"

    def dense(self, name: str) -> Tensor:
        """The mask of tensor ``name`` as a bool tensor of its shape."""
        mask = torch.zeros(int(np.prod(self.shapes[name])), dtype=torch.bool)
        if name in self.indices:
            mask[self.indices[name].long()] = True
        return mask.view(self.shapes[name])

    def global_indices(self) -> Tensor:
        """Selected entries as sorted indices into the flat ``[N]`` space (tensor order of ``shapes``)."""
        parts, offset = [], 0
        for name, shape in self.shapes.items():
            if name in self.indices:
                parts.append(self.indices[name].long() + offset)
            offset += int(np.prod(shape))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def location(self) -> pd.DataFrame:
        """Selected entries per (layer, module): count, share of the mask, density in the module."""
        grouped = self.table.groupby(["layer", "module"], sort=True).agg(
            selected=("selected", "sum"), numel=("numel", "sum")).reset_index()
        grouped["share"] = grouped["selected"] / max(self.k, 1)
        grouped["density"] = grouped["selected"] / grouped["numel"]
        return grouped

    def check_fits(self, space: GraftSpace, strict: bool = True) -> None:
        """Raise :class:`MaskMismatchError` unless this mask belongs to ``space``'s pair.

        Names and shapes must match; with ``strict`` the pair's fingerprint
        (hash of θ_pre and Δθ over the eligible tensors) must match too.
        """
        here = list(self.shapes)
        if here != space.names:
            missing = [n for n in here if n not in space.shapes][:3]
            extra = [n for n in space.names if n not in self.shapes][:3]
            raise MaskMismatchError(
                f"mask {self.label!r} covers {len(here)} tensors, the pair {space.pair.label!r} "
                f"has {len(space.names)} eligible; only in the mask: {missing}, only in the pair: "
                f"{extra}. It was learned on another architecture or eligible set"
            )
        for name in here:
            if list(self.shapes[name]) != list(space.shapes[name]):
                raise MaskMismatchError(
                    f"tensor {name!r} is {list(self.shapes[name])} in the mask but "
                    f"{space.shapes[name]} in the pair {space.pair.label!r}"
                )
        theirs = self.provenance.get("fingerprint")
        if strict and theirs != space.fingerprint:
            raise MaskMismatchError(
                f"mask {self.label!r} was learned on pair {self.provenance.get('label')!r} "
                f"(fingerprint {theirs}), but pair {space.pair.label!r} has fingerprint "
                f"{space.fingerprint}: same shapes, different weights. Pass strict=False to "
                "transfer the mask deliberately"
            )

    def summary(self) -> pd.DataFrame:
        best = self.history[self.history["best"]] if "best" in self.history else pd.DataFrame()
        row = {"pair": self.provenance.get("label"), "task": self.options.get("task"),
               "k": self.k, "sparsity": self.sparsity,
               "base_patch_kept": self.options.get("base_patch_kept")}
        if len(best):
            last = best.iloc[-1]
            row.update(step=int(last["step"]), train_accuracy=last["train_accuracy"],
                       val_accuracy=last["val_accuracy"])
        return pd.DataFrame([row])


def mask_table(space_names: Iterable[str], shapes: dict[str, list[int]],
               indices: dict[str, Tensor]) -> pd.DataFrame:
    """One row per eligible tensor (q/k/v parts of a fused tensor split): selected / numel."""
    rows = []
    for name in space_names:
        shape = shapes[name]
        layer, module, kind = module_of(name)
        flat = indices.get(name, torch.zeros(0, dtype=torch.long))
        if module == "qkv":
            numel = int(np.prod(shape)) // 3
            per = pd.Series(entry_modules(name, shape, flat)).value_counts() if len(flat) else {}
            for part in ("q", "k", "v"):
                rows.append({"tensor": name, "layer": layer, "module": part, "kind": kind,
                             "numel": numel, "selected": int(per.get(part, 0))})
            continue
        rows.append({"tensor": name, "layer": layer, "module": module, "kind": kind,
                     "numel": int(np.prod(shape)), "selected": len(flat)})
    table = pd.DataFrame(rows)
    table["fraction"] = table["selected"] / table["numel"]
    return table
