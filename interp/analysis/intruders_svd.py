"""Singular vectors for the intruder scan: the base side once, the fine-tuned side top-k only.

Two facts make a scan of many fine-tunes of one base cheap while staying exact:

- The base's full thin SVD ``W0 = U0 S0 V0ᵀ`` is the same for every fine-tune
  of that base, and the intruder test needs all of ``U0`` (the max runs over
  every base vector). :func:`base_svd` computes it once per matrix and keeps
  it on disk under a key derived from the matrix's bytes, so the next
  fine-tune (or the next scan) reads it back.
- Only the top-k left singular vectors of the fine-tuned matrix enter the
  test. :func:`top_singular` offers three ways to get them:

  * ``"gram"`` (the default, ``"auto"``): eigendecomposition of the smaller
    Gram matrix — direct, no convergence question, 3–10× cheaper than a
    dense SVD at SmolLM2 and zoo sizes;
  * ``"subspace"``: block subspace iteration warm-started from the base's top
    singular vectors plus the range of ``ΔW`` (so a brand-new direction is in
    the start block), Rayleigh–Ritz and a residual-based error estimate every
    iteration, the dense SVD as fallback when it does not converge. On
    SmolLM2's flat MLP spectra (σ₂₁/σ₁₀ ≈ 0.95) it needs 10–40 products and
    loses to ``"gram"``; it wins on fast-decaying spectra and very large
    matrices;
  * ``"full"``: the exact thin SVD (``torch.linalg.svd(full_matrices=False)``),
    the reference and every fallback.

  Each returns a per-vector error estimate, which the scan uses to settle any
  flag within error of ε with the dense SVD (correctness first).

Shapes: every matrix is ``[d_out, d_in]``; ``q = min(d_out, d_in)``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from interp.cache import content_key, entry, tensor_digest

#: Bump when the cached base-SVD layout or algorithm changes (old entries are then ignored).
FORMAT_VERSION = 1
CACHE_KIND = "intruder_svd"
SOLVERS = ("auto", "gram", "subspace", "full")


@dataclass(frozen=True)
class BaseSVD:
    """The base matrix's left singular vectors and values (right vectors are not needed)."""

    U: Tensor  # [d_out, q], columns by descending singular value
    S: Tensor  # [q]
    digest: str  # content digest of the matrix it came from


@dataclass(frozen=True)
class TopSingular:
    """Top-k singular triplets of one matrix, and how they were obtained.

    ``error[j]`` estimates ``‖u_j − u_j*‖`` (sign-aligned) for the exact vector
    ``u_j*``; it bounds how far ``max_j |u_jᵀ U0|`` can be from its exact value.
    ``S`` carries one more value than ``U`` (σ_{k+1}) so callers can see the gap.
    """

    U: Tensor  # [d_out, k]
    S: Tensor  # [k + 1] (or fewer when the matrix is smaller)
    V: Tensor  # [d_in, k]
    error: Tensor  # [k] float64
    method: str  # "gram", "subspace" or "full"
    iterations: int


# --------------------------------------------------------------------------- base side


matrix_digest = tensor_digest  # the base SVD cache is keyed by the base matrix's bytes


def _cache_path(digest: str):
    return entry(CACHE_KIND, content_key("intruders.base_svd", FORMAT_VERSION, digest))


def base_svd(w0: Tensor, *, cache: bool = True, digest: str | None = None) -> BaseSVD:
    """Exact thin SVD of the base matrix ``w0`` ``[d_out, d_in]``, read from disk when cached.

    The key is the sha256 of the matrix's bytes (``digest`` if the caller has it
    already), so an edited base never reuses a stale decomposition. The SVD is
    taken in ``w0``'s dtype.
    """
    digest = digest or matrix_digest(w0)
    path = _cache_path(digest)
    if cache and path.exists():
        from safetensors.torch import load_file

        try:
            stored = load_file(str(path))
            return BaseSVD(stored["U"], stored["S"], digest)
        except Exception:  # noqa: BLE001 — any damaged entry is recomputed and rewritten
            path.unlink(missing_ok=True)
    U, S, _ = torch.linalg.svd(w0, full_matrices=False)
    # Row-major, as a cached entry reads back: products with U then round the same way whether
    # the SVD was fresh or cached, so a warm scan's table equals a cold one bit for bit.
    U, S = U.contiguous(), S.contiguous()
    if cache:
        from safetensors.torch import save

        _write_entry(path, save({"U": U, "S": S}))
    return BaseSVD(U, S, digest)


