"""Plotly figure builders for the dashboard and notebooks: x̂0 step grids, σ schedules, layer grids, PCA, and the
derived tables (probe grid, events, memory, interventions, commitment, propagation, patching, ensemble, search,
accuracy vs steps).

Owns how each quantity is drawn and labelled (axes use the project vocabulary: step, sigma, layer, frame, sample).
Every builder takes numpy arrays or DataFrames and returns a `go.Figure`; it reads no files. Imports numpy, pandas,
plotly, PIL and `frames` (the thumbnails it draws) only: never streamlit, torch, diffusers, analysis or views.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Callable

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .frames import Frames, upscale

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


def _categorical(fig: go.Figure) -> go.Figure:
    """Integer axes (step, layer, frame) as categories: one tick per cell, no fractional ticks."""
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


@_styled
def probe_heatmap(table: pd.DataFrame, metric: str) -> go.Figure:
    """One label's probe grid: layer x step of `metric`. Accuracy runs 0..1 with white at chance, selectivity
    -1..1 with white at 0, so grids of different labels and runs read alike."""
    grid = table.pivot_table(index="layer", columns="step", values=metric, aggfunc="mean")
    if metric in ("accuracy", "control_accuracy"):
        lo, hi, mid = 0.0, 1.0, float(np.clip(table["chance"].mean(), 0.0, 1.0))
    else:
        lo, hi, mid = -1.0, 1.0, 0.0
    pos = (mid - lo) / (hi - lo)
    scale = [[0.0, "#2166ac"], [pos, "#f7f7f7"], [1.0, "#b2182b"]] if 0 < pos < 1 else \
        ([[0.0, "#f7f7f7"], [1.0, "#b2182b"]] if pos <= 0 else [[0.0, "#2166ac"], [1.0, "#f7f7f7"]])
    fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, colorscale=scale, zmin=lo, zmax=hi,
                               colorbar=dict(title=metric), xgap=1, ygap=1,
                               hovertemplate="layer %{y}<br>step %{x}<br>" + metric + "=%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"probe {metric} per layer x step (white = {'chance ' if pos > 0 else ''}{mid:.2f}); "
                            "click a cell", xaxis_title="step (0 = noisiest)", yaxis_title="layer",
                      height=max(300, 80 + 22 * len(grid)), margin=MARGIN)
    return _categorical(fig)


def _ci(part: pd.DataFrame, y: str, low: str, high: str) -> dict | None:
    """Asymmetric error bars from interval columns, when the table has them."""
    if low not in part or high not in part:
        return None
    return dict(type="data", symmetric=False, array=part[high] - part[y], arrayminus=part[y] - part[low])


@_styled
def probe_curves(table: pd.DataFrame, metric: str, layer: int, step: int) -> go.Figure:
    """The clicked cell's row and column: `metric` over steps at `layer`, and over layers at `step`."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"over steps, layer {layer}", f"over layers, step {step}"))
    for col, (part, x) in enumerate(((table[table["layer"] == layer], "step"),
                                     (table[table["step"] == step], "layer")), start=1):
        part = part.sort_values(x)
        err = _ci(part, metric, f"{metric}_ci_low", f"{metric}_ci_high") if metric != "accuracy" else \
            _ci(part, metric, "ci_low", "ci_high")
        fig.add_trace(go.Scatter(x=part[x], y=part[metric], mode="lines+markers", error_y=err, name=metric,
                                 showlegend=col == 1), row=1, col=col)
        if metric in ("accuracy", "control_accuracy"):
            fig.add_trace(go.Scatter(x=part[x], y=part["chance"], mode="lines", line=dict(dash="dash", color="grey"),
                                     name="chance", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text=x, row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_layout(height=340, margin=MARGIN)
    return fig


@_styled
def event_timeline(events: pd.DataFrame) -> go.Figure:
    hover = [c for c in ("sigma", "expert", "key_before", "key_after", "score_before", "score_after",
                         "change_spread") if c in events]
    fig = px.scatter(events, x="step", y=events["sample"].astype(str), color="kind", symbol="kind", hover_data=hover)
    fig.update_traces(marker=dict(size=11))
    fig.update_layout(title="events per sample over steps", xaxis_title="step", yaxis_title="sample",
                      height=max(260, 80 + 18 * events["sample"].nunique()), margin=MARGIN)
    return fig


@_styled
def event_counts(events: pd.DataFrame) -> go.Figure:
    counts = events.groupby(["step", "kind"]).size().reset_index(name="count")
    fig = px.bar(counts, x="step", y="count", color="kind", barmode="stack")
    fig.update_layout(title="events by step and kind", height=320, margin=MARGIN)
    return fig


@_styled
def event_rates(rates: pd.DataFrame) -> go.Figure:
    """derived/event_rates: fraction of samples with each event kind at each step, with intervals."""
    fig = go.Figure()
    for kind, part in rates.groupby("kind"):
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["rate"], mode="lines+markers", name=str(kind),
                                 error_y=_ci(part, "rate", "ci_low", "ci_high")))
    fig.update_layout(title="event rate per step (fraction of samples; bars = instance bootstrap CI)",
                      xaxis_title="step (0 = noisiest)", yaxis_title="rate", height=340,
                      margin=MARGIN)
    return fig


