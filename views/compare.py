"""Compare: two runs side by side (two models, two tasks, or base vs ensemble) on the x̂0 steps grid, the σ
schedule and the run facts, plus the answers of the samples both runs hold. Run A is the sidebar's run; run B is
picked here, and sample B follows sample A when run B has the same instance and seed."""

import pandas as pd
import streamlit as st

from cos_core import plots
from cos_core.analysis.compare import outcome_counts, paired_outcomes
from cos_core.archive.runs import run_facts
from cos_core.frames import frames_table, grid_steps, n_video_frames, spread, x0_frames
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
    samples_a, samples_b = shared.samples(archive_a), shared.samples(archive_b)
    labels_b = {int(r["sample"]): shared.sample_label(r) for _, r in samples_b.iterrows()}
    id_a = samples_a.loc[samples_a["sample"] == sample_a, "sample_id"]
    same = samples_b.loc[samples_b["sample_id"].isin(id_a), "sample"] if "sample_id" in samples_b else []
    follow = int(same.iloc[0]) if len(same) else None
    moved = st.session_state.get("compare_a", (archive_a.run_id, sample_a)) != (archive_a.run_id, sample_a)
    if moved and follow is not None:  # sample A changed: B follows to the same instance and seed
        st.session_state["sample_b"] = follow
    st.session_state["compare_a"] = (archive_a.run_id, sample_a)
    sample_b = shared.select("sample B", list(labels_b), "sample_b", where=c2, format_func=labels_b.get,
                             default=follow)
    n_rows = shared.slider("steps in each grid", list(range(1, 17)), "rows", default=8)
    n_cols = shared.slider("frames in each grid", list(range(1, 13)), "cols", default=6)

    facts = pd.DataFrame([run_facts(archive_a), run_facts(archive_b)], index=["A", "B"]).T.astype(str)
    st.dataframe(facts, width="stretch")

    left, right = st.columns(2)
    for col, tag, archive, sample in ((left, "A", archive_a, sample_a), (right, "B", archive_b, sample_b)):
        with col:
            steps = spread(grid_steps(archive), n_rows)
            frame_ids = spread(list(range(n_video_frames(archive))), n_cols)
            frames = shared.cached(x0_frames, archive, sample, tuple(steps), tuple(frame_ids))
            sigma = dict(zip(archive.steps["step"], archive.steps["sigma"]))
            shared.show(plots.steps_grid, (frames, sigma, f"{tag}: {archive.run_id}, sample {sample}"),
                        lambda f=frames, s=sigma: frames_table(f, s), f"compare-{tag}-grid")

    schedules = {f"A: {archive_a.run_id}": archive_a.steps, f"B: {archive_b.run_id}": archive_b.steps}
    both = pd.concat([df.assign(run=name) for name, df in schedules.items()], ignore_index=True)
    shared.show(plots.sigma_schedule, (schedules,), both, "compare-sigma")

    paired = paired_outcomes(samples_a, samples_b)
    st.subheader("Same instance and seed in both runs")
    if paired.empty:
        st.info("These runs share no scored sample (same task instance and noise seed): nothing to pair. Compare a "
                "run with one made from the same instances and seeds, e.g. `organism-fork` with "
                "`organism-fork-ensemble` (`cos capture --ensemble`).")
    else:
        counts = outcome_counts(paired)
        cols = st.columns(len(counts))
        for col, (name, value) in zip(cols, counts.items()):
            col.metric(name, f"{value:.0%}" if name.startswith("accuracy") else value)
        dev_a, dev_b = archive_a.noise_device, archive_b.noise_device
        if dev_a == dev_b:
            st.caption(f"Both runs drew their noise on {dev_a}: a pair starts from the same noise (for an ensemble "
                       "run, its member 0), so a changed answer is the effect of what differs between the runs.")
        else:
            st.warning(f"Run A drew its noise on {dev_a}, run B on {dev_b}: the same seed is a different draw on "
                       "each, so these pairs share instance and seed number but not their starting noise.")
        st.dataframe(paired, width="stretch", hide_index=True)
