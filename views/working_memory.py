"""Working memory: how well the hidden object's identity/position is kept, per step x frame (derived/memory)."""

import streamlit as st

from cos_core import plots
from views import shared

archive, _ = shared.require_run()
st.title("Working memory: keeping what cannot be seen")
table = shared.derived(archive, "memory",
                       "For hidden-object tasks (the organism's `memory` task), it will show how well the hidden "
                       "object's identity and position survive, step by step, before, while and after it is out of "
                       "sight — read from x̂0, and by linear probes on the activations of those frames.")
if table is None:
    shared.stop()
with shared.guard():
    x0 = table[table["source"] == "x0_hat"] if "source" in table else table
    if not x0.empty:
        st.subheader("Read from x̂0")
        measure = shared.select("measure", sorted(x0["measure"].astype(str).unique()), "memory_measure")
        part = x0[x0["measure"] == measure]
        frames = part[part["frame"] >= 0]
        if not frames.empty:
            shared.show(plots.memory_frames, (frames, measure), frames, f"{archive.run_id}-memory-{measure}")
        phases = part[part["frame"] < 0]
        if not phases.empty and "phase" in phases:
            shared.show(plots.phase_curves, (phases, measure), phases, f"{archive.run_id}-memory-phases-{measure}")
    probes = table[table["source"] == "probe"] if "source" in table else table.iloc[:0]
    st.subheader("Read by linear probes")
    if probes.empty:
        st.info("No probe rows in derived/memory: `cos analyze` adds them when the run captured activations "
                "(frame_mean) of the memory task.", icon=":material/info:")
    else:
        c1, c2 = st.columns(2)
        pmeasure = shared.select("probe target", sorted(probes["measure"].astype(str).unique()), "memory_probe",
                                 where=c1)
        phase = shared.select("phase", sorted(probes["phase"].astype(str).unique()), "memory_phase",
                              default="hidden", where=c2)
        part = probes[(probes["measure"] == pmeasure) & (probes["phase"].astype(str) == phase)]
        grid = part.rename(columns={"value": "accuracy"})
        shared.show(plots.probe_heatmap, (grid, "accuracy"), part, f"{archive.run_id}-memory-{pmeasure}-{phase}")
