"""Figures from results. Every function takes a result and returns a figure; nothing here computes.

``*_figure`` functions return matplotlib figures (PNG/PDF); ``*_plotly`` return
plotly figures (interactive HTML, notebooks).
"""

from interp.plots.weight_change import weight_change_figure, weight_change_plotly

__all__ = ["weight_change_figure", "weight_change_plotly"]
