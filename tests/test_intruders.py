"""Intruder dimensions on planted truth: a planted new direction is found, noise is not, counts
equal the paper's direct computation, and the fast top-k solvers equal the dense SVD."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch

from interp import load_pair
from interp.analysis import intruders_svd as isvd
from interp.analysis.intruders import (
    IntruderReport,
    intruder_dimensions,
    naive_intruder_counts,
    scan_matrix,
)
from interp.analysis.intruders_mitigation import (
    intruder_tradeoff,
    scale_intruders,
    text_loss,
)
from interp.errors import ArchitectureMismatchError
from interp.tasks import Task, accuracy

torch.set_num_threads(1)
SOLVERS = ("auto", "subspace", "full")


def designed(d_out: int, d_in: int, seed: int = 0, top: float = 10.0, decay: float = 0.85,
             dtype=torch.float32):
    """``U diag(S) Vᵀ`` with a known, well-separated spectrum ``S_i = top·decay^i``."""
    g = torch.Generator().manual_seed(seed)
    q = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, q, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, q, generator=g, dtype=torch.float64)).Q
    S = top * decay ** torch.arange(q, dtype=torch.float64)
    return (U * S) @ V.T, U, S, V


def planted(d_out: int = 96, d_in: int = 80, seed: int = 0):
    """Base with a known spectrum, and the base plus ``s·u vᵀ`` where ``u`` lies spread over the
    base's directions 20.. (max |cos| with any base vector ≈ 0.2) and ``s`` sits between σ₃ and σ₄."""
    w0, U, S, V = designed(d_out, d_in, seed)
    g = torch.Generator().manual_seed(seed + 100)
    signs = torch.randint(0, 2, (min(d_out, d_in) - 20, 2), generator=g).double() * 2 - 1
    u = U[:, 20:] @ signs[:, 0]
    v = V[:, 20:] @ signs[:, 1]
    u, v = u / u.norm(), v / v.norm()
    s = float(S[3] + S[4]) / 2
    return w0, w0 + s * torch.outer(u, v), u, s


# --------------------------------------------------------------------------- one matrix


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])
def test_planted_direction_is_exactly_the_one_flagged(solver, shape):
    w0, wt, u, s = planted(*shape)
    scan = scan_matrix(w0.float(), wt.float(), k=10, eps=0.5, solver=solver)
    flagged = torch.nonzero(scan.max_sim < 0.5).flatten().tolist()
    assert flagged == [4]  # σ₀..σ₃ stay above s; the new direction is the fifth
    assert abs(float(scan.top.U[:, 4].double() @ u)) > 0.99
    assert float(scan.top.S[4]) == pytest.approx(s, rel=1e-2)
    assert float(scan.max_sim[4]) < 0.35
    others = torch.cat([scan.max_sim[:4], scan.max_sim[5:]])
    assert bool((others > 0.99).all())  # untouched directions match their base vector


@pytest.mark.parametrize("solver", SOLVERS)
def test_small_dense_noise_makes_no_intruders(solver):
    w0, *_ = designed(96, 80, seed=1)
    g = torch.Generator().manual_seed(7)
    wt = w0 + 1e-3 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    scan = scan_matrix(w0.float(), wt.float(), k=10, eps=0.5, solver=solver)
    assert bool((scan.max_sim > 0.99).all())
    assert scan.matched.tolist() == list(range(10))  # each tuned vector finds its own base vector


def test_a_flag_within_rounding_of_eps_is_settled_by_the_dense_svd():
    w0, wt, *_ = planted()
    w0, wt = w0.float(), wt.float()
    first = scan_matrix(w0, wt, 10, 0.5)
    assert first.top.method == "gram" and not first.tie
    eps = float(first.max_sim[4])  # ε exactly at the planted vector's max |cos|
    tied = scan_matrix(w0, wt, 10, eps)
    assert tied.tie and tied.top.method == "full"
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    ut = torch.linalg.svd(wt, full_matrices=False)[0]  # the paper's computation, same LAPACK call
    naive = (ut[:, :10].T @ u0).abs().max(dim=1).values
    assert torch.equal(tied.max_sim, naive) and torch.equal(tied.max_sim < eps, naive < eps)


