"""Figures of what a run looks like: x̂0 step grids, filmstrips, playback, σ schedules, the answer per step, layer x
frame token norms, PCA of block outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..frames import Frames, upscale
from .common import EXPERT_SYMBOLS, GAP, MARGIN, _categorical, _centres, _image, _mosaic, _styled, png_uri


@_styled
def steps_grid(frames: Frames, sigma: dict[int, float] | None = None, title: str = "x̂0 over steps") -> go.Figure:
    """The paper's Fig. 1 as one image: rows = denoising steps (top = noisiest), columns = video frames."""
    tiles = upscale(frames.pixels, 64)  # (step, frame, h, w, 3)
    h, w = tiles.shape[2:4]
    fig = _image(_mosaic(tiles, 255), title)
    sigma = sigma or {}
    ylabels = [f"step {s}" + (f" · σ={sigma[s]:.2f}" if s in sigma else "") for s in frames.steps]
    fig.update_xaxes(tickvals=_centres(len(frames.frames), w), ticktext=[f"frame {f}" for f in frames.frames],
                     side="top", showticklabels=True)
    fig.update_yaxes(tickvals=_centres(len(frames.steps), h), ticktext=ylabels, showticklabels=True)
    fig.update_layout(height=min(2400, 80 + len(frames.steps) * max(h, 40) + 20))
    return fig


@_styled
def filmstrip(video: np.ndarray, frame_ids: list[int], title: str) -> go.Figure:
    """(frame, h, w, 3) uint8 as one row of frames."""
    tiles = upscale(video, 64)[None]
    fig = _image(_mosaic(tiles, 255), title)
    fig.update_xaxes(tickvals=_centres(len(frame_ids), tiles.shape[3]),
                     ticktext=[f"frame {f}" for f in frame_ids], showticklabels=True)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(height=max(160, tiles.shape[2] + 90))
    return fig


@_styled
def steps_animation(frames: Frames, duration_ms: int = 400) -> go.Figure:
    """x̂0 frames as a filmstrip that plays over steps (plotly's play button and step slider)."""
    tiles = upscale(frames.pixels, 64)  # (step, frame, h, w, 3)
    strips = [png_uri(_mosaic(t[None], 255)) for t in tiles]
    h, w = tiles.shape[2], tiles.shape[1] * (tiles.shape[3] + GAP) - GAP
    fig = _image(_mosaic(tiles[:1], 255), "x̂0 playing over denoising steps")
    fig.frames = [go.Frame(data=[go.Image(source=uri)], name=str(s)) for uri, s in zip(strips, frames.steps)]
    play = dict(frame=dict(duration=duration_ms, redraw=True), fromcurrent=True, transition=dict(duration=0))
    fig.update_layout(
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.08, xanchor="left", yanchor="top",
                          buttons=[dict(label="▶", method="animate", args=[None, play]),
                                   dict(label="■", method="animate", args=[[None], dict(mode="immediate",
                                                                                         frame=dict(duration=0))])])],
        sliders=[dict(x=0.08, y=-0.02, len=0.92, currentvalue=dict(prefix="step "),
                      steps=[dict(label=str(s), method="animate", args=[[str(s)], dict(mode="immediate",
                                                                                        frame=dict(redraw=True))])
                             for s in frames.steps])],
        height=max(260, h + 200))
    fig.update_xaxes(tickvals=_centres(len(frames.frames), tiles.shape[3]),
                     ticktext=[f"frame {f}" for f in frames.frames], showticklabels=True, range=[-0.5, w - 0.5])
    fig.update_yaxes(showticklabels=False)
    return fig


@_styled
def sigma_schedule(runs: dict[str, pd.DataFrame]) -> go.Figure:
    """σ per step for one or more runs; marker symbol = expert (Wan 2.2's high/low-noise switch shows as a change)."""
    fig = go.Figure()
    for name, steps in runs.items():
        experts = list(dict.fromkeys(steps["expert"].astype(str)))
        symbols = [EXPERT_SYMBOLS[experts.index(e) % len(EXPERT_SYMBOLS)] for e in steps["expert"].astype(str)]
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["sigma"], mode="lines+markers", name=name,
                                 marker=dict(symbol=symbols, size=9), customdata=np.stack(
                                     [steps["t"], steps["expert"].astype(str)], axis=1),
                                 hovertemplate="step %{x}<br>σ=%{y:.4f}<br>t=%{customdata[0]:.1f}"
                                               "<br>expert %{customdata[1]}<extra>" + name + "</extra>"))
    fig.update_layout(title="noise level σ per step (marker = expert)", xaxis_title="step (0 = noisiest)",
                      yaxis_title="sigma", height=320, margin=MARGIN)
    return fig


