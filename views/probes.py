"""Probes: linear-probe accuracy (or selectivity) over layer x step per label, with chance marked; clicking a cell
shows its curves over steps and layers (derived/probe_grid, our extension of the paper)."""

import streamlit as st

from cos_core import plots
from views import shared

archive, _ = shared.require_run()
st.title("Probes: where the answer becomes linearly readable")
table = shared.derived(archive, "probe_grid",
                       "It will show, for each task label (e.g. the maze's first move), how well a linear probe "
                       "on one block's activations at one step predicts it — a layer x step map of where and "
                       "when the answer is decided, with chance level and control-task selectivity.")
if table is None:
    shared.stop()
with shared.guard():
    for column in ("task", "site", "reduction", "branch", "pool", "frames", "kind", "engine"):  # one value each
        if column in table and table[column].nunique() > 1:
            value = shared.select(column, sorted(table[column].astype(str).unique()), f"probe_{column}")
            table = table[table[column].astype(str) == value]
    gain = (table["accuracy"] - table["chance"]).groupby(table["label"].astype(str)).max()
    label = shared.select("label", sorted(gain.index), "label", default=gain.idxmax(),  # most decodable first
                          format_func=lambda name: f"{name} (best: {gain[name]:+.2f} over chance)")
    metrics = [m for m in ("accuracy", "selectivity", "control_accuracy") if m in table]
    metric = shared.select("metric", metrics, "metric")
    part = table[table["label"].astype(str) == label]
    st.caption(f"chance for {shared.literal(label)} (majority class): {part['chance'].mean():.3f}"
               + (f" · n = {int(part['n'].max())} samples" if "n" in part else "")
               + (f" from {int(part['n_instances'].max())} instances" if "n_instances" in part else ""))
    event = shared.show(plots.probe_heatmap, (part, metric), part, f"{archive.run_id}-probe-{label}-{metric}",
                        on_select="rerun", selection_mode="points")
    points = (event.selection.points if event is not None and hasattr(event, "selection") else []) or []
    layers, steps = sorted(part["layer"].unique()), sorted(part["step"].unique())
    click = (int(points[0]["y"]), int(points[0]["x"])) if points else None
    if click is not None and click != st.session_state.get("probe_click"):  # a new click sets the cell below
        st.session_state["probe_layer"], st.session_state["probe_step"] = click
    st.session_state["probe_click"] = click
    c1, c2 = st.columns(2)
    layer = shared.select("layer", layers, "probe_layer", default=layers[len(layers) // 2], where=c1)
    step = shared.select("step", steps, "probe_step", default=steps[len(steps) // 2], where=c2)
    cell = part[(part["layer"] == layer) & (part["step"] == step)]
    if not cell.empty:
        st.metric(f"{metric} at layer {layer}, step {step}", f"{cell[metric].mean():.3f}")
    curves = part[(part["layer"] == layer) | (part["step"] == step)]
    shared.show(plots.probe_curves, (part, metric, layer, step), curves,
                f"{archive.run_id}-probe-{label}-L{layer}-S{step}")
