"""Figures for intruder dimensions: similarity heat map, count vs ε, where they sit, count vs rank, λ trade-off.

Every function takes an :class:`~interp.analysis.intruders.IntruderReport` (or
an :class:`~interp.analysis.intruders_mitigation.IntruderTradeoff`) and returns
a figure; nothing here computes an SVD.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from interp.analysis.intruders import IntruderReport, similarity_key
from interp.analysis.intruders_mitigation import IntruderTradeoff
from interp.plots.style import MODULE_ORDER, pair_colors, plt

_SIM_TITLE = "|cos| between fine-tuned and base left singular vectors"


# --------------------------------------------------------------------------- helpers


def busiest_matrix(report: IntruderReport, eps: float | None = None) -> str:
    """The matrix with the most intruders summed over pairs (first in scan order on ties)."""
    per_matrix = report.counts(eps, by="matrix")
    return str(per_matrix.loc[per_matrix["n_intruders"].idxmax(), "matrix"])


def _similarity_panel(report: IntruderReport, label: str, matrix: str,
                      n_tuned: int | None, n_base: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(similarity [rows, cols], intruder flags per row) for one pair's heat map."""
    key = similarity_key(label, matrix)
    if key in report.full_similarity:
        sim = report.full_similarity[key].numpy()
    else:
        sim = report.similarity_of(label, matrix).numpy()
    k = report.k
    n_tuned = min(sim.shape[0], n_tuned or (max(2 * k, 24) if sim.shape[0] > k else k))
    n_base = min(sim.shape[1], n_base or max(n_tuned, 24))
    flags = np.zeros(n_tuned, dtype=bool)
    rows = report.table[(report.table["pair"] == label) & (report.table["matrix"] == matrix)]
    for j, flag in zip(rows["j"], rows["is_intruder"]):
        if j < n_tuned:
            flags[j] = bool(flag)
    return sim[:n_tuned, :n_base], flags


def _labels(report: IntruderReport, pairs: list[str] | None) -> list[str]:
    labels = report.labels if pairs is None else list(pairs)
    unknown = [p for p in labels if p not in report.labels]
    if unknown:
        raise KeyError(f"pairs {unknown} are not in this report; it has {report.labels}")
    return labels


def _layer_grid(report: IntruderReport, label: str, eps: float | None):
    counts = report.counts(eps, by=("pair", "layer", "module"))
    counts = counts[counts["pair"] == label]
    modules = [m for m in MODULE_ORDER if m in set(counts["module"])]
    layers = sorted(set(counts["layer"]))
    grid = np.zeros((len(layers), len(modules)))
    for row in counts.itertuples():
        grid[layers.index(row.layer), modules.index(row.module)] = row.n_intruders
    return grid, modules, layers


def _rank_table(report: IntruderReport, eps: float | None) -> pd.DataFrame:
    counts = report.counts(eps).merge(report.pairs, on="pair")
    counts["kind"] = np.where(counts["method"] == "full", "full FT",
                              np.where(counts["rslora"], "rsLoRA", "LoRA"))
    return counts


# --------------------------------------------------------------------------- matplotlib


