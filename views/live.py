"""Live: make a fresh task instance, run the shipped organism with capture on CPU (progress bar) into a temporary
runs directory, and watch its steps. Needs torch + diffusers and the organism weights; imports them only here,
only when they are present."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import streamlit as st

from cos_core import plots
from cos_core.frames import frames_table, grid_steps, n_video_frames, x0_frames
from views import shared

MODEL_ENV = "COS_ORGANISM_DIR"
LIVE_RUN = "live_run"

st.title("Live: run the organism and watch it think")
missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
if missing:
    st.info(f"This page needs {' and '.join(missing)}, which this installation does not have (the dashboard "
            "itself runs without them). To enable it, install the model extra on a machine with a few GB of "
            "memory:\n\n`pip install torch && pip install -e '.[model]'`\n\nthen restart `streamlit run app.py`.",
            icon=":material/power_off:")
    shared.stop()
model_dir = Path(os.environ.get(MODEL_ENV) or shared.APP_DIR / "models" / "organism")
if not (model_dir / "model_index.json").is_file():
    st.info(f"No organism weights at `{model_dir}`. Train them with `cos train` (or set `{MODEL_ENV}` to a saved "
            "organism folder), then reload this page.", icon=":material/power_off:")
    shared.stop()

from cos_core.tasks import TASKS  # noqa: E402  (numpy only)

with st.form("live"):
    c1, c2, c3, c4 = st.columns(4)
    task = c1.selectbox("task", list(TASKS), key="live_task")
    instance = c2.number_input("task instance", 0, 10_000, 0, key="live_instance")
    n_seeds = c3.number_input("seeds", 1, 4, 1, key="live_seeds")
    n_steps = c4.number_input("steps", 2, 50, 16, key="live_steps")
    go = st.form_submit_button("Run the organism", type="primary")

if go:
    import torch

    from cos_core.capture import CaptureSpec
    from cos_core.capture.run import capture_run
    from cos_core.capture.sources import SourceConfig, organism_source

    config = SourceConfig(task=task, instances=1, first_instance=int(instance), num_inference_steps=int(n_steps))
    bar = st.progress(0.0, text="loading the organism")
    try:
        source = organism_source(config, device="cpu", dtype=torch.float32, seeds=list(range(int(n_seeds))),
                                 model_dir=model_dir)
        runs_dir = Path(tempfile.mkdtemp(prefix="cos-live-"))
        total = len(source.items)

        def progress(items):
            for k in items:
                bar.progress(k / total, text=f"sample {k + 1} of {total} ({int(n_steps)} steps each)")
                yield k
            bar.progress(1.0, text="done")

        path = capture_run(source.pipe, source.items, CaptureSpec(reductions=("frame_mean", "token_norm")),
                           runs_dir=runs_dir, run_id=f"live-{task}-{int(instance)}", call_kwargs=source.call_kwargs,
                           source=source.label, score=source.score, command=["dashboard", "live"],
                           extra=source.extra, progress=progress)
    except ValueError as err:
        shared.fail(f"The organism could not run: {err}")
    old = Path(st.session_state.get(LIVE_RUN, "")).parent
    if old.name.startswith("cos-live-") and old.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(old, ignore_errors=True)  # the previous live run of this session
    st.session_state[LIVE_RUN] = str(path)

if LIVE_RUN in st.session_state:
    with shared.guard():
        archive = shared.open_live(Path(st.session_state[LIVE_RUN]))
        table = shared.samples(archive)
        labels = {int(r["sample"]): shared.sample_label(r) for _, r in table.iterrows()}
        sample = st.selectbox("sample", list(labels), format_func=labels.get, key="live_sample")
        steps = grid_steps(archive)
        frames = shared.cached(x0_frames, archive, sample, tuple(steps), tuple(range(n_video_frames(archive))))
        sigma = dict(zip(archive.steps["step"], archive.steps["sigma"]))
        row = table.set_index("sample").loc[sample]
        verdict = {1.0: "correct", 0.0: "wrong"}.get(row.get("score_correct"), "not scored")
        st.caption(f"{archive.run_id}: {row.get('sample_id', '')}, final answer {verdict}")
        shared.show(plots.steps_animation, (frames,), lambda: frames_table(frames, sigma), "live-play")
        shared.show(plots.steps_grid, (frames, sigma), lambda: frames_table(frames, sigma), "live-grid")