def _write_entry(path: Path, data: bytes) -> None:
    """Write a cache entry via a temporary file and an atomic rename.

    No fsync (it cost more than the SVD for the zoo's small matrices): after a
    crash an entry can at worst be truncated, and a truncated entry fails to
    load and is recomputed (:func:`base_svd`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- fine-tuned side


def svd_noise(values: Tensor, dtype: torch.dtype, shape: tuple[int, int], k: int) -> Tensor:
    """A safe estimate of a dense solver's own error in each of the top k vectors.

    ``values`` are the leading descending singular values of a matrix (for a
    dense SVD) or eigenvalues of its Gram matrix (for a Gram eigensolver),
    k+1 of them where the matrix has that many. The estimate is
    ``c·ε·values₁ / gap_j`` (``gap_j`` to the nearest neighbour), bounding
    ``‖u_j − u_j*‖``: near-degenerate values make a vector ill-defined for any
    algorithm, and this says by how much. Over 1,260 top vectors of SmolLM2's
    matrices with LoRA- and full-FT-like updates the measured error was at most
    6.7 × ``ε·values₁/gap_j`` (median 0.4–0.7) for both the dense SVD and the
    Gram path; ``c = max(32, √max(shape))`` leaves a margin of ≥ 4.7 on top.
    Returns ``[k]`` float64 (``[..., k]`` for a batch of value rows ``[..., ≥k]``).
    """
    v = values.double()[..., : k + 1]
    if v.shape[-1] < k + 1:  # the matrix has only k values: the last one's lower neighbour is 0
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], k + 1 - v.shape[-1])], dim=-1)
    below = v[..., :k] - v[..., 1 : k + 1]
    above = torch.cat([v.new_full((*v.shape[:-1], 1), math.inf), v[..., : k - 1] - v[..., 1:k]], dim=-1)
    gaps = torch.minimum(above, below).clamp_min(1e-300)
    c = max(32.0, math.sqrt(max(shape)))
    return (c * torch.finfo(dtype).eps * v[..., :1] / gaps).clamp(max=2.0)


def full_top(w: Tensor, k: int) -> TopSingular:
    """Top-k triplets from the exact thin SVD (the reference every other path is checked against)."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    kk = min(k, S.numel())
    error = svd_noise(S, w.dtype, tuple(w.shape), kk)
    return TopSingular(U[:, :kk], S[: kk + 1], Vh[:kk].T, error, "full", 0)


def gram_top(w: Tensor, k: int) -> TopSingular | None:
    """Top-k triplets from the eigendecomposition of the smaller Gram matrix.

    ``G = WᵀW`` (or ``WWᵀ`` when ``W`` is wide; ``[q, q]``) is one matrix
    product, and a symmetric eigensolver on ``q × q`` costs a fraction of a
    bidiagonal SVD with all vectors. ``σ_j = √λ_j``; the other side's vectors
    are ``W v_j / σ_j``. Squaring costs accuracy only for singular values far
    below ``σ₁``: a top vector's error is about ``ε·σ₁²/(σ_j² − σ_i²)``, within a
    factor ``σ₁/2σ_j`` of the dense SVD's own ``ε·σ₁/(σ_j − σ_i)``; ``error``
    reports it. Returns ``None`` when a top singular value is too small for
    that (the caller takes the full SVD).
    """
    return gram_top_batch(w[None], k)[0]


#: Smallest Gram size for which :func:`top_eigh` computes only the top eigenpairs.
SUBSET_EIGH_MIN = 256


def top_eigh(gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenpairs of a symmetric ``[q, q]`` matrix, descending.

    LAPACK's MRRR solver (``?syevr``) restricted to the top ``count`` indices:
    the same accuracy as a full symmetric eigensolve (eigenvalues to
    ``O(ε‖G‖)``) without computing the other ``q − count`` vectors: 2.6× faster
    than ``torch.linalg.eigh`` at q = 576. Below :data:`SUBSET_EIGH_MIN` the
    gain (1.3× at q = 128) does not pay for pinning scipy's threads, and the
    full ``torch.linalg.eigh`` is used. Returns values ``[count]`` and vectors
    ``[q, count]`` in ``gram``'s dtype.
    """
    q = gram.shape[-1]
    if count >= q or q < SUBSET_EIGH_MIN:
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(-1)[:count], vectors.flip(-1)[:, :count]
    from scipy.linalg import eigh

    with blas_threads(torch.get_num_threads()):
        values, vectors = eigh(gram.numpy(), subset_by_index=[q - count, q - 1], driver="evr",
                               check_finite=False)
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())


_BLAS_CONTROLLER = None


def blas_threads(n: int):
    """Context manager: scipy's BLAS/LAPACK on at most ``n`` threads (torch's own setting).

    Unpinned, OpenBLAS spreads a 128 × 128 eigensolve over every core and runs
    it 2–10× slower on a busy machine. The controller is built once (~3 ms).
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