def intruder_similarity_figure(report: IntruderReport, matrix: str | None = None,
                               pairs: list[str] | None = None, n_tuned: int | None = None,
                               n_base: int | None = None):
    """Heat map of ``|Utᵀ U0|`` for one matrix, one panel per pair; intruder rows marked in red.

    Full fine-tuning looks near-diagonal (each tuned vector has a bright match);
    an intruder is a row with no bright cell. Uses the full similarity when the
    scan kept it (``keep_full``), else the top-k rows.
    """
    matrix = matrix or busiest_matrix(report)
    labels = _labels(report, pairs)
    figure, axes = plt.subplots(1, len(labels), figsize=(1.0 + 3.0 * len(labels), 3.6),
                                squeeze=False, constrained_layout=True)
    image = None
    for ax, label in zip(axes[0], labels):
        sim, flags = _similarity_panel(report, label, matrix, n_tuned, n_base)
        image = ax.imshow(sim, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        for j in np.nonzero(flags)[0]:
            ax.plot(-0.9, j, marker=">", color="#d62728", markersize=5, clip_on=False)
        ax.set_title(f"{label}: {int(flags.sum())} intruder(s)", fontsize=9)
        ax.set_xlabel("base singular vector i")
    axes[0][0].set_ylabel("fine-tuned singular vector j")
    figure.colorbar(image, ax=axes[0].tolist(), label=r"$|\cos(u_j^{ft}, u_i^{base})|$")
    figure.suptitle(f"{_SIM_TITLE}: {matrix} (ε = {report.eps:g}; ▸ = intruder)")
    return figure


def intruder_eps_figure(report: IntruderReport, eps_grid=None):
    """Model-level intruder count against the threshold ε, one curve per pair."""
    sweep = report.sweep(eps_grid)
    colors = pair_colors(report.labels)
    figure, ax = plt.subplots(figsize=(5.6, 3.8), constrained_layout=True)
    for label in report.labels:
        part = sweep[sweep["pair"] == label]
        ax.plot(part["eps"], part["n_intruders"], marker="o", markersize=3, label=label,
                color=colors[label])
    ax.axvline(report.eps, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("ε (a top-k vector is an intruder if max |cos| < ε)")
    ax.set_ylabel(f"intruder dimensions (top k = {report.k}, all matrices)")
    ax.set_ylim(bottom=0)
    ax.set_title("Intruder count vs threshold ε")
    ax.legend(fontsize=8)
    return figure


def intruder_layers_figure(report: IntruderReport, eps: float | None = None):
    """Where the intruders sit: count per layer × module, one panel per pair (numbers written in)."""
    labels = report.labels
    grids = [_layer_grid(report, label, eps) for label in labels]
    vmax = max(1.0, max(float(g.max()) for g, _, _ in grids))
    figure, axes = plt.subplots(1, len(labels), figsize=(2.2 + 2.4 * len(labels), 3.4),
                                squeeze=False, constrained_layout=True)
    image = None
    for ax, label, (grid, modules, layers) in zip(axes[0], labels, grids):
        image = ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=vmax)
        for (i, j), value in np.ndenumerate(grid):
            if value:
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                        color="white" if value > vmax / 2 else "black")
        ax.set_xticks(range(len(modules)), modules)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module")
        ax.set_title(f"{label}: {int(grid.sum())}", fontsize=9)
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label="intruders in matrix")
    eps = report.eps if eps is None else eps
    figure.suptitle(f"Intruder dimensions per matrix (ε = {eps:g}, k = {report.k})")
    return figure


def intruder_rank_figure(report: IntruderReport, eps: float | None = None):
    """Model-level count against LoRA rank (LoRA and rsLoRA), full FT as a horizontal line."""
    table = _rank_table(report, eps)
    figure, ax = plt.subplots(figsize=(5.0, 3.6), constrained_layout=True)
    for kind, marker in (("LoRA", "o"), ("rsLoRA", "s")):
        part = table[table["kind"] == kind].sort_values("lora_rank")
        if len(part):
            ax.plot(part["lora_rank"], part["n_intruders"], marker=marker, label=kind)
    for row in table[table["kind"] == "full FT"].itertuples():
        ax.axhline(row.n_intruders, color="black", linestyle="--", linewidth=1,
                   label=f"{row.pair} ({row.n_intruders})")
    ranks = sorted({int(r) for r in table["lora_rank"].dropna()})
    if ranks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("intruder dimensions (model)")
    eps = report.eps if eps is None else eps
    ax.set_title(f"Intruders vs rank (ε = {eps:g}, k = {report.k})")
    ax.legend(fontsize=8)
    return figure


