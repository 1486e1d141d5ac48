"""Intruder dimensions (methods.md §1): top singular directions of a fine-tuned matrix that the base lacks.

For every scanned matrix, ``W0 = U0 S0 V0ᵀ`` (base) and ``Wt = Ut St Vtᵀ``
(fine-tuned; LoRA merged) are thin SVDs. Tuned left singular vector ``j`` is
matched against **all** base left singular vectors by absolute cosine,
``m_j = max_i |Ut[:, j] · U0[:, i]|``, and is an *intruder* when it is among
the top ``k`` (``j < k``) and ``m_j < ε`` — exactly as the paper's script
counts them (Shuttleworth et al., arXiv 2410.21228).

The scan is exact and fast:

- the base SVD is computed once per matrix for every fine-tune of that base
  and cached on disk by content (:func:`interp.analysis.intruders_svd.base_svd`);
- the fine-tuned side needs only its top k vectors
  (:func:`interp.analysis.intruders_svd.top_singular`), each with an error
  estimate; whenever ``|m_j − ε|`` is within the combined error of that
  estimate and of a dense SVD's own rounding, the matrix is redone with the
  dense thin SVD, so every intruder flag equals the reference computation's.

``m_j`` does not depend on ``ε``, so :meth:`IntruderReport.counts` and
:meth:`IntruderReport.sweep` re-threshold without any new SVD (for any
``k' ≤ k``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.intruders_svd import (
    SOLVERS,
    BaseSVD,
    TopSingular,
    base_svd,
    full_top,
    gram_top_batch,
    matrix_digest,
    svd_noise,
    top_singular,
)
from interp.errors import ArchitectureMismatchError
from interp.pairs import ModelPair, parse_canonical
from interp.results import Result

_KEY_SEP = "|"
DEFAULT_EPS_GRID = tuple(round(x, 2) for x in np.arange(0.05, 0.951, 0.05))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class IntruderReport(Result):
    """Intruder scan of one or more fine-tunes of a base.

    ``table``: one row per (pair, matrix, tuned vector j < k) with ``pair``,
    ``matrix``, ``layer``, ``module``, ``j``, ``sigma_j`` (tuned singular
    value), ``max_sim`` (max |cos| over all base left singular vectors),
    ``matched_base_index`` (the argmax) and ``is_intruder`` (at the scan's ε).
    ``similarity``: ``"pair|matrix"`` -> ``|Ut[:, :k]ᵀ U0|`` ``[k, q]``.
    ``full_similarity``: the whole ``|Utᵀ U0|`` ``[q, q]`` for matrices named in
    ``keep_full``. ``solver``: per (pair, matrix), how the top-k were found
    (``gram``/``subspace``/``full``, and ``full`` with ``tie=True`` when a flag
    was too close to ε to trust anything but the dense SVD), error bound, time.
    ``pairs``: provenance of each pair (method, rank, alpha, rsLoRA).
    """

    similarity: dict[str, Tensor] = field(default_factory=dict)
    full_similarity: dict[str, Tensor] = field(default_factory=dict)
    solver: pd.DataFrame | None = None
    pairs: pd.DataFrame | None = None

    summary_columns = ("pair", "matrix", "j", "sigma_j", "max_sim", "is_intruder")

    # ------------------------------------------------------------------ views
    @property
    def labels(self) -> list[str]:
        """Pair labels in scan order."""
        return list(dict.fromkeys(self.table["pair"]))

    @property
    def k(self) -> int:
        return int(self.options["k"])

    @property
    def eps(self) -> float:
        return float(self.options["eps"])

    def _rows(self, k: int | None) -> pd.DataFrame:
        k = self.k if k is None else int(k)
        if not 1 <= k <= self.k:
            raise ValueError(
                f"this report kept the top k={self.k} tuned vectors per matrix; k={k} needs "
                f"a new scan (intruder_dimensions(..., k={k}))"
            )
        return self.table[self.table["j"] < k]

    def flags(self, eps: float | None = None, k: int | None = None) -> pd.Series:
        """Boolean intruder flag per row of :attr:`table` at ``eps`` (rows with ``j ≥ k`` False)."""
        eps = self.eps if eps is None else float(eps)
        k = self.k if k is None else int(k)
        self._rows(k)
        return (self.table["j"] < k) & (self.table["max_sim"] < eps)

    def counts(self, eps: float | None = None, k: int | None = None,
               by: str | Sequence[str] = "pair") -> pd.DataFrame:
        """Intruder counts at ``eps`` (default: the scan's), grouped ``by`` table columns.

        ``by="pair"`` gives the model-level count of the paper; ``("pair",
        "layer", "module")`` one row per matrix. Groups without intruders are
        kept (count 0). No SVD is recomputed.
        """
        by = [by] if isinstance(by, str) else list(by)
        rows = self._rows(k)
        eps = self.eps if eps is None else float(eps)
        flagged = rows.assign(n_intruders=(rows["max_sim"] < eps).astype(int))
        out = flagged.groupby(by, sort=False)["n_intruders"].sum().reset_index()
        return out.assign(eps=eps, k=self.k if k is None else int(k))

    def sweep(self, eps_grid: Iterable[float] | None = None, k: int | None = None) -> pd.DataFrame:
        """Model-level intruder count for every ``eps`` in ``eps_grid``: tidy ``pair, eps, n_intruders``."""
        grid = np.asarray(list(DEFAULT_EPS_GRID if eps_grid is None else eps_grid), dtype=float)
        rows = self._rows(k)
        records = []
        for label in self.labels:
            sims = np.sort(rows.loc[rows["pair"] == label, "max_sim"].to_numpy())
            below = np.searchsorted(sims, grid, side="left")  # count of max_sim < eps
            records += [{"pair": label, "eps": float(e), "n_intruders": int(n)}
                        for e, n in zip(grid, below)]
        return pd.DataFrame(records)

    def intruders(self, eps: float | None = None, k: int | None = None) -> pd.DataFrame:
        """The flagged rows only (at ``eps`` and ``k``)."""
        return self.table[self.flags(eps, k)]

    def similarity_of(self, pair: str, matrix: str, full: bool = False) -> Tensor:
        """``|Utᵀ U0|`` of one pair's matrix: the top-k rows ``[k, q]`` or, if kept, all ``[q, q]``."""
        key = similarity_key(pair, matrix)
        store = self.full_similarity if full else self.similarity
        if key not in store:
            kept = sorted({k.split(_KEY_SEP, 1)[1] for k in store})[:5]
            hint = " (pass keep_full=[matrix] to intruder_dimensions)" if full else ""
            raise KeyError(f"no similarity for pair {pair!r}, matrix {matrix!r}{hint}; kept: {kept}")
        return store[key]

    def summary(self) -> pd.DataFrame:
        """Per pair: matrices scanned, intruders at the scan's ε, matrices holding any."""
        flags = self.flags()
        table = self.table.assign(_flag=flags)
        per_matrix = table.groupby(["pair", "matrix"], sort=False)["_flag"].sum().reset_index()
        out = per_matrix.groupby("pair", sort=False).agg(
            n_matrices=("matrix", "size"),
            n_intruders=("_flag", "sum"),
            matrices_with_intruders=("_flag", lambda s: int((s > 0).sum())),
        ).reset_index()
        top1 = table[table["j"] == 0].groupby("pair", sort=False)["max_sim"].min()
        out["lowest_top1_max_sim"] = out["pair"].map(top1)
        out.insert(1, "eps", self.eps)
        out.insert(2, "k", self.k)
        return out


#: Columns of :attr:`IntruderReport.table` (one row per pair, matrix and tuned vector j < k).
TABLE_COLUMNS = ("pair", "matrix", "layer", "module", "j", "sigma_j", "max_sim",
                 "matched_base_index", "is_intruder")
#: Columns of :attr:`IntruderReport.solver` (one row per pair and matrix).
SOLVER_COLUMNS = ("pair", "matrix", "method", "tie", "iterations", "max_error", "seconds")


def similarity_key(pair: str, matrix: str) -> str:
    return f"{pair}{_KEY_SEP}{matrix}"


# --------------------------------------------------------------------------- one matrix


@dataclass(frozen=True)
class MatrixScan:
    """The intruder test on one matrix of one pair."""

    top: TopSingular  # tuned top-k triplets (U [d_out, k], S [k+1], V [d_in, k])
    similarity: Tensor  # [k, q] |Ut_topᵀ U0|
    max_sim: Tensor  # [k]
    matched: Tensor  # [k] long, argmax over base vectors
    tie: bool  # redone with the dense SVD because a flag was within error of ε
    seconds: float

    def intruder_index(self, eps: float) -> Tensor:
        """Positions j (< k) of the intruders at ``eps``."""
        return torch.nonzero(self.max_sim < eps).flatten()


def scan_matrix(
    w0: Tensor,
    wt: Tensor,
    k: int,
    eps: float,
    *,
    base: BaseSVD | None = None,
    solver: str = "auto",
    extra_rank: int | None = None,
    buffer: int = 10,
    tol: float | None = None,
    top: TopSingular | None = None,
) -> MatrixScan:
    """Run the intruder test on one base/fine-tuned matrix pair ``[d_out, d_in]``.

    ``base`` is the base's SVD when already known (shared across fine-tunes);
    ``top`` the fine-tuned top-k when already computed (a batched solve).
    Flags within the error of ``ε`` are settled by the dense thin SVD, so the
    result's flags equal the reference computation's.
    """
    if w0.shape != wt.shape:
        raise ArchitectureMismatchError(
            f"base matrix is {list(w0.shape)} but fine-tuned is {list(wt.shape)}; an intruder "
            "scan compares one matrix in two versions"
        )
    start = time.perf_counter()
    base = base if base is not None else base_svd(w0, cache=False)
    if top is None:
        delta = wt - w0 if solver == "subspace" else None
        top = top_singular(wt, k, solver=solver, base=base, delta=delta, buffer=buffer,
                           extra_rank=extra_rank, tol=tol)
    similarity, max_sim, matched = _match(top.U, base.U)
    tie = False
    if top.method != "full":
        margin = top.error + svd_noise(top.S, wt.dtype, tuple(wt.shape), top.U.shape[1])
        if bool(((max_sim.double() - eps).abs() <= margin).any()):
            top, tie = full_top(wt, k), True
            similarity, max_sim, matched = _match(top.U, base.U)
    return MatrixScan(top, similarity, max_sim, matched, tie, time.perf_counter() - start)


def scan_batch(
    w0: Tensor, wts: Sequence[Tensor], k: int, eps: float, base: BaseSVD,
    tops: Sequence[TopSingular | None],
) -> list[MatrixScan]:
    """:func:`scan_matrix` for several fine-tunes of one base matrix, their top-k already found.

    The similarity products, the error margins and the tie test run once for
    the whole stack (a scan of the zoo's 128-wide matrices is otherwise
    dominated by per-matrix overhead); a fine-tune whose top-k are missing or
    whose flag is within error of ``ε`` goes through :func:`scan_matrix`,
    which settles it with the dense SVD.
    """
    start = time.perf_counter()
    ready = [i for i, top in enumerate(tops) if top is not None]  # same k: one batched solve
    scans: list[MatrixScan | None] = [None] * len(wts)
    if ready:
        U = torch.stack([tops[i].U for i in ready])  # [b, d_out, k]
        similarity = (U.mT @ base.U).abs()  # [b, k, q]
        max_sim, matched = similarity.max(dim=-1)
        kk = U.shape[-1]
        S = torch.stack([tops[i].S for i in ready])
        errors = torch.stack([tops[i].error for i in ready])
        margin = errors + svd_noise(S, wts[ready[0]].dtype, tuple(w0.shape), kk)
        tied = ((max_sim.double() - eps).abs() <= margin).any(dim=-1).tolist()
        seconds = (time.perf_counter() - start) / len(ready)
        for row, i in enumerate(ready):
            if not tied[row]:
                scans[i] = MatrixScan(tops[i], similarity[row], max_sim[row], matched[row], False,
                                      seconds)
    return [scan if scan is not None else scan_matrix(w0, wt, k, eps, base=base, top=top)
            for scan, wt, top in zip(scans, wts, tops)]


def _match(ut: Tensor, u0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``|utᵀ u0|`` ``[k, q]``, its row max and argmax (the paper's max over all base vectors)."""
    similarity = (ut.T @ u0).abs()
    max_sim, matched = similarity.max(dim=1)
    return similarity, max_sim, matched


# --------------------------------------------------------------------------- the scan


def _as_pairs(pairs: ModelPair | Sequence[ModelPair]) -> list[ModelPair]:
    pairs = [pairs] if isinstance(pairs, ModelPair) else list(pairs)
    if not pairs:
        raise ValueError("intruder_dimensions needs at least one ModelPair")
    for pair in pairs:
        if not isinstance(pair, ModelPair):
            raise TypeError(f"expected ModelPair objects, got {type(pair).__name__}")
    labels = [p.label for p in pairs]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"pair labels must be unique, {duplicates} repeat; pass label=... to load_pair")
    return pairs


def _base_identity(pair: ModelPair) -> tuple:
    """Pairs whose base is the same checkpoint share reads of its matrices."""
    base = pair.base
    if base.folder is not None:
        return ("folder", str(base.folder.resolve()))
    if base.module is not None:
        return ("module", id(base.module))
    return ("object", id(base))


def _check_options(k: int, eps: float, dtype: torch.dtype, solver: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer (top-k tuned vectors), got {k!r}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps is a cosine threshold in (0, 1], got {eps!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def iter_scans(
    pairs: Sequence[ModelPair],
    k: int,
    eps: float,
    names: Sequence[str],
    dtype: torch.dtype,
    *,
    solver: str = "auto",
    cache: bool = True,
    buffer: int = 10,
    tol: float | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, ModelPair, Tensor, Tensor, BaseSVD, MatrixScan]]:
    """Matrix by matrix, every pair: yield ``(name, pair, W0, Wt, base SVD, scan)``.

    The loop is matrix-major so each base matrix is read and decomposed once
    for all fine-tunes of it, and only one matrix's SVD is in memory at a time.
    """
    groups: dict[tuple, list[ModelPair]] = {}
    for pair in pairs:
        groups.setdefault(_base_identity(pair), []).append(pair)
    for name in tqdm(names, desc="intruder scan", disable=not progress):
        for members in groups.values():
            w0 = members[0].base_matrix(name, dtype)
            digest = matrix_digest(w0) if cache else None
            base = base_svd(w0, cache=cache, digest=digest)
            wts = [pair.finetuned_matrix(name, dtype, base_weight=w0) for pair in members]
            if solver in ("auto", "gram"):  # one batched eigensolve and test for all fine-tunes
                tops = gram_top_batch(torch.stack(wts), k)
                for pair, wt, scan in zip(members, wts, scan_batch(w0, wts, k, eps, base, tops)):
                    yield name, pair, w0, wt, base, scan
                continue
            for pair, wt in zip(members, wts):
                extra_rank = None
                if solver == "subspace":
                    factors = pair.lora_factors(name)
                    extra_rank = factors.rank if factors is not None else None
                scan = scan_matrix(w0, wt, k, eps, base=base, solver=solver,
                                   extra_rank=extra_rank, buffer=buffer, tol=tol)
                yield name, pair, w0, wt, base, scan


def _scan_names(pairs: Sequence[ModelPair], modules, matrices) -> list[str]:
    names = pairs[0].matrix_names(modules)
    for pair in pairs[1:]:
        other = pair.matrix_names(modules)
        if other != names:
            missing = sorted(set(names) ^ set(other))[:5]
            raise ArchitectureMismatchError(
                f"pairs {pairs[0].label!r} and {pair.label!r} have different matrices "
                f"(e.g. {missing}); scan pairs of one architecture together"
            )
    if matrices is not None:
        wanted = [matrices] if isinstance(matrices, str) else list(matrices)
        unknown = [m for m in wanted if m not in names]
        if unknown:
            raise KeyError(f"unknown matrices {unknown}; names look like {names[0]!r}")
        names = [n for n in names if n in set(wanted)]
    return names


def intruder_dimensions(
    pairs: ModelPair | Sequence[ModelPair],
    k: int = 10,
    eps: float = 0.5,
    modules: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    matrices: Iterable[str] | None = None,
    keep_full: Iterable[str] = (),
    solver: str = "auto",
    cache: bool = True,
    buffer: int = 10,
    tol: float | None = None,
    progress: bool = True,
) -> IntruderReport:
    """Count intruder dimensions in every scanned matrix of one or more fine-tunes of a base.

    ``pairs``: a :class:`ModelPair` or a list of pairs (typically fine-tunes of
    one base: their base SVDs are shared). ``k``: how many top tuned vectors
    are tested; ``eps``: the cosine threshold. ``modules``: module kinds
    (``"q"``, ``"mlp"``, ...; default all seven), ``matrices``: explicit
    canonical names. ``dtype``: float32 (the paper's) or float64.
    ``keep_full``: matrices whose full ``|Utᵀ U0|`` to keep for heat maps.
    ``solver``: ``"auto"`` (Gram eigensolver), ``"subspace"`` (warm-started
    block iteration), or ``"full"`` (dense SVD, the reference). ``cache``:
    keep base SVDs on disk (``$INTERP_CACHE/intruder_svd``).
    """
    _check_options(k, eps, dtype, solver)
    pairs = _as_pairs(pairs)
    names = _scan_names(pairs, modules, matrices)
    keep_full = set([keep_full] if isinstance(keep_full, str) else keep_full)
    columns: dict[str, list] = {c: [] for c in TABLE_COLUMNS}
    diagnostics: dict[str, list] = {c: [] for c in SOLVER_COLUMNS}
    similarity: dict[str, Tensor] = {}
    full_similarity: dict[str, Tensor] = {}
    for name, pair, _, wt, base, scan in iter_scans(
        pairs, k, eps, names, dtype, solver=solver, cache=cache, buffer=buffer, tol=tol,
        progress=progress,
    ):
        layer, module = parse_canonical(name)
        kk = scan.max_sim.numel()
        for column, value in (("pair", pair.label), ("matrix", name), ("layer", layer),
                              ("module", module)):
            columns[column] += [value] * kk
        columns["j"] += range(kk)
        columns["sigma_j"] += scan.top.S[:kk].double().tolist()
        columns["max_sim"] += scan.max_sim.tolist()
        columns["matched_base_index"] += scan.matched.tolist()
        key = similarity_key(pair.label, name)
        similarity[key] = scan.similarity.float().contiguous()
        if name in keep_full:
            u_all = torch.linalg.svd(wt, full_matrices=False)[0]
            full_similarity[key] = (u_all.T @ base.U).abs().float().contiguous()
        for column, value in (("pair", pair.label), ("matrix", name), ("method", scan.top.method),
                              ("tie", scan.tie), ("iterations", scan.top.iterations),
                              ("max_error", float(scan.top.error.max())),
                              ("seconds", scan.seconds)):
            diagnostics[column].append(value)
    columns["is_intruder"] = [sim < eps for sim in columns["max_sim"]]
    pair_order = {p.label: i for i, p in enumerate(pairs)}
    name_order = {n: i for i, n in enumerate(names)}

    def in_input_order(data: dict[str, list], extra: str | None = None) -> pd.DataFrame:
        """Rows sorted pair-major (input order of pairs, then of matrices): the scan is matrix-major."""
        keys = [np.array([pair_order[p] for p in data["pair"]]),
                np.array([name_order[m] for m in data["matrix"]])]
        order = np.lexsort(([np.array(data[extra])] if extra else []) + keys[::-1])
        return pd.DataFrame({c: [v[i] for i in order] for c, v in data.items()})

    similarity = dict(sorted(similarity.items(), key=lambda item: (
        pair_order[item[0].split(_KEY_SEP, 1)[0]], name_order[item[0].split(_KEY_SEP, 1)[1]])))
    options = {
        "k": int(k), "eps": float(eps), "modules": None if modules is None else list(modules),
        "matrices": None if matrices is None else list(names), "dtype": str(dtype),
        "solver": solver, "buffer": buffer, "tol": tol, "keep_full": sorted(keep_full),
    }
    return IntruderReport(
        table=in_input_order(columns, "j"), options=options, similarity=similarity,
        full_similarity=full_similarity, solver=in_input_order(diagnostics),
        pairs=pair_provenance(pairs),
    )


def pair_provenance(pairs: Sequence[ModelPair]) -> pd.DataFrame:
    """One row per pair: label, method, LoRA rank/alpha, rsLoRA, task."""
    return pd.DataFrame([{
        "pair": p.label, "method": p.method, "lora_rank": p.lora_rank, "lora_alpha": p.lora_alpha,
        "rslora": bool(p.rslora), "task": p.task,
    } for p in pairs])


def naive_intruder_counts(pair: ModelPair, k: int = 10, eps: float = 0.5,
                          modules: Iterable[str] | None = None,
                          dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """The paper's straightforward computation: two dense SVDs per matrix, no sharing.

    ``{matrix: count}``; the reference the fast scan is tested and benchmarked against.
    """
    counts = {}
    for name, w0, wt in pair.matrices(modules, dtype):
        u0 = torch.linalg.svd(w0, full_matrices=False)[0]
        ut = torch.linalg.svd(wt, full_matrices=False)[0]
        max_sim = (ut[:, :k].T @ u0).abs().max(dim=1).values
        counts[name] = int((max_sim < eps).sum())
    return counts


__all__ = [
    "IntruderReport", "MatrixScan", "intruder_dimensions", "iter_scans", "naive_intruder_counts",
    "pair_provenance", "scan_matrix", "similarity_key",
]
