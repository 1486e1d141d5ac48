"""Heat maps of relative weight change, layer × module, one panel per pair."""

from __future__ import annotations

import numpy as np

from interp.analysis.weight_change import WeightChange
from interp.plots.style import MODULE_ORDER, plt


def _grid(result: WeightChange, label: str) -> tuple[np.ndarray, list[str], list[int]]:
    table = result.table[result.table["pair"] == label]
    modules = [m for m in MODULE_ORDER if m in set(table["module"])]
    layers = sorted(set(table["layer"]))
    grid = np.full((len(layers), len(modules)), np.nan)
    for row in table.itertuples():
        grid[layers.index(row.layer), modules.index(row.module)] = row.relative_change
    return grid, modules, layers


def weight_change_figure(result: WeightChange):
    """Matplotlib: one heat map per pair of ‖ΔW‖/‖W0‖, shared colour scale."""
    labels = list(dict.fromkeys(result.table["pair"]))
    vmax = float(result.table["relative_change"].max())
    figure, axes = plt.subplots(1, len(labels), figsize=(2.2 + 2.0 * len(labels), 3.4),
                                squeeze=False, constrained_layout=True)
    image = None
    for ax, label in zip(axes[0], labels):
        grid, modules, layers = _grid(result, label)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(modules)), modules)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label="‖ΔW‖_F / ‖W₀‖_F")
    figure.suptitle("How far each weight matrix moved")
    return figure


def weight_change_plotly(result: WeightChange):
    """Plotly: the same heat maps with hover text giving the exact numbers."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = list(dict.fromkeys(result.table["pair"]))
    vmax = float(result.table["relative_change"].max())
    figure = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, shared_yaxes=True)
    for col, label in enumerate(labels, start=1):
        grid, modules, layers = _grid(result, label)
        figure.add_trace(
            go.Heatmap(z=grid, x=modules, y=layers, zmin=0, zmax=vmax, coloraxis="coloraxis",
                       hovertemplate="layer %{y} %{x}: ‖ΔW‖/‖W₀‖ = %{z:.4f}<extra>" + label + "</extra>"),
            row=1, col=col,
        )
        figure.update_xaxes(title_text="module", row=1, col=col)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_layout(title="How far each weight matrix moved (‖ΔW‖_F / ‖W₀‖_F)",
                         coloraxis={"colorscale": "Viridis"})
    return figure
