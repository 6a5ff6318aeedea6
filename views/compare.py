"""Compare: two runs side by side (two models, two tasks, or base vs ensemble) on the x̂0 steps grid, the σ
schedule and the run facts. Run A is the sidebar's run; run B is picked here."""

import pandas as pd
import streamlit as st

from cos_core import dashboard_data as dd
from cos_core import plots
from views import shared

archive_a, sample_a = shared.require_run()
sel = shared.selection()
st.title("Compare two runs")
others = [r for r in sel.runs if r != archive_a.path.name] or sel.runs
c1, c2 = st.columns(2)
c1.markdown(f"**A:** `{archive_a.path.name}`, sample {sample_a} (change in the sidebar)")
name_b = shared.select("run B", others, "run_b", where=c2)
with shared.guard():
    archive_b = shared.open_run(sel.root, name_b)
    labels_b = {int(r["sample"]): dd.sample_label(r) for _, r in shared.samples(archive_b).iterrows()}
    sample_b = shared.select("sample B", list(labels_b), "sample_b", where=c2, format_func=labels_b.get)
    n_rows = shared.slider("steps in each grid", list(range(1, 17)), "rows", default=8)
    n_cols = shared.slider("frames in each grid", list(range(1, 13)), "cols", default=6)

    facts = pd.DataFrame([dd.run_facts(archive_a), dd.run_facts(archive_b)], index=["A", "B"]).T.astype(str)
    st.dataframe(facts, width="stretch")

    left, right = st.columns(2)
    for col, tag, archive, sample in ((left, "A", archive_a, sample_a), (right, "B", archive_b, sample_b)):
        with col:
            steps = dd.spread(dd.grid_steps(archive), n_rows)
            frame_ids = dd.spread(list(range(dd.n_video_frames(archive))), n_cols)
            frames = shared.cached(dd.x0_frames, archive, sample, tuple(steps), tuple(frame_ids))
            sigma = dict(zip(archive.steps["step"], archive.steps["sigma"]))
            shared.show(plots.steps_grid, (frames, sigma, f"{tag}: {archive.run_id}, sample {sample}"),
                        lambda f=frames, s=sigma: dd.frames_table(f, s), f"compare-{tag}-grid")

    schedules = {f"A: {archive_a.run_id}": archive_a.steps, f"B: {archive_b.run_id}": archive_b.steps}
    both = pd.concat([df.assign(run=name) for name, df in schedules.items()], ignore_index=True)
    shared.show(plots.sigma_schedule, (schedules,), both, "compare-sigma")
