"""Figures for skill localization: accuracy vs sparsity, mask location, task overlap, reliability."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from interp.analysis.grafting import GraftMask
from interp.analysis.grafting_eval import GraftEvaluation, MaskOverlap, mask_location
from interp.plots.style import MODULE_ORDER, plt

VARIANT_STYLE = {
    "graft": {"color": "#d62728", "marker": "o", "label": "graft (learned mask)"},
    "base patch": {"color": "#1f77b4", "marker": "s", "label": "base patch (top-|Δθ|)"},
    "random": {"color": "#7f7f7f", "marker": "^", "label": "random mask"},
    "finetuned": {"color": "#2ca02c", "label": "fine-tune (all changes)"},
    "base": {"color": "#000000", "label": "base"},
}
VARIANTS_ORDER = ("graft", "base patch", "random", "finetuned", "base")
_MODULES = [*MODULE_ORDER, "norm", "other"]


def _pairs(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["pair"]))


def _panels(n: int, width: float = 3.3, height: float = 3.0):
    """A grid of ``n`` panels, at most three per row; unused axes hidden. Returns (figure, axes)."""
    cols = min(3, n)
    rows = -(-n // cols)
    figure, grid = plt.subplots(rows, cols, figsize=(0.8 + width * cols, 0.6 + height * rows),
                                sharey=True, squeeze=False, constrained_layout=True)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes[:n]


def _masks(masks) -> list[tuple[str, GraftMask]]:
    if isinstance(masks, GraftMask):
        return [(masks.label, masks)]
    if isinstance(masks, Mapping):
        return list(masks.items())
    return [(m.label, m) for m in masks]


# --------------------------------------------------------------------------- accuracy vs sparsity


def graft_accuracy_figure(result: GraftEvaluation, metric: str = "accuracy"):
    """Matplotlib: ``metric`` vs sparsity per pair: graft, base patch, random; fine-tune and base as lines."""
    pairs = _pairs(result.table)
    figure, axes = _panels(len(pairs))
    for ax, pair in zip(axes, pairs):
        table = result.table[result.table["pair"] == pair]
        for variant in ("graft", "base patch", "random"):
            rows = table[table["variant"] == variant].sort_values("sparsity")
            style = VARIANT_STYLE[variant]
            ax.plot(rows["sparsity"], rows[metric], marker=style["marker"], color=style["color"],
                    label=style["label"])
        for variant in ("finetuned", "base"):
            value = table.loc[table["variant"] == variant, metric]
            if len(value):
                style = VARIANT_STYLE[variant]
                ax.axhline(float(value.iloc[0]), color=style["color"], linestyle="--", linewidth=1,
                           label=style["label"])
        ax.set_xscale("log")
        ax.set_xlabel("sparsity (fraction of eligible entries)")
        ax.set_ylabel(metric)
        ax.set_title(pair, fontsize=9)
    axes[-1].legend(fontsize=7, loc="best")
    figure.suptitle(f"How few fine-tuning changes carry the skill ({result.options.get('task', '')})")
    return figure


def graft_accuracy_plotly(result: GraftEvaluation, metric: str = "accuracy"):
    """Plotly: the same panels, hover giving k and the exact values."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = _pairs(result.table)
    figure = make_subplots(rows=1, cols=len(pairs), subplot_titles=pairs, shared_yaxes=True)
    for col, pair in enumerate(pairs, start=1):
        table = result.table[result.table["pair"] == pair]
        masked = table[table["sparsity"].notna()]
        lo, hi = float(masked["sparsity"].min()), float(masked["sparsity"].max())
        for variant in VARIANTS_ORDER:
            style = VARIANT_STYLE[variant]
            rows = table[table["variant"] == variant].sort_values("sparsity")
            if variant in ("finetuned", "base"):
                x, y, k = [lo, hi], [float(rows[metric].iloc[0])] * 2, [int(rows["k"].iloc[0])] * 2
                line = {"color": style["color"], "dash": "dash"}
                mode = "lines"
            else:
                x, y, k = rows["sparsity"], rows[metric], rows["k"]
                line, mode = {"color": style["color"]}, "lines+markers"
            figure.add_trace(go.Scatter(
                x=x, y=y, mode=mode, line=line, name=style["label"], legendgroup=variant,
                showlegend=col == 1, customdata=np.asarray(k),
                hovertemplate="sparsity %{x:.1e} (k=%{customdata}): " + metric + " %{y:.3f}"
                + f"<extra>{style['label']}</extra>"), row=1, col=col)
        figure.update_xaxes(type="log", title_text="sparsity", row=1, col=col)
    figure.update_yaxes(title_text=metric, row=1, col=1)
    figure.update_layout(title=f"Graft {metric} vs sparsity ({result.options.get('task', '')})")
    return figure



