"""Interventions (paper Fig. 3): re-score after replacing the latent with noise at one step (all frames) vs at one
frame (all steps), the layer-swap flip rate, and the CKA propagation matrix (derived/interventions, propagation)."""

import streamlit as st

from cos_core import plots
from views import shared

archive, _ = shared.require_run()
st.title("Interventions: which steps and frames matter")
table = shared.derived(archive, "interventions",
                       "It will show the score after noise replaces the latent at one step (all frames) versus at "
                       "one frame (all steps) — the paper sees the first collapse and the second barely move — "
                       "and how often swapping one block's output between scenes flips the answer.")
if table is not None:
    with shared.guard():
        noise = table[table["kind"].isin(["noise_step", "noise_frame"])]
        if noise.empty:
            st.info("derived/interventions has no noise_step / noise_frame rows.")
        else:
            shared.show(plots.intervention_curves, (noise,), noise, f"{archive.run_id}-noise-probes")
        swap = table[table["kind"] == "layer_swap"]
        if not swap.empty:
            shared.show(plots.layer_swap_bars, (swap,), swap, f"{archive.run_id}-layer-swap")

st.subheader("Propagation of a perturbation")
matrix = shared.derived(archive, "propagation",
                        "It will show 1 − linear CKA between clean and perturbed activations, for a perturbation "
                        "injected at one step and measured at every later step (the paper's sensitivity map, "
                        "peaking at steps 20-30 of 50).")
if matrix is not None:
    with shared.guard():
        shared.show(plots.propagation_matrix, (matrix,), matrix, f"{archive.run_id}-propagation")
