"""Figures of the book: one function per figure, each taking tidy tables and returning a matplotlib Figure.

Every figure is made by :func:`figure` (or :func:`panels`, a wrapped grid of it): at most :data:`PAGE_WIDTH`
inches wide, at :data:`DPI`. The book's content column is about 760 px wide, so a text of ``s`` points in a
figure ``w`` inches wide reads at ``s * 760 / (w * 72)`` px there; at 8 in the smallest text of these figures
(8 pt) reads at about 10.6 px. A row of panels that would be wider wraps into more rows instead of shrinking
its text (tests/test_figure_legibility.py checks every figure).
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt

__all__ = ["DPI", "PAGE_WIDTH", "figure", "panels"]

DPI = 150         # the inline PNG: 1,200 px for a page-wide figure, still sharp once the page scales it on 2x screens
PAGE_WIDTH = 8.0  # inches: the widest figure (the ~760 px column shows 1 pt as 760 / (8 * 72) = 1.32 px)


def figure(nrows=1, ncols=1, width=PAGE_WIDTH, height=3.4, **kw):
    """``plt.subplots(nrows, ncols, **kw)`` of ``width`` x ``height`` inches (the width capped at
    :data:`PAGE_WIDTH`) at :data:`DPI`, laid out by matplotlib's constrained layout (room for titles,
    colour bars and legends outside the axes; so no ``tight_layout``)."""
    kw.setdefault("layout", "constrained")
    return plt.subplots(nrows, ncols, figsize=(min(width, PAGE_WIDTH), height), dpi=DPI, **kw)


def panels(n, max_cols=2, panel_width=4.0, panel_height=3.0, **kw):
    """(figure, [n axes]): ``n`` panels, at most ``max_cols`` across, wrapping into more rows; each about
    ``panel_width`` x ``panel_height`` inches (the row capped at :data:`PAGE_WIDTH`); the unused places of the
    last row are removed."""
    ncols = max(1, min(n, max_cols))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = figure(nrows, ncols, ncols * panel_width, nrows * panel_height, squeeze=False, **kw)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]
