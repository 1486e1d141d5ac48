"""How much each weight matrix moved: the simplest map of where fine-tuning acted."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.pairs import ModelPair, parse_canonical
from interp.results import Result


@dataclasses.dataclass(frozen=True)
class WeightChange(Result):
    """Per pair and matrix: ``‖ΔW‖_F``, ``‖ΔW‖_F / ‖W0‖_F`` and the stable rank of ΔW."""

    summary_columns = ("pair", "matrix", "relative_change", "stable_rank")

    def summary(self) -> pd.DataFrame:
        return (
            self.table.groupby("pair", sort=False)
            .agg(mean_relative_change=("relative_change", "mean"),
                 max_relative_change=("relative_change", "max"),
                 median_stable_rank=("stable_rank", "median"))
            .reset_index()
        )


def weight_change(
    pairs: ModelPair | Sequence[ModelPair],
    modules: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> WeightChange:
    """Measure every canonical matrix's update, streaming one matrix at a time.

    The stable rank ``‖ΔW‖_F² / ‖ΔW‖_2²`` is near 1 for a rank-1 update and
    grows with the number of directions the update spreads over.
    """
    pairs = [pairs] if isinstance(pairs, ModelPair) else list(pairs)
    rows = []
    for pair in pairs:
        names = pair.matrix_names(modules)
        for name, w0, wt in tqdm(pair.matrices(modules, dtype), total=len(names),
                                 desc=f"weight change {pair.label}", disable=not progress):
            delta = wt - w0
            layer, module = parse_canonical(name)
            frob = float(torch.linalg.matrix_norm(delta))
            spectral = float(torch.linalg.matrix_norm(delta, ord=2)) if frob > 0 else 0.0
            rows.append({
                "pair": pair.label, "matrix": name, "layer": layer, "module": module,
                "base_norm": float(torch.linalg.matrix_norm(w0)), "delta_norm": frob,
                "relative_change": frob / max(float(torch.linalg.matrix_norm(w0)), 1e-30),
                "stable_rank": (frob / spectral) ** 2 if spectral > 0 else 0.0,
            })
    options = {"modules": None if modules is None else list(modules), "dtype": str(dtype)}
    return WeightChange(table=pd.DataFrame(rows), options=options)