@_styled
def convergence(table: pd.DataFrame) -> go.Figure:
    """derived/convergence for one sample: RMS distance of x̂0 to the final output, split static/moving."""
    fig = go.Figure()
    for col, name in (("dist_final", "all pixels"), ("scene_dist", "static scene"), ("motion_dist", "moving parts")):
        if col in table and table[col].notna().any():
            fig.add_trace(go.Scatter(x=table["step"], y=table[col], mode="lines+markers", name=name))
    fig.update_layout(title="distance of x̂0 to the final video", xaxis_title="step (0 = noisiest)",
                      yaxis_title="RMS distance", height=320, margin=MARGIN)
    return fig


@_styled
def memory_frames(table: pd.DataFrame, measure: str) -> go.Figure:
    """derived/memory, x̂0 rows of one measure: value per step x (frame, phase); 'hidden' = object out of sight."""
    part = table.assign(col=table["frame"].astype(str) + (" · " + table["phase"].astype(str) if "phase" in table
                                                          else ""))
    order = part.sort_values(["frame"])["col"].drop_duplicates().tolist()
    grid = part.pivot_table(index="step", columns="col", values="value", aggfunc="mean").reindex(columns=order)
    fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, zmin=0, zmax=1, colorscale="Viridis",
                               colorbar=dict(title=measure),
                               hovertemplate="step %{y}<br>frame · phase %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"{measure} read from x̂0, per step x frame", xaxis_title="frame · phase",
                      yaxis_title="step (0 = noisiest)", yaxis_autorange="reversed", height=420,
                      margin=MARGIN)
    return _categorical(fig)


@_styled
def phase_curves(table: pd.DataFrame, measure: str) -> go.Figure:
    """derived/memory rows aggregated per phase (frame = -1): value over steps, one line per phase."""
    fig = go.Figure()
    for phase, part in table.groupby("phase"):
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["value"], mode="lines+markers", name=str(phase),
                                 error_y=_ci(part, "value", "ci_low", "ci_high")))
    if "chance" in table and table["chance"].notna().any():
        fig.add_hline(y=float(table["chance"].dropna().iloc[0]), line_dash="dash", line_color="grey",
                      annotation_text="chance")
    fig.update_layout(title=f"{measure} per step, by phase (before / hidden / after)", xaxis_title="step",
                      yaxis_title=measure, yaxis_range=[-0.02, 1.02], height=340, margin=MARGIN)
    return fig


def _curve(fig: go.Figure, part: pd.DataFrame, name: str, row: int, col: int) -> None:
    part = part.sort_values("position")
    if {"ci_low", "ci_high"} <= set(part.columns):
        fig.add_trace(go.Scatter(x=list(part["position"]) + list(part["position"])[::-1],
                                 y=list(part["ci_high"]) + list(part["ci_low"])[::-1], fill="toself",
                                 line=dict(width=0), opacity=0.25, hoverinfo="skip", showlegend=False),
                      row=row, col=col)
    fig.add_trace(go.Scatter(x=part["position"], y=part["value"], mode="lines+markers", name=name), row=row, col=col)
    if "baseline" in part and part["baseline"].notna().any():
        fig.add_hline(y=float(part["baseline"].dropna().iloc[0]), line_dash="dash", line_color="grey", row=row,
                      col=col)


