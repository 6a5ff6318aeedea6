"""Ensemble (paper §6): accuracy vs merge steps K and seeds n, with intervals, against the noise-mean control
(derived/ensemble)."""

import streamlit as st

from cos_core import plots
from views import shared

archive, _ = shared.require_run()
st.title("Ensemble: merging seeds during the early steps")
table = shared.derived(archive, "ensemble",
                       "It will show accuracy when n seeds' latents are merged during the first K steps (mean of "
                       "x_t, of v̂, or of re-noised x̂0), with bootstrap intervals, beside the control the paper "
                       "lacks: one seed whose starting noise is the mean of n noises.")
if table is None:
    shared.stop()
with shared.guard():
    methods = sorted(table["method"].astype(str).unique())
    chosen = st.multiselect("merge operators", methods, default=methods, key="ensemble_methods")
    part = table[table["method"].astype(str).isin(chosen)]
    shared.show(plots.ensemble_curves, (part,), part, f"{archive.run_id}-ensemble")
    st.dataframe(part, hide_index=True, width="stretch")
