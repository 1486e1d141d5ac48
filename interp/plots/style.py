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


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it; True if written.

    Figures are rendered deterministically (no timestamps, fixed element ids),
    so regenerating an unchanged figure leaves its file, and its mtime, alone.
    """
    from interp.cache import atomic_write_bytes

    if path.exists() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def save_matplotlib(figure, path: str | Path) -> list[Path]:
    """Save ``figure`` as PNG (150 dpi) and PDF at ``path`` (no suffix); returns both paths."""
    import io

    path = Path(path)
    written = []
    for suffix, kwargs in ((".png", {"dpi": 150, "metadata": {"Software": None}}),
                           (".pdf", {"metadata": {"CreationDate": None, "Producer": None,
                                                  "Creator": None}})):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=suffix[1:], bbox_inches="tight", **kwargs)
        write_if_changed(path.with_suffix(suffix), buffer.getvalue())
        written.append(path.with_suffix(suffix))
    plt.close(figure)
    return written


def save_plotly(figure, path: str | Path) -> Path:
    """Save a plotly figure as HTML that opens offline.

    plotly.js is written once per folder (``plotly.min.js``) and referenced,
    not inlined (3.5 MB per figure otherwise).
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    path = Path(path).with_suffix(".html")
    write_if_changed(path.parent / "plotly.min.js", get_plotlyjs().encode())
    page = pio.to_html(figure, include_plotlyjs="plotly.min.js", full_html=True,
                       div_id=path.stem.replace(".", "-"))
    write_if_changed(path, page.encode())
    return path
