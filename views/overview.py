"""Overview: what Chain-of-Steps is, the runs found (and the ones that cannot be read), and a path for a class."""

import streamlit as st

from cos_core.archive.labels import csv_text
from cos_core.archive.runs import RUNS_ENV, dir_size_of, runs_table, shard_problems
from views import shared

st.title("cos-lab: watching a video model reason along its denoising steps")
st.markdown(
    "A video diffusion model does not reason frame after frame. Wang et al., *Demystifying Video Reasoning* "
    "([arXiv 2603.16870](https://arxiv.org/abs/2603.16870)), show that it reasons along its **denoising steps**: "
    "the clean-video estimate x̂0 at an early, noisy step holds several candidate solutions at once, and later "
    "steps prune them to one — a *Chain-of-Steps*. Along the way they see working memory, self-correction and "
    "perception before action, and layers that specialise inside one step. This dashboard shows those things on "
    "captured runs: every step's x̂0, every block's activations, and the measurements `cos analyze` makes of them."
)

sel = shared.selection()
st.subheader("Runs")
st.caption(f"from `{sel.root}` (set `{RUNS_ENV}` to read another folder)")
archives = []
for name in sel.runs:
    try:
        archives.append(shared.open_run(sel.root, name))
    except Exception as err:  # a run that changed since the scan: show it with the broken ones
        sel.bad[name] = str(err)
if archives:
    sizes = {a.run_id: shared.cached(dir_size_of, a) for a in archives}
    table = runs_table(archives, sizes)
    st.dataframe(table.drop(columns=["bytes"]), hide_index=True, width="stretch",
                 column_config={"command": st.column_config.TextColumn("command", width="large")})
    st.download_button("⬇ runs (CSV)", data=csv_text(table), file_name="runs.csv", mime="text/csv",
                       on_click="ignore")
    for archive in archives:
        problems = shared.cached(shard_problems, archive)
        if problems:
            first = next(iter(problems.values()))
            st.error(f"**{archive.path.name}**: {len(problems)} of {archive.n_samples} sample shards cannot be "
                     f"read (e.g. {shared.literal(first)}); the other samples still show.", icon=":material/error:")
else:
    st.info(f"No readable runs in `{sel.root}` yet. Make one with\n\n"
            f"`cos capture --task maze --seeds 0,1 --runs-dir {sel.root}`  (the shipped organism), or\n\n"
            f"`cos capture --model tiny:wan22 --decode --runs-dir {sel.root}`  (a tiny random Wan 2.2, no weights).",
            icon=":material/folder_open:")
shared.run_cards(sel)

st.subheader("Start here (a 20-minute path for a class)")
st.markdown("Pick a run and a sample in the sidebar, then:")
for page, text in [
    ("views/steps.py", "**Steps** — watch x̂0 sharpen from noise. Press play, then drag the step slider: at which "
                       "step can you already read the answer? Does it change its mind?"),
    ("views/layers.py", "**Layers** — inside one step, which blocks light up? Early blocks draw structure, middle "
                        "blocks carry the decision (the paper's Fig. 6)."),
    ("views/probes.py", "**Probes** — where in layers × steps can a linear read-out already predict the answer?"),
    ("views/self_correction.py", "**Self-correction** — find samples that were wrong early and right at the end; "
                                 "label them with the paper's six categories."),
    ("views/interventions.py", "**Interventions** — noise at one step hurts; noise at one frame barely does. Why?"),
    ("views/compare.py", "**Compare** — put two runs side by side (two models, or a seed ensemble vs one seed)."),
]:
    st.page_link(page, label=text)
