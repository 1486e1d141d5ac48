"""Figures for activation patching: layer × position and layer × head heat maps, component bars, CMAP.

Heat maps use a diverging scale centred on 0 and clipped to [-1, 1] for the
recovered fraction (1 = the site carries the whole source − target gap).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from interp.analysis.circuits import CmapTable
from interp.analysis.patching import PatchResult
from interp.plots.style import pair_colors, plt

_LABELS = {"recovered": "recovered fraction", "logit_diff": "logit difference", "prob": "p(answer)",
           "accuracy": "accuracy", "effect": "effect (patched − target)", "value": "metric"}


def _limits(values: np.ndarray, column: str) -> tuple[float, float]:
    if column == "recovered":
        return -1.0, 1.0
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    return -bound or -1.0, bound or 1.0


def _position_labels(result: PatchResult, columns) -> list[str]:
    return [f"{p}: {result.tokens[p]}" if 0 <= p < len(result.tokens) else str(p) for p in columns]


def _title(result: PatchResult) -> str:
    return f"{result.source_label} → {result.target_label}"


def _kinds(result: PatchResult) -> list[str]:
    table = result.table
    out = []
    if ((table["kind"] == "resid_pre") & (table["pos"] >= 0)).any():
        out.append("resid_pre")
    if ((table["kind"] == "z") & (table["pos"] < 0)).any():
        out.append("z")
    if table["kind"].isin(["attn_out", "mlp_out"]).any():
        out.append("components")
    return out


def _components(result: PatchResult, column: str) -> pd.DataFrame:
    """Per layer: attention output, MLP output (all positions) and the best single head."""
    table = result.table[result.table["pos"] < 0]
    frame = {}
    for kind, label in (("attn_out", "attention"), ("mlp_out", "MLP")):
        rows = table[table["kind"] == kind]
        if len(rows):
            frame[label] = rows.set_index("layer")[column]
    heads = table[table["kind"] == "z"]
    if len(heads):
        frame["best head"] = heads.groupby("layer")[column].max()
    return pd.DataFrame(frame)


# ---------------------------------------------------------------------------
# matplotlib
# ---------------------------------------------------------------------------


def patching_figure(result: PatchResult, column: str = "recovered"):
    """Every grid in ``result``: layer × position (token labels), layer × head, and per-layer components."""
    kinds = _kinds(result)
    widths = [3.0 if k == "resid_pre" else 1.4 for k in kinds]
    figure, axes = plt.subplots(1, len(kinds), figsize=(1.5 + 2.0 * sum(widths), 3.8), squeeze=False,
                                gridspec_kw={"width_ratios": widths}, constrained_layout=True)
    for ax, kind in zip(axes[0], kinds):
        if kind == "components":
            _bars(ax, _components(result, column), column)
            continue
        grid = result.grid(kind, column)
        vmin, vmax = _limits(grid.to_numpy(dtype=float), column)
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r", vmin=vmin, vmax=vmax,
                          origin="lower")
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set_ylabel("layer")
        if kind == "resid_pre":
            ax.set_xticks(range(len(grid.columns)), _position_labels(result, grid.columns), rotation=90,
                          fontsize=6)
            ax.set_xlabel("position: token (first prompt)")
            ax.set_title("residual stream entering each block", fontsize=9)
        else:
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_xlabel("head")
            ax.set_title("head outputs (hook_z)", fontsize=9)
        figure.colorbar(image, ax=ax, label=_LABELS.get(column, column), shrink=0.8)
    figure.suptitle(f"Activation patching {_title(result)} ({result.options.get('task', '')}, "
                    f"metric: {result.metric})")
    return figure


def _bars(ax, frame: pd.DataFrame, column: str) -> None:
    layers = list(frame.index)
    width = 0.8 / max(len(frame.columns), 1)
    for i, name in enumerate(frame.columns):
        ax.bar(np.arange(len(layers)) + (i - (len(frame.columns) - 1) / 2) * width, frame[name], width,
               label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_title(f"components (all positions): {_LABELS.get(column, column)}", fontsize=9)
    ax.legend(fontsize=7)


def compare_figure(results: Mapping[str, PatchResult], kind: str = "z", column: str = "recovered"):
    """One heat map per result (e.g. full FT and LoRA ranks, each fine-tune → base), shared scale."""
    labels = list(results)
    figure, axes = plt.subplots(1, len(labels), figsize=(2.0 + 2.6 * len(labels), 3.4), squeeze=False,
                                constrained_layout=True)
    image = None
    for ax, label in zip(axes[0], labels):
        grid = results[label].grid(kind, column)
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                          origin="lower")
        ax.set_yticks(range(len(grid.index)), grid.index)
        if kind == "resid_pre":
            ax.set_xticks(range(len(grid.columns)), _position_labels(results[label], grid.columns),
                          rotation=90, fontsize=5)
        else:
            ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_xlabel("head" if kind == "z" else "position")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label=_LABELS.get(column, column), shrink=0.8)
    figure.suptitle(f"Where each fine-tune's improvement lives ({kind}, fine-tune → base)")
    return figure


def component_figure(results: Mapping[str, PatchResult], column: str = "recovered"):
    """Recovered fraction by component group (attention / MLP per layer), one bar per result."""
    labels = list(results)
    frames = {label: _components(results[label], column) for label in labels}
    names = [f"L{layer} {comp}" for layer in frames[labels[0]].index for comp in frames[labels[0]].columns]
    colors = pair_colors(labels)
    figure, ax = plt.subplots(figsize=(2 + 0.45 * len(names) * max(1, len(labels) / 3), 3.6),
                              constrained_layout=True)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = frames[label].to_numpy(dtype=float).ravel()
        ax.bar(np.arange(len(values)) + (i - (len(labels) - 1) / 2) * width, values, width, label=label,
               color=colors[label])
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(1, color="grey", lw=0.6, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(_LABELS.get(column, column))
    ax.set_title("Recovered fraction by component (fine-tune → base, one component at a time)")
    ax.legend(fontsize=7, ncol=2)
    return figure


def cmap_figure(table: CmapTable | pd.DataFrame, column: str = "accuracy"):
    """The CMAP table as bars: target, source, target + source heads per group."""
    frame = table.table if isinstance(table, CmapTable) else table
    names = [m if not g else f"+ {g}" for m, g in zip(frame["model"], frame["group"])]
    figure, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 3.4), constrained_layout=True)
    colors = ["#999999", "#1f77b4"] + ["#ff7f0e"] * (len(names) - 2)
    ax.bar(range(len(names)), frame[column], color=colors[: len(names)])
    for i, value in enumerate(frame[column]):
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(_LABELS.get(column, column))
    ax.set_title("CMAP: the base with the fine-tune's activations patched in")
    return figure


# ---------------------------------------------------------------------------
# plotly
# ---------------------------------------------------------------------------


def _heatmap_trace(result: PatchResult, kind: str, column: str, label: str = ""):
    import plotly.graph_objects as go

    grid = result.grid(kind, column)
    custom = np.stack([result.grid(kind, m).to_numpy(dtype=float) for m in ("logit_diff", "accuracy")], -1)
    if kind == "resid_pre":
        x, what = _position_labels(result, grid.columns), "pos %{x}"
    else:
        x, what = [f"H{h}" for h in grid.columns], "%{x}"
    return go.Heatmap(
        z=grid.to_numpy(dtype=float), x=x, y=[f"L{l}" for l in grid.index], customdata=custom,
        coloraxis="coloraxis",
        hovertemplate=(f"layer %{{y}}, {what}<br>{_LABELS.get(column, column)} = %{{z:.3f}}"
                       "<br>logit diff = %{customdata[0]:.3f}<br>accuracy = %{customdata[1]:.3f}"
                       f"<extra>{label}</extra>"),
    )


def patching_plotly(result: PatchResult, column: str = "recovered"):
    """Plotly: the same panels as :func:`patching_figure`, with exact numbers on hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = _kinds(result)
    titles = {"resid_pre": "residual stream × position", "z": "head outputs", "components": "components"}
    widths = [0.55 if k == "resid_pre" else 0.225 for k in kinds]
    figure = make_subplots(rows=1, cols=len(kinds), subplot_titles=[titles[k] for k in kinds],
                           column_widths=[w / sum(widths) for w in widths])
    for col, kind in enumerate(kinds, start=1):
        if kind == "components":
            frame = _components(result, column)
            for name in frame.columns:
                figure.add_trace(go.Bar(x=[f"L{l}" for l in frame.index], y=frame[name], name=name,
                                        hovertemplate=f"{name} %{{x}}: %{{y:.3f}}<extra></extra>"), row=1, col=col)
            figure.update_xaxes(title_text="layer", row=1, col=col)
        else:
            figure.add_trace(_heatmap_trace(result, kind, column), row=1, col=col)
            figure.update_xaxes(title_text="position: token" if kind == "resid_pre" else "head", row=1, col=col)
            figure.update_yaxes(title_text="layer", row=1, col=col)
    vmin, vmax = _limits(result.table[column].to_numpy(dtype=float), column)
    figure.update_layout(title=f"Activation patching {_title(result)} (metric: {result.metric})",
                         coloraxis={"colorscale": "RdBu", "reversescale": True, "cmin": vmin, "cmax": vmax,
                                    "colorbar": {"title": _LABELS.get(column, column)}},
                         barmode="group", legend={"x": 1.08})
    return figure


