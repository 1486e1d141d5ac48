"""Figures for the context knob: layer-search trace, projection violins, steering sweeps, separation vs PairAcc."""

from __future__ import annotations

import numpy as np

from interp.analysis.context_profile import SubspaceProfile
from interp.analysis.context_transfer import KnobTransfer
from interp.analysis.layer_search import LayerSearch
from interp.plots.style import pair_colors, plt

_PHASE_COLORS = {"upper": "#4c72b0", "lower": "#55a868", "range": "#c44e52", "refine": "#8172b2"}
_INTENT_COLORS = {"ctx": "#dd8452", "prior": "#4c72b0"}


def _patched(layers: str, n_layers: int) -> list[int]:
    """Parse the trace's layer label ('2-5', '3', '1,4,5', '[]') back to layer indices."""
    if layers in ("", "[]"):
        return []
    out: list[int] = []
    for part in layers.split(","):
        if "-" in part:
            low, high = part.split("-")
            out += list(range(int(low), int(high) + 1))
        else:
            out.append(int(part))
    return [layer for layer in out if layer < n_layers]


# ---------------------------------------------------------------------------
# layer search
# ---------------------------------------------------------------------------


def layer_search_figure(result: LayerSearch):
    """Matplotlib: per pairing, which layers each step patched (left) and the probabilities it saw (right)."""
    pairings = list(dict.fromkeys(result.table["pairing"]))
    threshold = result.options.get("threshold", 0.85)
    figure, axes = plt.subplots(len(pairings), 2, figsize=(10, 1.2 + 1.6 * len(pairings)),
                                squeeze=False, constrained_layout=True,
                                gridspec_kw={"width_ratios": [1.2, 1]})
    for (ax_layers, ax_p), pairing in zip(axes, pairings):
        trace = result.table[result.table["pairing"] == pairing].reset_index(drop=True)
        for row in trace.itertuples():
            for layer in _patched(row.layers, result.n_layers):
                ax_layers.add_patch(plt.Rectangle((layer - 0.45, row.Index - 0.4), 0.9, 0.8,
                                                  color=_PHASE_COLORS.get(row.phase, "grey"),
                                                  alpha=0.9 if row.accepted else 0.35))
        ax_layers.set_xlim(-0.6, result.n_layers - 0.4)
        ax_layers.set_ylim(len(trace) - 0.5, -0.5)
        ax_layers.set_yticks(range(len(trace)), [f"{r.phase} {r.Index}" for r in trace.itertuples()],
                             fontsize=7)
        ax_layers.set_xticks(range(result.n_layers))
        ax_layers.set_xlabel("patched attention layer (last token)")
        ax_layers.set_ylabel("search step")
        ax_layers.set_title(f"{pairing}: found {result.ranges.get(pairing)}", fontsize=9)
        steps = np.arange(len(trace))
        ax_p.plot(steps, trace["p_source_max"], "o-", label="p(source) max over layers")
        ax_p.plot(steps, trace["p_source_final"], "s-", label="p(source) output")
        ax_p.plot(steps, trace["p_target_final"], "^-", label="p(target) output")
        ax_p.axhline(threshold, color="grey", ls="--", lw=0.8)
        ax_p.set_ylim(-0.02, 1.02)
        ax_p.set_xlabel("search step")
        ax_p.set_ylabel("probability")
    axes[0][1].legend(fontsize=7, loc="lower right")
    figure.suptitle("Layer search: last-token attention outputs patched from the source prompt "
                    "(darker = accepted; dashed: threshold)")
    return figure