@_styled
def answers_over_steps(table: pd.DataFrame) -> go.Figure:
    """derived/step_answers as sample x step: 1 where the answer read from x̂0 is correct."""
    grid = table.pivot_table(index="sample", columns="step", values="correct", aggfunc="mean")
    fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=[str(s) for s in grid.index], zmin=0, zmax=1,
                               colorscale=[[0, "#d62728"], [1, "#2ca02c"]], colorbar=dict(title="correct"),
                               hovertemplate="sample %{y}<br>step %{x}<br>correct %{z}<extra></extra>"))
    fig.update_layout(title="answer read from x̂0 at each step (green = correct)", xaxis_title="step",
                      yaxis_title="sample", height=max(220, 60 + 18 * len(grid)), margin=MARGIN)
    return _categorical(fig)


@_styled
def token_norm_mosaic(grid: np.ndarray, layers: list[int], frames: list[int], step: int,
                      max_tile: int = 24) -> go.Figure:
    """(layer, frame, row, col) token norms as small multiples: rows = layers, columns = frames (paper Fig. 6).
    Tiles wider than `max_tile` tokens are strided so the figure stays light (30 x 52 tokens per Wan frame)."""
    stride = max(1, -(-max(grid.shape[2:]) // max_tile))
    tiles = grid[:, :, ::stride, ::stride].astype(np.float32)
    img = _mosaic(tiles, np.nan)
    rows, cols = tiles.shape[2:4]
    fig = go.Figure(go.Heatmap(z=img, colorscale="Viridis", colorbar=dict(title="‖h‖"), hoverongaps=False,
                               hovertemplate="‖h‖=%{z:.3g}<extra></extra>"))
    fig.update_xaxes(tickvals=_centres(len(frames), cols), ticktext=[f"frame {f}" for f in frames], side="top",
                     showgrid=False, zeroline=False)
    fig.update_yaxes(tickvals=_centres(len(layers), rows), ticktext=[f"layer {l}" for l in layers],
                     autorange="reversed", showgrid=False, zeroline=False, scaleanchor="x")
    fig.update_layout(title=f"per-token L2 norm of each block's output at step {step}",
                      height=min(2000, 120 + len(layers) * max(rows * 6, 40)), margin=MARGIN)
    return fig


@_styled
def layer_frame_heatmap(mean: np.ndarray, layers: list[int], frames: list[int], step: int) -> go.Figure:
    """(layer, frame) mean token norm."""
    fig = go.Figure(go.Heatmap(z=mean, x=[str(f) for f in frames], y=[str(l) for l in layers],
                               colorscale="Viridis", colorbar=dict(title="mean ‖h‖"),
                               hovertemplate="layer %{y}<br>frame %{x}<br>mean ‖h‖=%{z:.3g}<extra></extra>"))
    fig.update_layout(title=f"mean token norm, layer x frame, step {step}", xaxis_title="frame",
                      yaxis_title="layer", yaxis_autorange="reversed", height=max(260, 60 + 22 * len(layers)),
                      margin=MARGIN)
    return fig


@_styled
def pca_scatter(table: pd.DataFrame, ratio: np.ndarray, color: str = "layer") -> go.Figure:
    """frame_mean PCA: one point per (layer, step); lines join the steps of one layer."""
    fig = go.Figure()
    for layer, part in table.groupby("layer"):
        fig.add_trace(go.Scatter(x=part["pc1"], y=part["pc2"], mode="lines", line=dict(width=1, color="#bbb"),
                                 hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(x=table["pc1"], y=table["pc2"], mode="markers", showlegend=False,
                             marker=dict(color=table[color], colorscale="Viridis" if color == "layer" else "Plasma",
                                         size=8, colorbar=dict(title=color)),
                             customdata=np.stack([table["layer"], table["step"], table["sigma"]], axis=1),
                             hovertemplate="layer %{customdata[0]}<br>step %{customdata[1]}"
                                           "<br>σ=%{customdata[2]:.3f}<extra></extra>"))
    fig.update_layout(title="PCA of frame-mean block outputs over layers and steps (lines join one layer's steps)",
                      xaxis_title=f"PC1 ({ratio[0]:.0%} of variance)", yaxis_title=f"PC2 ({ratio[1]:.0%})",
                      height=460, margin=MARGIN)
    return fig
