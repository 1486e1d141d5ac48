"""Shared figure helpers: a headless backend, consistent colours per pair, saving both formats."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt

MODULE_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


def pair_colors(labels: list[str]) -> dict[str, str]:
    """A stable colour per pair label (tab10 order of first appearance)."""
    palette = plt.get_cmap("tab10").colors
    unique = list(dict.fromkeys(labels))
    return {label: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, label in enumerate(unique)}


def save_matplotlib(figure, path: str | Path) -> list[Path]:
    """Save ``figure`` as PNG (and PDF) at ``path`` (no suffix); returns written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, kwargs in ((".png", {"dpi": 150}), (".pdf", {})):
        target = path.with_suffix(suffix)
        figure.savefig(target, bbox_inches="tight", **kwargs)
        written.append(target)
    plt.close(figure)
    return written


def save_plotly(figure, path: str | Path) -> Path:
    """Save a plotly figure as standalone HTML (plotly.js inlined, so it opens offline)."""
    path = Path(path).with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