def intruder_tradeoff_figure(result: IntruderTradeoff):
    """Scaling intruders by λ: held-out pretraining loss and task accuracy, base as reference."""
    table = result.table.sort_values("lam")
    figure, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4), constrained_layout=True)
    left.plot(table["lam"], table["pretrain_loss"], marker="o", color="#1f77b4")
    right.plot(table["lam"], table["task_accuracy"], marker="o", color="#2ca02c")
    ref = result.reference
    if "base_pretrain_loss" in ref:
        left.axhline(ref["base_pretrain_loss"], color="grey", linestyle="--", label="base")
        right.axhline(ref["base_task_accuracy"], color="grey", linestyle="--", label="base")
    left.set_xlabel("λ (intruder scale; 1 = fine-tuned)")
    right.set_xlabel("λ (intruder scale; 1 = fine-tuned)")
    left.set_ylabel("held-out pretraining loss (nats/token)")
    right.set_ylabel(f"{result.options.get('task', 'task')} accuracy")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(f"Scaling intruders of {result.options.get('pair', 'the fine-tune')}: "
                    f"{int(table['n_intruders_scaled'].iloc[0])} directions")
    return figure


# --------------------------------------------------------------------------- plotly


def intruder_similarity_plotly(report: IntruderReport, matrix: str | None = None,
                               pairs: list[str] | None = None, n_tuned: int | None = None,
                               n_base: int | None = None):
    """Plotly version of :func:`intruder_similarity_figure` (hover gives i, j and |cos|)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    matrix = matrix or busiest_matrix(report)
    labels = _labels(report, pairs)
    panels = [_similarity_panel(report, label, matrix, n_tuned, n_base) for label in labels]
    titles = [f"{label}: {int(flags.sum())} intruder(s)" for label, (_, flags) in zip(labels, panels)]
    figure = make_subplots(rows=1, cols=len(labels), subplot_titles=titles, shared_yaxes=True)
    for col, (label, (sim, flags)) in enumerate(zip(labels, panels), start=1):
        text = [[f"{'INTRUDER ' if flags[j] else ''}j={j}" for _ in range(sim.shape[1])]
                for j in range(sim.shape[0])]
        figure.add_trace(go.Heatmap(
            z=sim, zmin=0, zmax=1, coloraxis="coloraxis", text=text,
            hovertemplate="%{text}, base i=%{x}: |cos| = %{z:.3f}<extra>" + label + "</extra>"),
            row=1, col=col)
        figure.update_xaxes(title_text="base singular vector i", row=1, col=col)
    figure.update_yaxes(title_text="fine-tuned singular vector j", autorange="reversed", row=1, col=1)
    figure.update_layout(title=f"{_SIM_TITLE}: {matrix} (ε = {report.eps:g})",
                         coloraxis={"colorscale": "Magma", "cmin": 0, "cmax": 1})
    return figure


def intruder_eps_plotly(report: IntruderReport, eps_grid=None):
    """Plotly version of :func:`intruder_eps_figure`."""
    import plotly.graph_objects as go

    sweep = report.sweep(eps_grid)
    colors = pair_colors(report.labels)
    figure = go.Figure()
    for label in report.labels:
        part = sweep[sweep["pair"] == label]
        figure.add_trace(go.Scatter(x=part["eps"], y=part["n_intruders"], mode="lines+markers",
                                    name=label, line={"color": colors[label]}))
    figure.add_vline(x=report.eps, line_dash="dash", line_color="grey")
    figure.update_layout(title="Intruder count vs threshold ε",
                         xaxis_title="ε (a top-k vector is an intruder if max |cos| < ε)",
                         yaxis_title=f"intruder dimensions (top k = {report.k}, all matrices)")
    return figure


def intruder_layers_plotly(report: IntruderReport, eps: float | None = None):
    """Plotly version of :func:`intruder_layers_figure`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = report.labels
    grids = [_layer_grid(report, label, eps) for label in labels]
    vmax = max(1.0, max(float(g.max()) for g, _, _ in grids))
    figure = make_subplots(rows=1, cols=len(labels), shared_yaxes=True,
                           subplot_titles=[f"{l}: {int(g.sum())}" for l, (g, _, _) in zip(labels, grids)])
    for col, (label, (grid, modules, layers)) in enumerate(zip(labels, grids), start=1):
        figure.add_trace(go.Heatmap(
            z=grid, x=modules, y=layers, zmin=0, zmax=vmax, coloraxis="coloraxis",
            text=grid.astype(int), texttemplate="%{text}",
            hovertemplate="layer %{y} %{x}: %{z} intruder(s)<extra>" + label + "</extra>"),
            row=1, col=col)
        figure.update_xaxes(title_text="module", row=1, col=col)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    eps = report.eps if eps is None else eps
    figure.update_layout(title=f"Intruder dimensions per matrix (ε = {eps:g}, k = {report.k})",
                         coloraxis={"colorscale": "Reds"})
    return figure