def gram_top_batch(ws: Tensor, k: int) -> list[TopSingular | None]:
    """:func:`gram_top` for a stack of same-shaped matrices ``[b, d_out, d_in]``.

    One batched Gram product, then the top ``k + 1`` eigenpairs of each Gram
    matrix (:func:`top_eigh`); a scan has one such matrix per fine-tune of the base.
    """
    _, d_out, d_in = ws.shape
    tall = d_out >= d_in
    grams = ws.mT @ ws if tall else ws @ ws.mT  # [b, q, q]
    q = grams.shape[-1]
    kt = min(k, q)
    if q < SUBSET_EIGH_MIN:  # small: one batched full eigensolve
        values, vectors = torch.linalg.eigh(grams)  # ascending
        values, vectors = values[:, -(kt + 1):].flip(-1), vectors[:, :, -kt:].flip(-1)
    else:
        tops = [top_eigh(gram, min(kt + 1, q)) for gram in grams]
        values = torch.stack([t[0] for t in tops])
        vectors = torch.stack([t[1][:, :kt] for t in tops])
    values = values.double().clamp_min(0)  # [b, ≤k+1] descending
    S = values.sqrt()
    scale = S[:, None, :kt].to(ws.dtype)
    if tall:
        V = vectors
        U = (ws @ V) / scale
    else:
        U = vectors
        V = (ws.mT @ U) / scale
    eps = torch.finfo(ws.dtype).eps
    # eigenvector error (gaps of σ²), plus rounding amplified by σ₁/σ_j in v -> W v / σ
    errors = svd_noise(values, ws.dtype, (d_out, d_in), kt) + 4 * eps * S[:, :1] / S[:, :kt]
    usable = values[:, kt - 1] > 10 * q * eps * values[:, 0]  # else σ_k is at the Gram's rounding level
    return [TopSingular(U[i].contiguous(), S[i].to(ws.dtype), V[i].contiguous(), errors[i], "gram", 0)
            if usable[i] else None for i in range(ws.shape[0])]


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _estimate_errors(theta2: Tensor, res: Tensor, k: int) -> Tensor:
    """Error estimates for the first k Ritz vectors of ``A = W Wᵀ`` (float64).

    ``theta2`` ``[m]`` descending Ritz values of A, ``res`` ``[m]`` residual norms
    ``‖A u − θ² u‖``. The part of ``u_j``'s error that lies outside the block is
    at most ``‖r_j‖ / (θ_j² − θ_m²)`` (the block's smallest Ritz value stands in
    for the unseen spectrum); Rayleigh–Ritz turns it into a mix inside the block
    amplified by ``(1 + ρ/δ_j)``, with ``δ_j`` the distance to the nearest other
    Ritz value and ``ρ`` the largest residual among the top k+1.
    """
    m = theta2.numel()
    out_gap = (theta2[:k] - theta2[m - 1]).clamp_min(0)
    outside = torch.where(out_gap > 0, res[:k] / out_gap.clamp_min(1e-300),
                          torch.full_like(out_gap, math.inf))
    diff = (theta2[:k, None] - theta2[None, :]).abs()
    diff[torch.arange(k), torch.arange(k)] = math.inf
    delta = diff.min(dim=1).values
    rho = res[: min(k + 1, m)].max()
    mix = 1.0 + rho / delta.clamp_min(1e-300)
    return (outside * mix).nan_to_num(nan=math.inf)