def layer_search_plotly(result: LayerSearch):
    """Plotly: the probabilities at each search step, hover naming the patched layers."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairings = list(dict.fromkeys(result.table["pairing"]))
    figure = make_subplots(rows=len(pairings), cols=1, shared_xaxes=False,
                           subplot_titles=[f"{p}: found {result.ranges.get(p)}" for p in pairings])
    for row, pairing in enumerate(pairings, start=1):
        trace = result.table[result.table["pairing"] == pairing].reset_index(drop=True)
        hover = [f"{r.phase}: layers {r.layers}" for r in trace.itertuples()]
        for column, name in (("p_source_max", "p(source) max over layers"),
                             ("p_source_final", "p(source) output"),
                             ("p_target_final", "p(target) output")):
            figure.add_trace(go.Scatter(x=list(range(len(trace))), y=trace[column], name=name,
                                        mode="lines+markers", text=hover, legendgroup=name,
                                        showlegend=row == 1,
                                        hovertemplate="%{text}<br>%{y:.3f}<extra>" + name
                                        + "</extra>"), row=row, col=1)
        figure.update_xaxes(title_text="search step", row=row, col=1)
        figure.update_yaxes(title_text="probability", range=[0, 1], row=row, col=1)
    figure.update_layout(title="Layer search trace", height=300 * len(pairings))
    return figure


# ---------------------------------------------------------------------------
# across models
# ---------------------------------------------------------------------------


def projection_violins_figure(result: KnobTransfer):
    """Matplotlib: violins of ``u·h`` by intent for every model (the paper's separation plot)."""
    models = list(dict.fromkeys(result.projections["model"]))
    figure, ax = plt.subplots(figsize=(1.6 + 1.5 * len(models), 3.8), constrained_layout=True)
    for offset, intent in ((-0.2, "ctx"), (0.2, "prior")):
        data = [result.projections[(result.projections["model"] == m)
                                   & (result.projections["intent"] == intent)]["projection"].to_numpy()
                for m in models]
        parts = ax.violinplot(data, positions=np.arange(len(models)) + offset, widths=0.38,
                              showmedians=True)
        for body in parts["bodies"]:
            body.set_facecolor(_INTENT_COLORS[intent])
            body.set_alpha(0.6)
        for name in ("cbars", "cmins", "cmaxes", "cmedians"):
            if name in parts:
                parts[name].set_color(_INTENT_COLORS[intent])
        ax.plot([], [], color=_INTENT_COLORS[intent], lw=6, alpha=0.6, label=f"intent = {intent}")
    aucs = result.table.set_index("model")["auc"]
    ax.set_xticks(range(len(models)), [f"{m}\nAUC {aucs[m]:.2f}" for m in models], fontsize=8)
    ax.set_xlabel("model (AUC of u·h by intent)")
    ax.set_ylabel("projection u·h (knob coordinate)")
    ax.set_title(f"Knob coordinate by intent (knob: {result.options.get('method')}, "
                 f"layer {result.options.get('layer')})")
    ax.legend(fontsize=8)
    return figure


def projection_violins_plotly(result: KnobTransfer):
    import plotly.graph_objects as go

    figure = go.Figure()
    for intent in ("ctx", "prior"):
        part = result.projections[result.projections["intent"] == intent]
        figure.add_trace(go.Violin(x=part["model"], y=part["projection"], name=f"intent = {intent}",
                                   side="negative" if intent == "ctx" else "positive",
                                   line_color=_INTENT_COLORS[intent], meanline_visible=True,
                                   hovertext=part["item"]))
    figure.update_layout(title="Knob coordinate u·h by intent, per model", violinmode="overlay",
                         xaxis_title="model", yaxis_title="projection u·h")
    return figure


def steering_sweep_figure(result: KnobTransfer):
    """Matplotlib: fraction of bare prompts answered from context / prior as the coordinate c varies."""
    models = list(dict.fromkeys(result.sweep["model"]))
    colors = pair_colors(models)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True, constrained_layout=True)
    chosen = result.table.set_index("model")
    for model in models:
        part = result.sweep[result.sweep["model"] == model]
        axes[0].plot(part["c"], part["frac_ctx"], "o-", color=colors[model], label=model, ms=3)
        axes[1].plot(part["c"], part["frac_prior"], "o-", color=colors[model], label=model, ms=3)
        axes[0].axvline(chosen.loc[model, "c_ctx"], color=colors[model], ls=":", lw=0.8)
        axes[1].axvline(chosen.loc[model, "c_prior"], color=colors[model], ls=":", lw=0.8)
    axes[0].set_title("answers from the context")
    axes[1].set_title("answers from memory (prior)")
    for ax in axes:
        ax.set_xlabel("knob coordinate c set at the last token")
    axes[0].set_ylabel("fraction of bare prompts")
    axes[1].legend(fontsize=7)
    figure.suptitle("Steering without instructions: sweep of c (dotted: chosen c per model)")
    return figure