def intruder_rank_plotly(report: IntruderReport, eps: float | None = None):
    """Plotly version of :func:`intruder_rank_figure`."""
    import plotly.graph_objects as go

    table = _rank_table(report, eps)
    figure = go.Figure()
    for kind in ("LoRA", "rsLoRA"):
        part = table[table["kind"] == kind].sort_values("lora_rank")
        if len(part):
            figure.add_trace(go.Scatter(x=part["lora_rank"], y=part["n_intruders"],
                                        mode="lines+markers", name=kind, text=part["pair"]))
    for row in table[table["kind"] == "full FT"].itertuples():
        figure.add_hline(y=row.n_intruders, line_dash="dash",
                         annotation_text=f"{row.pair} ({row.n_intruders})")
    eps = report.eps if eps is None else eps
    figure.update_layout(title=f"Intruders vs rank (ε = {eps:g}, k = {report.k})",
                         xaxis={"title": "LoRA rank r", "type": "log"},
                         yaxis_title="intruder dimensions (model)")
    return figure


def intruder_tradeoff_plotly(result: IntruderTradeoff):
    """Plotly version of :func:`intruder_tradeoff_figure`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = result.table.sort_values("lam")
    figure = make_subplots(rows=1, cols=2, subplot_titles=["held-out pretraining loss",
                                                           "task accuracy"])
    figure.add_trace(go.Scatter(x=table["lam"], y=table["pretrain_loss"], mode="lines+markers",
                                name="pretraining loss"), row=1, col=1)
    figure.add_trace(go.Scatter(x=table["lam"], y=table["task_accuracy"], mode="lines+markers",
                                name="task accuracy"), row=1, col=2)
    ref = result.reference
    if "base_pretrain_loss" in ref:
        figure.add_hline(y=ref["base_pretrain_loss"], line_dash="dash", row=1, col=1,
                         annotation_text="base")
        figure.add_hline(y=ref["base_task_accuracy"], line_dash="dash", row=1, col=2,
                         annotation_text="base")
    for col in (1, 2):
        figure.update_xaxes(title_text="λ (intruder scale; 1 = fine-tuned)", row=1, col=col)
    figure.update_yaxes(title_text="nats/token", row=1, col=1)
    figure.update_yaxes(title_text="accuracy", row=1, col=2)
    figure.update_layout(title=f"Scaling intruders of {result.options.get('pair', 'the fine-tune')}")
    return figure


__all__ = [
    "busiest_matrix", "intruder_eps_figure", "intruder_eps_plotly", "intruder_layers_figure",
    "intruder_layers_plotly", "intruder_rank_figure", "intruder_rank_plotly",
    "intruder_similarity_figure", "intruder_similarity_plotly", "intruder_tradeoff_figure",
    "intruder_tradeoff_plotly",
]