def subspace_top(
    w: Tensor,
    k: int,
    start: Tensor,
    extra: Tensor | None = None,
    *,
    buffer: int = 10,
    tol: float | None = None,
    max_iter: int = 40,
) -> TopSingular | None:
    """Top-k left singular triplets of ``w`` by warm-started block subspace iteration.

    ``start`` ``[d_out, ≥k+buffer]``: the base's leading left singular vectors.
    ``extra`` ``[d_out, e]``: vectors spanning the update's range (``ΔW @ Ω``), so
    a direction the base lacks is in the first block. Each iteration multiplies
    by ``W Wᵀ``, does Rayleigh–Ritz (a small float64 eigenproblem), keeps the
    top ``k + buffer`` Ritz vectors and stops once every top-k vector's
    iteration error estimate is below ``tol`` or below the rounding floor that
    no float solver can beat (:func:`svd_noise` on the Ritz values of ``WWᵀ``).
    Returns ``None`` when it does not converge in ``max_iter`` iterations (the
    caller then takes the full SVD).
    """
    d_out, d_in = w.shape
    q = min(d_out, d_in)
    m = min(k + buffer, q)
    tol = tol if tol is not None else default_tol(w.dtype)
    block = start[:, :m]
    if extra is not None and extra.shape[1]:
        block = torch.cat([block, extra.to(w.dtype)], dim=1)
    Q = _orth(block)
    for iteration in range(1, max_iter + 1):
        Z = w.T @ Q  # [d_in, b]
        Y = w @ Z  # [d_out, b] = A Q
        Zd = Z.double()
        theta2, C = torch.linalg.eigh(Zd.T @ Zd)  # QᵀAQ, ascending
        theta2, C = theta2.flip(0)[:m].clamp_min(0), C.flip(1)[:, :m]
        Cw = C.to(w.dtype)
        U = Q @ Cw  # Ritz vectors [d_out, m]
        AU = Y @ Cw
        res = (AU.double() - U.double() * theta2).norm(dim=0)
        iteration_error = _estimate_errors(theta2, res, min(k, m))
        floor = svd_noise(theta2, w.dtype, tuple(w.shape), min(k, m))
        if bool((iteration_error <= torch.clamp(floor, min=tol)).all()):
            error = iteration_error + floor
            S = theta2.sqrt()
            kk = min(k, m)
            V = (Z @ Cw[:, :kk]) / S[:kk].to(w.dtype).clamp_min(torch.finfo(w.dtype).tiny)
            return TopSingular(U[:, :kk].contiguous(), S[: kk + 1].to(w.dtype), V.contiguous(),
                               error, "subspace", iteration)
        Q = _orth(AU)
    return None


def default_tol(dtype: torch.dtype) -> float:
    """Target error on each top-k vector: 1e-4 in float32, 1e-8 in float64."""
    return 1e-8 if dtype == torch.float64 else 1e-4


def top_singular(
    w: Tensor,
    k: int,
    *,
    solver: str = "auto",
    base: BaseSVD | None = None,
    delta: Tensor | None = None,
    buffer: int = 10,
    extra_rank: int | None = None,
    tol: float | None = None,
    max_iter: int = 40,
    seed: int = 0,
) -> TopSingular:
    """Top-k singular triplets of ``w`` ``[d_out, d_in]`` by the chosen solver.

    - ``"full"``: the exact thin SVD (the reference; also every fallback).
    - ``"gram"`` (what ``"auto"`` picks): eigendecomposition of the smaller
      Gram matrix, a direct method with no convergence question.
    - ``"subspace"``: block subspace iteration from ``base.U`` plus
      ``delta @ Ω`` (``Ω`` a seeded Gaussian ``[d_in, extra_rank]``; pass a
      LoRA update's rank so its whole range is in the start block), with the
      full SVD as fallback when it does not converge.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    if solver == "full":
        return full_top(w, k)
    if solver in ("auto", "gram"):
        return gram_top(w, k) or full_top(w, k)
    if base is None:
        raise ValueError("solver='subspace' needs the base's SVD (base=...) to start from")
    q = min(w.shape)
    extra = None
    if delta is not None:
        e = max(0, min(extra_rank if extra_rank is not None else k, q))
        if e:
            generator = torch.Generator().manual_seed(seed)
            omega = torch.randn(delta.shape[1], e, generator=generator, dtype=torch.float64)
            extra = delta @ omega.to(delta.dtype)
    if 2 * (min(k + buffer, q) + (0 if extra is None else extra.shape[1])) > q:
        return full_top(w, k)  # the block would cover the matrix: a dense SVD is as cheap
    found = subspace_top(w, k, base.U, extra, buffer=buffer, tol=tol, max_iter=max_iter)
    return found if found is not None else full_top(w, k)
