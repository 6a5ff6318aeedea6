"""Figures of the per-run measurement tables: probe grids and curves, self-correction events, convergence, working
memory, interventions, layer swaps, propagation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import MARGIN, _categorical, _ci, _styled


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
