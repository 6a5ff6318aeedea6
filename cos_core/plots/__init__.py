"""Plotly figure builders for the dashboard and notebooks (`from cos_core import plots; plots.steps_grid(...)`).

Owns how each quantity is drawn and labelled (axes use the project vocabulary: step, sigma, layer, frame, sample).
Every builder takes numpy arrays or DataFrames and returns a `go.Figure`; it reads no files. `watch` draws what a run
looks like, `measure` the per-run measurement tables, `claims` the paper's claims; `common` is the house style.
Imports numpy, pandas, plotly, PIL and `frames` only: never streamlit, torch, diffusers, analysis or views.
"""

from .claims import (accuracy_vs_steps, commitment_curve, ensemble_curves, patching_grid, scaling_curves,
                     sensitivity_curve, strength_sweep)
from .common import png_uri
from .measure import (convergence, event_counts, event_rates, event_timeline, intervention_curves, layer_swap_bars,
                      memory_frames, phase_curves, probe_curves, probe_heatmap, propagation_matrix)
from .watch import (answers_over_steps, filmstrip, layer_frame_heatmap, pca_scatter, sigma_schedule, steps_animation,
                    steps_grid, token_norm_mosaic)

__all__ = ["accuracy_vs_steps", "answers_over_steps", "commitment_curve", "convergence", "ensemble_curves",
           "event_counts", "event_rates", "event_timeline", "filmstrip", "intervention_curves", "layer_frame_heatmap",
           "layer_swap_bars", "memory_frames", "patching_grid", "pca_scatter", "phase_curves", "png_uri",
           "probe_curves", "probe_heatmap", "propagation_matrix", "scaling_curves", "sensitivity_curve",
           "sigma_schedule", "steps_animation", "steps_grid", "strength_sweep", "token_norm_mosaic"]