@_styled
def intervention_curves(table: pd.DataFrame) -> go.Figure:
    """Noise at one step (all frames) vs noise at one frame (all steps): score after the intervention."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("noise at one step (all frames)",
                                                        "noise at one frame (all steps)"), shared_yaxes=True)
    for col, kind in enumerate(("noise_step", "noise_frame"), start=1):
        part = table[table["kind"] == kind]
        by = part.groupby("strength", sort=True) if "strength" in part else [(None, part)]
        for strength, one in by:  # one line per λ when the table holds a strength sweep
            if not one.empty:
                _curve(fig, one, kind if strength is None else f"{kind}, λ={strength:g}", 1, col)
    fig.update_xaxes(title_text="step replaced", row=1, col=1)
    fig.update_xaxes(title_text="frame replaced", row=1, col=2)
    fig.update_yaxes(title_text="score", row=1, col=1)
    fig.update_layout(height=360, margin=MARGIN)
    return fig


@_styled
def layer_swap_bars(table: pd.DataFrame) -> go.Figure:
    part = table[table["kind"] == "layer_swap"].sort_values("position")
    fig = go.Figure(go.Bar(x=part["position"], y=part["value"], error_y=_ci(part, "value", "ci_low", "ci_high")))
    fig.update_layout(title="layer swap: how often the answer flips, per layer", xaxis_title="layer",
                      yaxis_title="flip rate", height=320, margin=MARGIN)
    return fig


@_styled
def propagation_matrix(table: pd.DataFrame, value: str | None = None) -> go.Figure:
    """Inject step x measure step, mean over layers: the per-sample token-level distance to the clean run
    (`distance`) when the table has it, else 1 - linear CKA across samples (`dissimilarity`)."""
    if "layer" in table and (table["layer"] == -1).any():  # the mean over layers is its own row (layer -1)
        table = table[table["layer"] == -1]
    value = value or ("distance" if "distance" in table else "dissimilarity")
    label = {"distance": "|Δh| / |h| (per token)", "dissimilarity": "1 - CKA"}.get(value, value)
    grid = table.pivot_table(index="inject_step", columns="measure_step", values=value, aggfunc="mean")
    fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, colorscale="Plasma",
                               colorbar=dict(title=label),
                               hovertemplate="inject %{y}<br>measure %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"propagation of a perturbation ({label}, mean over layers)", xaxis_title="measure step",
                      yaxis_title="inject step", yaxis_autorange="reversed", height=420,
                      margin=MARGIN)
    return _categorical(fig)


def _band(fig: go.Figure, x, y, low, high, name: str, dash: str = "solid", **where) -> None:
    """A line with its interval as a shaded band (one legend entry)."""
    x, low, high = list(x), list(low), list(high)
    fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", line=dict(width=0), opacity=0.2,
                             hoverinfo="skip", showlegend=False, legendgroup=name), **where)
    fig.add_trace(go.Scatter(x=x, y=list(y), mode="lines+markers", name=name, line=dict(dash=dash),
                             legendgroup=name), **where)


@_styled
def accuracy_vs_steps(table: pd.DataFrame) -> go.Figure:
    """Exact accuracy of the final video vs the number of sampling steps (log axis), one line per task (difficulty
    "all"), Wilson intervals as bands; dashed lines are tasks whose noise picks the answer."""
    fig = go.Figure()
    whole = table[table["difficulty"] == "all"] if "difficulty" in table else table
    for task, part in whole.groupby("task", sort=True):
        part = part.sort_values("n_steps")
        noise = part["regime"].eq("noise-picked").any() if "regime" in part else False
        _band(fig, part["n_steps"], part["accuracy"], part["ci_low"], part["ci_high"],
              f"{task} (n={int(part['n'].max())})", dash="dash" if noise else "solid")
    fig.update_xaxes(type="log", tickvals=sorted(whole["n_steps"].unique()), title_text="sampling steps")
    fig.update_layout(title="accuracy vs number of sampling steps (dashed: the noise picks the answer)",
                      yaxis_title="exact accuracy", yaxis_range=[0, 1.02], height=380, margin=MARGIN)
    return fig


@_styled
def commitment_curve(table: pd.DataFrame) -> go.Figure:
    """P(same final answer as the clean run) when x̂0 of step s−1 is kept and a fraction λ of the noise is
    redrawn at step s, one line per λ; accuracy of the re-noised runs dotted."""
    fig = go.Figure()
    for strength, part in table.groupby("strength", sort=True):
        part = part.sort_values("step")
        _band(fig, part["step"], part["same_rate"], part["ci_low"], part["ci_high"], f"same answer, λ={strength:g}")
        fig.add_trace(go.Scatter(x=part["step"], y=part["accuracy"], mode="lines", line=dict(dash="dot"),
                                 name=f"accuracy, λ={strength:g}"))
    regime = f" ({table['regime'].iloc[0]} answers)" if "regime" in table and len(table) else ""
    fig.update_layout(title=f"commitment: the answer after re-noising x̂0 at step s{regime}",
                      xaxis_title="step re-noised (0 = noisiest)", yaxis_title="rate", yaxis_range=[0, 1.02],
                      height=380, margin=MARGIN)
    return fig


@_styled
def strength_sweep(table: pd.DataFrame) -> go.Figure:
    """Accuracy after noise at one step (all frames) and at one frame (every step), off the data distribution
    (x <- (1-λ)x + λε, dashed) and on it (x̂0 kept, a fraction λ of the noise redrawn, solid), one line per λ."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=("noise at one step (all frames)", "noise at one frame (every step)"))
    for col, kinds in enumerate((("noise_step", "renoise_step"), ("noise_frame", "renoise_frame")), start=1):
        for (kind, strength), part in table[table["kind"].isin(kinds)].groupby(["kind", "strength"], sort=True):
            part = part.sort_values("position")
            on = kind.startswith("renoise")
            _band(fig, part["position"], part["value"], part["ci_low"], part["ci_high"],
                  f"{'on' if on else 'off'}-distribution, λ={strength:g}", dash="solid" if on else "dash",
                  row=1, col=col)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="latent frame", row=1, col=2)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_layout(title="noise at a step vs at a frame (dashed: off the data distribution)", height=400,
                      margin=MARGIN)
    return fig