def steering_sweep_plotly(result: KnobTransfer):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, shared_yaxes=True,
                           subplot_titles=["answers from the context", "answers from memory"])
    colors = pair_colors(list(dict.fromkeys(result.sweep["model"])))
    for model, part in result.sweep.groupby("model", sort=False):
        for col, column in ((1, "frac_ctx"), (2, "frac_prior")):
            figure.add_trace(go.Scatter(x=part["c"], y=part[column], name=model,
                                        legendgroup=model, showlegend=col == 1,
                                        line={"color": colors[model]}, mode="lines+markers"),
                             row=1, col=col)
            figure.update_xaxes(title_text="knob coordinate c", row=1, col=col)
    figure.update_yaxes(title_text="fraction of bare prompts", range=[0, 1], row=1, col=1)
    figure.update_layout(title="Steering sweep without instructions")
    return figure


def separation_scatter_figure(result: KnobTransfer, separation: str = "auc"):
    """Matplotlib: separation (AUC or d′) against PairAcc, instructed and steered, one point per model."""
    table = result.table
    colors = pair_colors(list(table["model"]))
    corr = result.correlations().set_index(["separation", "performance"])
    figure, ax = plt.subplots(figsize=(5.6, 4.2), constrained_layout=True)
    for row in table.itertuples():
        x = getattr(row, separation)
        ax.scatter(x, row.instructed_pair_acc, marker="o", color=colors[row.model], s=45)
        ax.scatter(x, row.steered_pair_acc, marker="x", color=colors[row.model], s=45)
        ax.annotate(row.model, (x, row.instructed_pair_acc), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.scatter([], [], marker="o", color="grey", label="instructed PairAcc (r = "
               f"{corr.loc[(separation, 'instructed_pair_acc'), 'pearson']:.2f})")
    ax.scatter([], [], marker="x", color="grey", label="steered, no instruction (r = "
               f"{corr.loc[(separation, 'steered_pair_acc'), 'pearson']:.2f})")
    ax.set_xlabel({"auc": "separation of intents along u (AUC)",
                   "d_prime": "separation of intents along u (d′)"}[separation])
    ax.set_ylabel("PairAcc")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Does separation along the knob predict performance?")
    return figure


def separation_scatter_plotly(result: KnobTransfer, separation: str = "auc"):
    import plotly.graph_objects as go

    table = result.table
    figure = go.Figure()
    for column, symbol, name in (("instructed_pair_acc", "circle", "instructed PairAcc"),
                                 ("steered_pair_acc", "x", "steered PairAcc (no instruction)")):
        figure.add_trace(go.Scatter(x=table[separation], y=table[column], mode="markers+text",
                                    text=table["model"], textposition="top center", name=name,
                                    marker={"symbol": symbol, "size": 10}))
    figure.update_layout(title="Separation along the knob vs PairAcc across models",
                         xaxis_title=separation, yaxis_title="PairAcc", yaxis_range=[0, 1.05])
    return figure


# ---------------------------------------------------------------------------
# subspace profile
# ---------------------------------------------------------------------------


def subspace_profile_figure(result: SubspaceProfile):
    """Matplotlib: fraction of answers flipped by swapping the top-k intent directions, per layer."""
    figure, ax = plt.subplots(figsize=(5.6, 3.8), constrained_layout=True)
    for layer, part in result.table.groupby("layer"):
        ax.plot(part["k"], part["interchange_acc"], "o-", label=f"blocks.{layer}.hook_resid_pre")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (top principal directions of h_ctx − h_prior swapped)")
    ax.set_ylabel("answers flipped to the other intent")
    ax.set_title("How many dimensions does the intent need at the last token?")
    ax.legend(fontsize=7)
    return figure


def subspace_profile_plotly(result: SubspaceProfile):
    import plotly.graph_objects as go

    figure = go.Figure()
    for layer, part in result.table.groupby("layer"):
        figure.add_trace(go.Scatter(x=part["k"], y=part["interchange_acc"], mode="lines+markers",
                                    name=f"blocks.{layer}.hook_resid_pre",
                                    customdata=part["variance_explained"],
                                    hovertemplate="k=%{x}: %{y:.3f} flipped "
                                    "(%{customdata:.2f} of the energy)<extra></extra>"))
    figure.update_layout(title="Interchange accuracy of the top-k intent subspace, per layer",
                         xaxis={"title": "k", "type": "log"},
                         yaxis={"title": "answers flipped", "range": [0, 1.02]})
    return figure