# --------------------------------------------------------------------------- mask location


def _location_grid(location: pd.DataFrame, value: str) -> tuple[np.ndarray, list[str], list[int]]:
    modules = [m for m in _MODULES if m in set(location["module"])]
    layers = sorted(set(location["layer"]))
    grid = np.zeros((len(layers), len(modules)))
    for row in location.itertuples():
        grid[layers.index(row.layer), modules.index(row.module)] += getattr(row, value)
    return grid, modules, layers


def mask_location_figure(masks, value: str = "share"):
    """Matplotlib: per mask, a layer × module heat map of ``share`` (of the mask) or ``density``."""
    labeled = _masks(masks)
    location = mask_location(dict(labeled))
    figure, axes = plt.subplots(1, len(labeled), figsize=(1.4 + 2.6 * len(labeled), 3.4),
                                squeeze=False, constrained_layout=True)
    image = None
    vmax = float(location.groupby(["mask", "layer", "module"])[value].sum().max()) or 1.0
    for ax, (label, _) in zip(axes[0], labeled):
        grid, modules, layers = _location_grid(location[location["mask"] == label], value)
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(modules)), modules, rotation=45)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module")
        ax.set_title(label, fontsize=8)
    axes[0][0].set_ylabel("layer")
    what = "share of the mask" if value == "share" else "selected / entries in module"
    figure.colorbar(image, ax=axes[0].tolist(), label=what)
    figure.suptitle("Where the skill mask lives")
    return figure


def mask_location_plotly(masks, value: str = "share"):
    """Plotly: the same heat maps with counts on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labeled = _masks(masks)
    location = mask_location(dict(labeled))
    figure = make_subplots(rows=1, cols=len(labeled), subplot_titles=[l for l, _ in labeled],
                           shared_yaxes=True)
    for col, (label, _) in enumerate(labeled, start=1):
        grid, modules, layers = _location_grid(location[location["mask"] == label], value)
        counts, _, _ = _location_grid(location[location["mask"] == label], "selected")
        figure.add_trace(go.Heatmap(
            z=grid, x=modules, y=layers, customdata=counts, coloraxis="coloraxis",
            hovertemplate="layer %{y} %{x}: " + value + " %{z:.3g} (%{customdata:.0f} entries)"
            + f"<extra>{label}</extra>"), row=1, col=col)
        figure.update_xaxes(title_text="module", row=1, col=col)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_layout(title=f"Where the skill mask lives ({value})",
                         coloraxis={"colorscale": "Magma"})
    return figure


# --------------------------------------------------------------------------- overlap


def mask_overlap_figure(result: MaskOverlap):
    """Matplotlib: Jaccard and |A ∩ B| / min(|A|, |B|) heat maps, annotated."""
    labels = result.options["labels"]
    figure, axes = plt.subplots(1, 2, figsize=(3.0 + 1.6 * len(labels), 1.4 + 0.75 * len(labels)),
                                constrained_layout=True)
    for ax, value, title in ((axes[0], "jaccard", "Jaccard |A∩B| / |A∪B|"),
                             (axes[1], "overlap_min", "|A∩B| / min(|A|, |B|)")):
        grid = result.matrix(value).to_numpy(dtype=float)
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("mask B")
        ax.set_title(title, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8)
    axes[0].set_ylabel("mask A")
    figure.suptitle("Do different skills share parameters?")
    return figure


def mask_overlap_plotly(result: MaskOverlap):
    """Plotly: the two overlap heat maps with intersection counts on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = result.options["labels"]
    inter = result.matrix("intersection").to_numpy(dtype=float)
    figure = make_subplots(rows=1, cols=2, subplot_titles=["Jaccard", "|A∩B| / min(|A|,|B|)"])
    for col, value in enumerate(("jaccard", "overlap_min"), start=1):
        figure.add_trace(go.Heatmap(
            z=result.matrix(value).to_numpy(dtype=float), x=labels, y=labels, zmin=0, zmax=1,
            colorscale="Blues", customdata=inter, showscale=col == 2,
            hovertemplate="A %{y}<br>B %{x}<br>" + value + " %{z:.3f} (|A∩B| = %{customdata:.0f})"
            "<extra></extra>"), row=1, col=col)
        figure.update_xaxes(title_text="mask B", row=1, col=col)
    figure.update_yaxes(title_text="mask A", row=1, col=1)
    figure.update_layout(title="Overlap of skill masks")
    return figure