def test_sign_flips_and_permutations_of_base_vectors_change_nothing():
    w0, wt, *_ = planted()
    w0, wt = w0.float(), wt.float()
    base = isvd.base_svd(w0, cache=False)
    ref = scan_matrix(w0, wt, 10, 0.5, base=base)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(base.U.shape[1], generator=g)
    signs = torch.randint(0, 2, (base.U.shape[1],), generator=g).float() * 2 - 1
    shuffled = isvd.BaseSVD((base.U * signs)[:, perm], base.S[perm], base.digest)
    other = scan_matrix(w0, wt, 10, 0.5, base=shuffled)
    torch.testing.assert_close(other.max_sim, ref.max_sim, atol=1e-6, rtol=0)
    assert torch.equal(perm[other.matched], ref.matched)  # same base vector, new position
    assert torch.equal(other.max_sim < 0.5, ref.max_sim < 0.5)


# --------------------------------------------------------------------------- the top-k solvers


def _spectrum_with_near_ties(q: int, k: int) -> torch.Tensor:
    S = 10 * 0.9 ** torch.arange(q, dtype=torch.float64)
    S[3] = S[2] * (1 - 1e-3)  # a near-degenerate pair inside the top k
    S[k] = S[k - 1] * (1 - 1e-4)  # σ_k / σ_{k+1} = 1.0001 at the top-k boundary
    return S


@pytest.mark.parametrize("solver", ["gram", "subspace"])
def test_fast_solvers_match_the_full_svd_top_k_including_near_degenerate(solver):
    k = 10
    _, U, _, V = designed(150, 120, seed=4, dtype=torch.float64)
    S = _spectrum_with_near_ties(120, k)
    w = (U * S) @ V.T  # float64: the near-tied vectors are well defined (gap 1e-4 ≫ 1e-16)
    base = isvd.base_svd(w + 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64), cache=False)
    top = isvd.top_singular(w, k, solver=solver, base=base, delta=w - w, buffer=10)
    assert top.method == solver
    ref = isvd.full_top(w, k)
    torch.testing.assert_close(top.S[:k], ref.S[:k], rtol=1e-10, atol=0)
    cos = (top.U * ref.U).sum(0).abs()
    assert float(cos.min()) > 1 - 1e-8
    assert float((top.V * ref.V).sum(0).abs().min()) > 1 - 1e-8
    err = (top.U - ref.U * (top.U * ref.U).sum(0).sign()).norm(dim=0)
    assert bool((err <= top.error + 1e-12).all())  # the error estimate covers the true error


def test_subspace_iteration_float32_and_its_fallback():
    k = 10
    w0, U, _, V = designed(200, 160, seed=5)
    wt = (w0 + 0.05 * torch.outer(U[:, 50], V[:, 60])).float()
    base = isvd.base_svd(w0.float(), cache=False)
    top = isvd.top_singular(wt, k, solver="subspace", base=base, delta=wt - w0.float())
    ref = isvd.full_top(wt, k)
    assert top.method == "subspace" and top.iterations <= 20
    torch.testing.assert_close(top.S[:k], ref.S[:k], rtol=1e-5, atol=0)
    assert float((top.U * ref.U).sum(0).abs().min()) > 1 - 1e-5
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(200, 160, generator=g)  # a random matrix: tiny gaps, slow convergence
    moved = flat + 0.3 * torch.randn(200, 160, generator=g)
    slow = isvd.top_singular(moved, k, solver="subspace", base=isvd.base_svd(flat, cache=False),
                             delta=moved - flat, max_iter=2, tol=1e-7)
    assert slow.method == "full"  # did not converge in 2 products: the dense SVD answers


def test_update_range_in_the_start_block_finds_a_direction_the_base_hides():
    """A new top direction along a *low* base vector is invisible to iteration from the base's top
    vectors (that block is invariant); putting ΔW's range in the start block finds it."""
    w0, U, S, V = designed(120, 100, seed=6, dtype=torch.float64)
    wt = w0 + 3 * float(S[0]) * torch.outer(U[:, 40], V[:, 40])
    base = isvd.base_svd(w0, cache=False)
    blind = isvd.subspace_top(wt, 5, base.U, None, buffer=10)
    assert blind is not None and float(blind.S[0]) < float(S[0]) * 1.01  # converged, wrongly
    top = isvd.top_singular(wt, 5, solver="subspace", base=base, delta=wt - w0, extra_rank=1)
    assert float(top.S[0]) == pytest.approx(3 * float(S[0]) + float(S[40]), rel=1e-9)
    assert abs(float(top.U[:, 0] @ U[:, 40])) > 1 - 1e-9


