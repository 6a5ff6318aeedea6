"""What every figure shares: the house style (`_styled`), margins, mosaics of thumbnails, PNG data URIs, interval
bands and error bars. Imports `frames` only."""

from __future__ import annotations

import base64
import functools
import io
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GAP = 2  # pixels between tiles of a mosaic
MARGIN = dict(l=20, r=20, t=70, b=40)  # axes grow into it (automargin); the title sits above top-side ticks
# Colour scales avoid "#000001".."#00000f": Streamlit's chart element treats those as theme placeholders and swaps
# them (Magma and Inferno start at "#000004" and turned light purple), so no Magma/Inferno here.
EXPERT_SYMBOLS = ("circle", "diamond", "square", "triangle-up")


def _styled(builder: Callable[..., go.Figure]) -> Callable[..., go.Figure]:
    """Every public builder: white template, axes that make room for their labels, the project margins."""
    @functools.wraps(builder)
    def wrapper(*args, **kwargs) -> go.Figure:
        fig = builder(*args, **kwargs)
        # plotly_white by hand: assigning a named template costs ~50 ms of validation per figure
        fig.update_layout(plot_bgcolor="white", paper_bgcolor="white")
        fig.update_xaxes(automargin=True, gridcolor="#ebebeb", zerolinecolor="#d9d9d9", linecolor="#d9d9d9")
        fig.update_yaxes(automargin=True, gridcolor="#ebebeb", zerolinecolor="#d9d9d9", linecolor="#d9d9d9")
        if _few_integers([t.x for t in fig.data if t.type in ("scatter", "bar") and t.x is not None]):
            fig.update_xaxes(dtick=1)  # steps, layers, frames, K: no 0.5 ticks
        return fig

    return wrapper


def _few_integers(columns: list, most: int = 30) -> bool:
    if not columns:
        return False
    values = np.concatenate([np.asarray(c, dtype=object).ravel() for c in columns])
    try:
        numbers = values.astype(np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers))
                and len(np.unique(numbers)) <= most)


def _mosaic(tiles: np.ndarray, fill: float | int) -> np.ndarray:
    """(rows, cols, h, w, ...) -> one image with GAP-pixel separators filled with `fill`."""
    rows, cols, h, w = tiles.shape[:4]
    out = np.full((rows * (h + GAP) - GAP, cols * (w + GAP) - GAP, *tiles.shape[4:]), fill, dtype=tiles.dtype)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = tiles[r, c]
    return out


def _centres(n: int, side: int) -> list[float]:
    return [i * (side + GAP) + (side - 1) / 2 for i in range(n)]


def png_uri(img: np.ndarray) -> str:
    """(h, w, 3) uint8 -> a PNG data URI (what `px.imshow(binary_string=True)` sends, at a fraction of its cost)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image(img: np.ndarray, title: str) -> go.Figure:
    fig = go.Figure(go.Image(source=png_uri(img), hoverinfo="skip"))
    fig.update_xaxes(showgrid=False, zeroline=False, range=[-0.5, img.shape[1] - 0.5])
    fig.update_yaxes(showgrid=False, zeroline=False, range=[img.shape[0] - 0.5, -0.5], scaleanchor="x")
    fig.update_layout(title=title, margin=MARGIN)
    return fig


def _categorical(fig: go.Figure) -> go.Figure:
    """Integer axes (step, layer, frame) as categories: one tick per cell, no fractional ticks."""
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def _ci(part: pd.DataFrame, y: str, low: str, high: str) -> dict | None:
    """Asymmetric error bars from interval columns, when the table has them."""
    if low not in part or high not in part:
        return None
    return dict(type="data", symmetric=False, array=part[high] - part[y], arrayminus=part[y] - part[low])


def _band(fig: go.Figure, x, y, low, high, name: str, dash: str = "solid", **where) -> None:
    """A line with its interval as a shaded band (one legend entry)."""
    x, low, high = list(x), list(low), list(high)
    fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", line=dict(width=0), opacity=0.2,
                             hoverinfo="skip", showlegend=False, legendgroup=name), **where)
    fig.add_trace(go.Scatter(x=x, y=list(y), mode="lines+markers", name=name, line=dict(dash=dash),
                             legendgroup=name), **where)