# --------------------------------------------------------------------------- reliability


def _reliability_rows(result: GraftEvaluation, sparsity: float | None) -> pd.DataFrame:
    bins = result.reliability
    masked = bins[bins["sparsity"].notna()]
    if sparsity is None and len(masked):
        sparsity = float(masked["sparsity"].min())
    keep = bins["sparsity"].isna() | np.isclose(bins["sparsity"].fillna(-1), sparsity)
    return bins[keep]


def reliability_figure(result: GraftEvaluation, sparsity: float | None = None):
    """Matplotlib: reliability diagram (accuracy vs confidence per bin) per pair, one line per variant.

    ``sparsity`` picks which masks to show (default: the smallest evaluated).
    """
    bins = _reliability_rows(result, sparsity)
    pairs = _pairs(bins)
    ece = {(r.pair, r.variant, None if pd.isna(r.sparsity) else float(r.sparsity)): r.ece
           for r in result.table.itertuples()}
    figure, axes = _panels(len(pairs))
    for ax, pair in zip(axes, pairs):
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=1, label="perfect calibration")
        for variant in ("finetuned", "graft", "base patch", "random", "base"):
            rows = bins[(bins["pair"] == pair) & (bins["variant"] == variant) & (bins["count"] > 0)]
            if not len(rows):
                continue
            style = VARIANT_STYLE[variant]
            s = rows["sparsity"].iloc[0]
            value = ece[(pair, variant, None if pd.isna(s) else float(s))]
            ax.plot(rows["confidence"], rows["accuracy"], marker=style.get("marker", "."),
                    color=style["color"], label=f"{variant} (ECE {float(value):.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(pair, fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    n_bins = result.options.get("n_bins")
    figure.suptitle(f"Reliability diagram ({n_bins} equal-width bins)")
    return figure


def reliability_plotly(result: GraftEvaluation, sparsity: float | None = None):
    """Plotly: the same reliability diagrams with bin counts on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    bins = _reliability_rows(result, sparsity)
    pairs = _pairs(bins)
    figure = make_subplots(rows=1, cols=len(pairs), subplot_titles=pairs, shared_yaxes=True)
    for col, pair in enumerate(pairs, start=1):
        figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                    line={"color": "#bbbbbb"}, showlegend=col == 1), row=1, col=col)
        for variant in ("finetuned", "graft", "base patch", "random", "base"):
            rows = bins[(bins["pair"] == pair) & (bins["variant"] == variant) & (bins["count"] > 0)]
            if not len(rows):
                continue
            style = VARIANT_STYLE[variant]
            figure.add_trace(go.Scatter(
                x=rows["confidence"], y=rows["accuracy"], mode="lines+markers",
                line={"color": style["color"]}, name=style["label"], legendgroup=variant,
                showlegend=col == 1, customdata=rows["count"],
                hovertemplate="confidence %{x:.3f}: accuracy %{y:.3f} (n=%{customdata})"
                + f"<extra>{variant}</extra>"), row=1, col=col)
        figure.update_xaxes(title_text="confidence", range=[0, 1], row=1, col=col)
    figure.update_yaxes(title_text="accuracy in bin", range=[0, 1], row=1, col=1)
    figure.update_layout(title=f"Reliability diagram ({result.options.get('n_bins')} bins)")
    return figure