# --------------------------------------------------------------------------- whole pairs


def _llama_with_planted_q(tmp_path=None):
    """Tiny Llama pair: layer 1's q is a designed matrix; the fine-tune adds the planted direction."""
    base = tiny.llama(seed=0)
    w0, wt, *_ = planted(32, 32)
    with torch.no_grad():
        base.model.layers[1].self_attn.q_proj.weight.copy_(w0.float())
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[1].self_attn.q_proj.weight.copy_(wt.float())
    return base, ft


def test_planted_pair_flags_one_matrix_one_vector():
    base, ft = _llama_with_planted_q()
    pair = load_pair(base, ft, label="planted")
    for solver in SOLVERS:
        report = intruder_dimensions(pair, k=10, solver=solver, cache=False, progress=False)
        flagged = report.intruders()
        assert list(zip(flagged["matrix"], flagged["j"])) == [("blocks.1.attn.q", 4)]
        assert report.counts()["n_intruders"].tolist() == [1]
    again = intruder_dimensions(pair, k=10, cache=False, progress=False)
    assert again.table.equals(intruder_dimensions(pair, k=10, cache=False, progress=False).table)
    wide = intruder_dimensions(pair, k=10, dtype=torch.float64, cache=False, progress=False)
    assert wide.counts()["n_intruders"].tolist() == [1]


@pytest.fixture(scope="module")
def zoo_like(tmp_path_factory):
    """A saved tiny Llama base with LoRA r=2, r=4 (rsLoRA) adapters and a full fine-tune."""
    root = tmp_path_factory.mktemp("intruders")
    base = tiny.llama(seed=0)
    tiny.save(base, root / "base")
    tiny.save(tiny.perturbed(base, scale=0.01), root / "full")
    tiny.lora_adapter(root / "base", root / "lora2", r=2, alpha=4, seed=3)
    tiny.lora_adapter(root / "base", root / "rs4", r=4, alpha=8, rslora=True, seed=4)
    return root


def _pairs(root):
    return [load_pair(root / "base", root / "lora2"), load_pair(root / "base", root / "rs4"),
            load_pair(root / "base", root / "full")]


