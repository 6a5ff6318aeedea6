"""Layers: inside one step, the per-token norm of every block as a layer x frame grid (paper Fig. 6), a PCA of
frame-mean activations over layers and steps, and the layer-swap flip rate (derived/interventions)."""

import pandas as pd
import streamlit as st

from cos_core import plots
from cos_core.analysis.layers import frame_mean_pca, token_norm_grid, token_norm_table
from cos_core.frames import spread
from views import shared

archive, sample = shared.require_run()
st.title("Layers: who does what inside one step")
with shared.guard():
    if not archive.sites:
        shared.fail(f"{archive.run_id} captured no block activations (capture with --layers and --reductions).")
    c1, c2 = st.columns(2)
    site = shared.select("site", archive.sites, "site", where=c1)
    info = archive.site(site)
    branch = shared.select("CFG branch", info["branches"], "branch", where=c2)
    step = shared.slider("step", info["steps"], "step", default=info["steps"][0])

    st.subheader("Token norm, layer x frame")
    if "token_norm" not in info["reductions"]:
        st.warning(f"`token_norm` was not captured for {site} (captured: {list(info['reductions'])}); capture "
                   "with --reductions frame_mean,token_norm to see this view.", icon=":material/warning:")
    else:
        grid = shared.cached(token_norm_grid, archive, site, sample, step, branch)  # (layer, frame, row, col)
        n_frames = grid.shape[1]
        shown = spread(list(range(n_frames)), shared.slider("frames in the grid", list(range(1, n_frames + 1)),
                                                            "cols", default=min(n_frames, 8)))
        shared.show(plots.token_norm_mosaic, (grid[:, shown], info["layers"], shown, step),
                    lambda: token_norm_table(grid, info["layers"]), f"{archive.run_id}-token-norm-s{step}")
        frames = list(range(n_frames))
        mean = grid.mean(axis=(2, 3))  # (layer, frame)
        table = pd.DataFrame(mean, index=pd.Index(info["layers"], name="layer"),
                             columns=[f"frame_{f}" for f in frames]).reset_index()
        shared.show(plots.layer_frame_heatmap, (mean, info["layers"], frames, step), table,
                    f"{archive.run_id}-layer-frame-s{step}")

    st.subheader("PCA of frame-mean activations")
    if "frame_mean" not in info["reductions"]:
        st.warning(f"`frame_mean` was not captured for {site}; capture with --reductions frame_mean.",
                   icon=":material/warning:")
    else:
        pca, ratio = shared.cached(frame_mean_pca, archive, site, sample, branch)
        color = st.radio("colour by", ["layer", "step"], horizontal=True, key="pca_color")
        shared.show(plots.pca_scatter, (pca, ratio, color), pca, f"{archive.run_id}-pca")

    st.subheader("Layer swap")
    table = shared.derived(archive, "interventions",
                           "It will show how often the answer flips when one block's output at the first step is "
                           "carried over from a run on another scene (paper §5: layer 20 of 40 flips it).")
    if table is not None:
        swap = table[table["kind"] == "layer_swap"]
        if swap.empty:
            st.info("derived/interventions has no `layer_swap` rows for this run.")
        else:
            shared.show(plots.layer_swap_bars, (swap,), swap, f"{archive.run_id}-layer-swap")
