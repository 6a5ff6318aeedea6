"""Figures of the paper's claims read from measurement tables: accuracy vs sampling steps, commitment, noise at a
step vs a frame, sensitivity, patching over layers x steps, test-time scaling, latent ensembles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import MARGIN, _band, _categorical, _ci, _styled


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