def test_counts_equal_the_naive_two_svd_computation(zoo_like, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    pairs = _pairs(zoo_like)
    for solver in SOLVERS:
        report = intruder_dimensions(pairs, k=5, solver=solver, progress=False)
        per_matrix = report.counts(by=("pair", "matrix"))
        for pair in pairs:
            got = per_matrix[per_matrix["pair"] == pair.label].set_index("matrix")["n_intruders"]
            assert got.to_dict() == naive_intruder_counts(pair, k=5)
    totals = report.counts()["n_intruders"].tolist()
    assert all(0 < t < 5 * 14 for t in totals)  # a non-trivial mix, so equality means something
    # re-thresholding without new SVDs equals the naive computation at other ε and smaller k
    for eps in (0.3, 0.7):
        sweep = report.sweep([eps]).set_index("pair")["n_intruders"]
        for pair in pairs:
            assert sweep[pair.label] == sum(naive_intruder_counts(pair, k=5, eps=eps).values())
    assert report.counts(k=3)["n_intruders"].tolist() == [
        sum(naive_intruder_counts(p, k=3).values()) for p in pairs]


def test_gpt2_fused_and_transposed_matrices_agree_with_naive(tmp_path):
    base = tiny.gpt2(seed=0)
    tiny.save(base, tmp_path / "base")
    tiny.lora_adapter(tmp_path / "base", tmp_path / "lora", r=2, alpha=4)
    pair = load_pair(tmp_path / "base", tmp_path / "lora")
    report = intruder_dimensions(pair, k=5, cache=False, progress=False)
    got = report.counts(by="matrix").set_index("matrix")["n_intruders"].to_dict()
    assert got == naive_intruder_counts(pair, k=5)


def test_base_svd_is_computed_once_and_cached_by_content(zoo_like, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or real_svd(*a, **kw))
    report = intruder_dimensions(_pairs(zoo_like), k=5, progress=False)
    n_matrices, ties = 14, int(report.solver["tie"].sum())
    assert len(calls) == n_matrices + ties  # one base SVD per matrix for all three fine-tunes
    files = list((tmp_path / "cache" / isvd.CACHE_KIND).iterdir())
    assert len(files) == n_matrices
    calls.clear()
    again = intruder_dimensions(_pairs(zoo_like), k=5, progress=False)  # fresh pair objects
    assert len(calls) == ties and again.table.equals(report.table)
    assert len(list((tmp_path / "cache" / isvd.CACHE_KIND).iterdir())) == n_matrices


def test_report_round_trip_and_views(zoo_like, tmp_path):
    report = intruder_dimensions(_pairs(zoo_like), k=5, cache=False, progress=False,
                                 keep_full=["blocks.1.attn.v"])
    report.save(tmp_path / "report")
    again = IntruderReport.load(tmp_path / "report")
    assert again.table.equals(report.table) and again.options == report.options
    assert again.pairs.equals(report.pairs) and again.solver.equals(report.solver)
    assert set(again.similarity) == set(report.similarity)
    full = again.similarity_of("LoRA r=2", "blocks.1.attn.v", full=True)
    assert full.shape == (16, 16)  # v is [16, 32]: 16 left singular vectors each side
    torch.testing.assert_close(full[:5], again.similarity_of("LoRA r=2", "blocks.1.attn.v"),
                               atol=1e-4, rtol=0)
    sweep = report.sweep([0.5])
    assert sweep["n_intruders"].tolist() == report.counts()["n_intruders"].tolist()
    assert "IntruderReport" in again._repr_html_()
    with pytest.raises(ValueError, match="k=5"):
        report.counts(k=8)


def test_bad_input_raises_clear_errors(zoo_like):
    pairs = _pairs(zoo_like)
    with pytest.raises(ValueError, match="eps"):
        intruder_dimensions(pairs[0], eps=1.5, progress=False)
    with pytest.raises(ValueError, match="unique"):
        intruder_dimensions([pairs[0], load_pair(zoo_like / "base", zoo_like / "lora2")],
                            progress=False)
    other = load_pair(tiny.llama(seed=0, layers=3), tiny.llama(seed=1, layers=3), label="3 layers")
    with pytest.raises(ArchitectureMismatchError, match="different matrices"):
        intruder_dimensions([pairs[0], other], progress=False)
    with pytest.raises(ArchitectureMismatchError, match="one matrix in two versions"):
        scan_matrix(torch.zeros(4, 5), torch.zeros(5, 4), 2, 0.5)


# --------------------------------------------------------------------------- mitigation


def test_scale_intruders_shrinks_exactly_the_planted_direction(tmp_path):
    base, ft = _llama_with_planted_q()
    pair = load_pair(base, ft, label="planted", tokenizer=tiny.word_tokenizer(tmp_path / "tok"))
    half = scale_intruders(pair, lam=0.5, k=10, progress=False, cache=False)
    wt = pair.finetuned_matrix("blocks.1.attn.q")
    ref = isvd.full_top(wt, 10)
    expected = wt - 0.5 * float(ref.S[4]) * torch.outer(ref.U[:, 4], ref.V[:, 4])
    torch.testing.assert_close(half.finetuned_matrix("blocks.1.attn.q"), expected, atol=1e-5,
                               rtol=0)
    for name in pair.matrix_names():
        if name != "blocks.1.attn.q":
            assert torch.equal(half.finetuned_matrix(name), pair.finetuned_matrix(name))
    shrunk = intruder_dimensions(half, k=10, cache=False, progress=False).intruders()
    assert shrunk["sigma_j"].tolist() == pytest.approx([0.5 * float(ref.S[4])], rel=1e-4)
    gone = scale_intruders(pair, lam=0.0, k=10, out=tmp_path / "lam0", progress=False, cache=False)
    assert intruder_dimensions(gone, k=10, cache=False, progress=False).counts()[
        "n_intruders"].tolist() == [0]
    saved = json.loads((tmp_path / "lam0" / "interp.json").read_text())
    assert saved["intruder_lambda"] == 0.0 and gone.label == saved["label"]


def test_scale_intruders_writes_back_into_fused_transposed_gpt2_weights():
    base = tiny.gpt2(seed=0)
    ft = copy.deepcopy(base)
    w0, wt, *_ = planted(32, 32)
    with torch.no_grad():  # canonical k of layer 0 = c_attn.weight[:, 32:64].T (Conv1D, fused)
        base.transformer.h[0].attn.c_attn.weight[:, 32:64] = w0.float().T
        ft.transformer.h[0].attn.c_attn.weight[:, 32:64] = wt.float().T
    pair = load_pair(base, ft)
    report = intruder_dimensions(pair, k=10, cache=False, progress=False)
    assert set(report.intruders()["matrix"]) == {"blocks.0.attn.k"}
    scaled = scale_intruders(pair, lam=0.0, k=10, progress=False, cache=False)
    for name in ("blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.mlp.up"):
        assert torch.equal(scaled.finetuned_matrix(name), pair.finetuned_matrix(name))
    moved = scaled.finetuned_matrix("blocks.0.attn.k") - pair.finetuned_matrix("blocks.0.attn.k")
    assert torch.linalg.matrix_rank(moved, atol=1e-4) == 1


def test_tradeoff_end_points_are_the_models_themselves(tmp_path):
    base, ft = _llama_with_planted_q()
    tokenizer = tiny.word_tokenizer(tmp_path / "tok")
    pair = load_pair(base, ft, tokenizer=tokenizer)
    words = tiny.WORDS
    task = Task("toy", [f"{words[i]} {words[i + 1]}" for i in range(20)],
                [f" {words[i + 2]}" for i in range(20)])
    texts = [" ".join(words[i : i + 6]) for i in range(0, 40, 3)]
    result = intruder_tradeoff(pair, task, texts, lams=(0.0, 1.0), k=10, progress=False,
                               cache=False)
    row = result.table.set_index("lam")
    ft_model = pair.model("finetuned")
    assert row.loc[1.0, "pretrain_loss"] == pytest.approx(text_loss(ft_model, tokenizer, texts),
                                                          rel=1e-6)
    assert row.loc[1.0, "task_accuracy"] == accuracy(ft_model, tokenizer, task)
    removed = scale_intruders(pair, lam=0.0, k=10, progress=False, cache=False).model("finetuned")
    assert row.loc[0.0, "pretrain_loss"] == pytest.approx(text_loss(removed, tokenizer, texts),
                                                          rel=1e-6)
    assert result.reference["base_pretrain_loss"] == pytest.approx(
        text_loss(pair.model("base"), tokenizer, texts), rel=1e-6)
    assert row["n_intruders_scaled"].tolist() == [1, 1]


# --------------------------------------------------------------------------- plots


def test_figures_show_the_report(zoo_like, tmp_path):
    import pandas as pd

    from interp.analysis.intruders_mitigation import IntruderTradeoff
    from interp.plots import intruders as plots

    report = intruder_dimensions(_pairs(zoo_like), k=5, cache=False, progress=False,
                                 keep_full=["blocks.0.attn.q"])
    figure = plots.intruder_eps_figure(report, [0.2, 0.5, 0.8])
    ax = figure.axes[0]
    sweep = report.sweep([0.2, 0.5, 0.8])
    for line, label in zip(ax.get_lines(), report.labels):
        assert list(line.get_ydata()) == sweep[sweep["pair"] == label]["n_intruders"].tolist()
    tradeoff = IntruderTradeoff(table=pd.DataFrame({
        "lam": [0.0, 1.0], "n_intruders_scaled": [3, 3], "pretrain_loss": [2.0, 2.5],
        "task_accuracy": [0.4, 0.9]}), options={"pair": "x", "task": "t"},
        reference={"base_pretrain_loss": 1.9, "base_task_accuracy": 0.1})
    figures = [figure, plots.intruder_similarity_figure(report, "blocks.0.attn.q"),
               plots.intruder_layers_figure(report), plots.intruder_rank_figure(report),
               plots.intruder_tradeoff_figure(tradeoff)]
    for fig in figures:
        assert fig._suptitle is not None or fig.axes[0].get_title()
        assert all(a.get_xlabel() for a in fig.axes if a.get_label() != "<colorbar>")
    for make in (plots.intruder_similarity_plotly, plots.intruder_eps_plotly,
                 plots.intruder_layers_plotly, plots.intruder_rank_plotly):
        assert make(report).layout.title.text
    assert plots.intruder_tradeoff_plotly(tradeoff).layout.title.text
