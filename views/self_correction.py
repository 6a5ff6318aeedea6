"""Self-correction: step-dynamics events per sample (derived/events) — timeline, counts by type and step, the
samples where they happen — and manual labelling with the paper's six Chain-of-Steps categories, saved into the
archive's annotations.json and exportable as CSV."""

import datetime as dt

import streamlit as st

from cos_core import plots
from cos_core.archive import ArchiveError
from cos_core.archive.labels import csv_text, labels_table
from views import shared

CATEGORIES = ("Unknown", "Multi-Path", "Superposition", "Memory", "Self-correction", "Perception Before Action")

archive, sample = shared.require_run()
st.title("Self-correction: answers revised along the steps")
events = shared.derived(archive, "events",
                        "It will show every sample's answer trajectory turned into events — wrong → right "
                        "(self-correction), right → wrong (regression), the same answer made more complete "
                        "(enhancement), an answer appearing (emergence) or changing (switch) — with the step, σ "
                        "and expert where each happens.")
if events is not None:
    with shared.guard():
        rates = shared.derived(archive, "event_rates", "") if "event_rates" in archive.derived_names() else None
        if rates is not None and not rates.empty:
            if "task" in rates and rates["task"].nunique() > 1:
                task = shared.select("task", sorted(rates["task"].astype(str).unique()), "event_task")
                rates = rates[rates["task"].astype(str) == task]
            shared.show(plots.event_rates, (rates,), rates, f"{archive.run_id}-event-rates")
        if events.empty:
            st.info(f"No events were detected in the {archive.n_samples} samples of this run: every answer "
                    "trajectory stayed constant (or never became readable).", icon=":material/info:")
        else:
            kinds = sorted(events["kind"].astype(str).unique())
            chosen = st.multiselect("event kinds", kinds, default=kinds, key="event_kinds")
            part = events[events["kind"].astype(str).isin(chosen)]
            shared.show(plots.event_counts, (part,), part, f"{archive.run_id}-event-counts")
            shared.show(plots.event_timeline, (part,), part, f"{archive.run_id}-event-timeline")
            per = part.groupby(["sample", "kind"]).size().unstack(fill_value=0).reset_index()
            st.markdown("**Samples with events** (pick one in the sidebar to watch its steps)")
            st.dataframe(per, hide_index=True, width="stretch")

st.subheader("Label this sample")
st.caption("The paper's six Chain-of-Steps categories. Labels are saved into the run (annotations.json).")
try:
    labels = archive.annotations()
except ArchiveError as err:
    shared.fail(shared.literal(err))
steps = archive.steps["step"].tolist()
with st.form("label"):
    c1, c2 = st.columns(2)
    category = c1.selectbox("category", CATEGORIES, key="label_category")
    step = c2.selectbox("step where it shows (optional)", ["-"] + steps, key="label_step")
    note = st.text_input("note", key="label_note")
    if st.form_submit_button("Save label"):
        row = shared.samples(archive).set_index("sample").loc[sample]
        label = {"sample": int(sample), "sample_id": str(row.get("sample_id", sample)), "category": category,
                 "step": None if step == "-" else int(step), "note": note,
                 "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            labels = archive.add_annotation(label)  # under the run's lock: a concurrent save is never lost
            st.success(f"saved: sample {sample} → {category}")
        except (OSError, ArchiveError) as err:
            labels = labels + [label]
            st.error(f"Could not save into {shared.literal(archive.path)} ({shared.literal(err)}); the runs folder "
                     "may be read-only here. Download the labels below instead.", icon=":material/error:")
table = labels_table(labels)
st.dataframe(table, hide_index=True, width="stretch")
st.download_button("⬇ labels (CSV)", data=csv_text(table), file_name=f"{archive.run_id}-labels.csv",
                   mime="text/csv", on_click="ignore")