def compare_plotly(results: Mapping[str, PatchResult], kind: str = "z", column: str = "recovered"):
    """Plotly: :func:`compare_figure` with hover text."""
    from plotly.subplots import make_subplots

    labels = list(results)
    figure = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, shared_yaxes=True)
    for col, label in enumerate(labels, start=1):
        figure.add_trace(_heatmap_trace(results[label], kind, column, label), row=1, col=col)
        figure.update_xaxes(title_text="head" if kind == "z" else "position", row=1, col=col)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    figure.update_layout(title=f"Where each fine-tune's improvement lives ({kind}, fine-tune → base)",
                         coloraxis={"colorscale": "RdBu", "reversescale": True, "cmin": -1, "cmax": 1,
                                    "colorbar": {"title": _LABELS.get(column, column)}})
    return figure


def component_plotly(results: Mapping[str, PatchResult], column: str = "recovered"):
    """Plotly: :func:`component_figure`."""
    import plotly.graph_objects as go

    figure = go.Figure()
    colors = pair_colors(list(results))
    for label, result in results.items():
        frame = _components(result, column)
        names = [f"L{layer} {comp}" for layer in frame.index for comp in frame.columns]
        figure.add_trace(go.Bar(x=names, y=frame.to_numpy(dtype=float).ravel(), name=label,
                                marker_color=colors[label],
                                hovertemplate="%{x}: %{y:.3f}<extra>" + label + "</extra>"))
    figure.update_layout(title="Recovered fraction by component (fine-tune → base)", barmode="group",
                         yaxis_title=_LABELS.get(column, column), xaxis_title="component")
    return figure


def cmap_plotly(table: CmapTable | pd.DataFrame, column: str = "accuracy"):
    """Plotly: :func:`cmap_figure`."""
    import plotly.graph_objects as go

    frame = table.table if isinstance(table, CmapTable) else table
    names = [m if not g else f"+ {g}" for m, g in zip(frame["model"], frame["group"])]
    figure = go.Figure(go.Bar(
        x=names, y=frame[column], customdata=np.stack([frame["n_sites"], frame["recovered"]], -1),
        hovertemplate=("%{x}<br>" + _LABELS.get(column, column) + " = %{y:.3f}<br>sites: %{customdata[0]}"
                       "<br>recovered: %{customdata[1]:.3f}<extra></extra>")))
    figure.update_layout(title="CMAP: the base with the fine-tune's activations patched in",
                         yaxis_title=_LABELS.get(column, column))
    return figure