@_styled
def sensitivity_curve(table: pd.DataFrame) -> go.Figure:
    """Per inject step (paper Fig. 3c as a curve): how far a re-noising perturbation carries — token-level
    distance of the last step's block outputs to the clean run's, RMS change of the final video, answer flips."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("|Δh| / |h| at the last step", "final video RMS change",
                                                        "answer changed"))
    table = table.sort_values("inject_step")
    for col, name in enumerate(("distance_last", "final_distance", "flip_rate"), start=1):
        _band(fig, table["inject_step"], table[name], table[f"{name}_ci_low"], table[f"{name}_ci_high"], name,
              row=1, col=col)
        fig.update_xaxes(title_text="inject step", row=1, col=col)
    fig.update_layout(title="sensitivity per inject step", height=360, margin=MARGIN, showlegend=False)
    return fig


@_styled
def patching_grid(table: pd.DataFrame, null: str = "random", metric: str = "flip") -> go.Figure:
    """Activation patching: effect (patch rate − null rate) per layer x step, for one null and metric; cells whose
    Holm-corrected p is below the level are marked with a star."""
    part = table[(table["null"] == null) & (table["metric"] == metric)]
    grid = part.pivot_table(index="layer", columns="step", values="effect", aggfunc="mean")
    stars = part.pivot_table(index="layer", columns="step", values="significant", aggfunc="max")
    text = np.where(stars.reindex_like(grid).fillna(False).to_numpy(dtype=bool), "★", "")
    fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, text=text, texttemplate="%{text}",
                               colorscale="RdBu", zmid=0, colorbar=dict(title=f"{metric} − null"), xgap=1, ygap=1,
                               hovertemplate="layer %{y}<br>step %{x}<br>effect %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"patching: {metric} rate minus the {null} null (★ Holm p < level)",
                      xaxis_title="step patched", yaxis_title="layer", height=max(300, 80 + 26 * len(grid)),
                      margin=MARGIN)
    return _categorical(fig)


@_styled
def scaling_curves(table: pd.DataFrame) -> go.Figure:
    """Test-time scaling: accuracy vs forward passes per instance (NFE, log axis), one line per method (and merge
    steps K / prune step k); the oracle "any of n correct" dotted as a ceiling."""
    fig = go.Figure()
    for (method, k), part in table.groupby(["method", "k"], sort=True):
        part = part.sort_values("nfe")
        name = method if method in ("single", "majority", "oracle_any", "steps", "noise_mean") else f"{method}, k={k}"
        dash = "dot" if method == "oracle_any" else "dash" if method == "noise_mean" else "solid"
        fig.add_trace(go.Scatter(x=part["nfe"], y=part["accuracy"], error_y=_ci(part, "accuracy", "ci_low", "ci_high"),
                                 mode="lines+markers", line=dict(dash=dash), name=name))
    fig.update_xaxes(type="log", title_text="forward passes per instance (NFE)")
    fig.update_layout(title="test-time scaling at equal compute", yaxis_title="accuracy", yaxis_range=[0, 1.02],
                      height=400, margin=MARGIN)
    return fig


@_styled
def ensemble_curves(table: pd.DataFrame) -> go.Figure:
    """Accuracy vs merge steps K, one line per (method, n), with confidence intervals when present."""
    fig = go.Figure()
    ks = sorted(table["k"].unique())
    for (method, n), part in table.groupby(["method", "n"]):
        part = part.sort_values("k")
        if len(part) == 1 and len(ks) > 1:  # no K to vary (the plain model, the noise-mean control): a level line
            part = pd.concat([part] * len(ks), ignore_index=True).assign(k=ks)
        err = _ci(part, "accuracy", "ci_low", "ci_high")
        dash = "dash" if "noise" in str(method) or "control" in str(method) else "solid"
        fig.add_trace(go.Scatter(x=part["k"], y=part["accuracy"], error_y=err, mode="lines+markers",
                                 line=dict(dash=dash), name=f"{method}, n={n}"))
    fig.update_layout(title="latent ensemble: accuracy vs merge steps K (dashed = noise-mean control)",
                      xaxis_title="K (steps merged)", yaxis_title="accuracy", height=400,
                      margin=MARGIN)
    return fig
