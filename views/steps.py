"""Steps: x̂0 of one sample as a steps x frames grid (paper Fig. 1), a step slider, playback, the final video,
σ/t/expert per step and the answer read at each step (derived/step_answers)."""

import pandas as pd
import streamlit as st

from cos_core import plots
from cos_core.frames import (final_frames, final_gif, frame_source, frames_table, grid_steps, n_video_frames, spread,
                             video_table, x0_frames)
from views import shared

archive, sample = shared.require_run()
st.title("Steps: the answer forming along denoising")
with shared.guard():
    row = shared.samples(archive).set_index("sample").loc[sample]
    all_steps = grid_steps(archive)
    n_frames = n_video_frames(archive)
    source = frame_source(archive)
    steps_df = archive.steps
    sigma = dict(zip(steps_df["step"], steps_df["sigma"]))

    cols = st.columns(4)
    cols[0].metric("sample", sample, help=shared.literal(row.get("sample_id", "")))
    cols[1].metric("task", str(row.get("task") or "-"))
    cols[2].metric("steps", archive.n_steps)
    if "score_correct" in row and pd.notna(row["score_correct"]):
        cols[3].metric("final answer", "correct" if row["score_correct"] >= 0.5 else "wrong")
    st.caption({"decoded": "x̂0 decoded through the VAE.",
                "pixel": "x̂0 of a pixel-space model, shown directly (values in [-1, 1]).",
                "latent": "No decoded frames in this run: showing latent channels 0-2 as RGB (capture with "
                          "--decode for pixels)."}[source])

    c1, c2 = st.columns(2)
    n_rows = shared.slider("steps in the grid", list(range(1, len(all_steps) + 1)), "rows",
                           default=min(len(all_steps), 12), where=c1)
    n_cols = shared.slider("frames in the grid", list(range(1, n_frames + 1)), "cols",
                           default=min(n_frames, 9), where=c2)
    shown_steps = spread(all_steps, n_rows)
    frame_ids = spread(list(range(n_frames)), n_cols)
    frames = shared.cached(x0_frames, archive, sample, tuple(shown_steps), tuple(frame_ids))
    shared.show(plots.steps_grid, (frames, sigma), lambda: frames_table(frames, sigma), f"{archive.run_id}-x0-grid")

    st.subheader("One step")
    step = shared.slider("step", all_steps, "step", default=all_steps[-1])
    one = shared.cached(x0_frames, archive, sample, (step,), tuple(spread(list(range(n_frames)), 16)))
    info = steps_df.set_index("step").loc[step]
    m = st.columns(3)
    m[0].metric("sigma", f"{info['sigma']:.4f}")
    m[1].metric("t", f"{info['t']:.1f}")
    m[2].metric("expert", str(info["expert"]))
    shared.show(plots.filmstrip, (one.pixels[0], one.frames, f"x̂0 at step {step}"),
                lambda: frames_table(one, sigma), f"{archive.run_id}-x0-step{step}")

    st.subheader("Play over steps")
    shared.show(plots.steps_animation, (frames,), lambda: frames_table(frames, sigma), f"{archive.run_id}-x0-play")

    st.subheader("Final video")
    final = shared.cached(final_frames, archive, sample)
    left, right = st.columns([1, 3])
    left.image(shared.cached(final_gif, archive, sample), caption="final video (loops)")
    with right:
        shared.show(plots.filmstrip, (final, list(range(len(final))), "final video"),
                    lambda: video_table(final), f"{archive.run_id}-final")

    st.subheader("Noise schedule")
    shared.show(plots.sigma_schedule, ({archive.run_id: steps_df},), steps_df, f"{archive.run_id}-sigma")

    st.subheader("Answer at each step")
    answers = shared.derived(archive, "step_answers",
                             "It will show, for every sample, whether the answer read from x̂0 at each step is "
                             "right — where the model commits, and where it changes its mind.")
    if answers is not None:
        shared.show(plots.answers_over_steps, (answers,), answers, f"{archive.run_id}-step-answers")
        mine = answers[answers["sample"] == sample].sort_values("step")
        cols = [c for c in ("step", "sigma", "answer_key", "correct", "score", "matches_final", "answer") if c in mine]
        st.dataframe(mine[cols], hide_index=True, width="stretch")
    if "convergence" in archive.derived_names():
        conv = shared.derived(archive, "convergence", "")
        mine = conv[conv["sample"] == sample].sort_values("step")
        if not mine.empty:
            shared.show(plots.convergence, (mine,), mine, f"{archive.run_id}-convergence-{sample}")
