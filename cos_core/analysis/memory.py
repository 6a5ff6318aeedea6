"""Working memory: how well a hidden object's identity and position survive across denoising steps and frames.

Owns two readings for hidden-object (memory task) runs: from x0_hat (the extractor per step and frame: is the
object read back with the right identity and place where it is visible, and kept out of view where it is hidden)
and from probes on the activations of the frames where the object is hidden (vs before / after). Both aggregate
to one long table with n, instances and bootstrap intervals. Numpy/pandas; probes may use torch via `probes`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from ..archive import Archive
from .features import FeatureSpec, check_spec, instance_groups, load_cells, load_labels
from .probes import ProbeGrid
from .stats import bootstrap_weights, encode_groups, group_mean_ci
from .step_frames import frame_source, instance_of, run_tasks, step_frames, task_for

PHASES = ("before", "hidden", "after")
MEMORY_TASK = "memory"
POSITION_TOLERANCE = 1.0  # pixels (L-inf), as the memory task grades reappearance
PROBE_LABELS = ("identity", "hidden_position")


def frame_phases(meta: dict[str, Any], n_frames: int) -> np.ndarray:
    """Phase of each frame of one instance: 'before' / 'hidden' / 'after' the frames where it is fully hidden."""
    hidden = meta["hidden_frames"]
    return np.array(["before" if f < min(hidden) else "hidden" if f <= max(hidden) else "after"
                     for f in range(n_frames)])


def read_frames(answer: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per frame: what the extractor read against the truth (identity_ok / position_ok where fully visible,
    hidden_ok where fully hidden, NaN otherwise)."""
    phases = frame_phases(meta, len(meta["visible"]))
    rows = []
    for f, seen in enumerate(answer["frames"]):
        visible = meta["visible"][f]
        row = {"frame": f, "phase": phases[f], "identity_ok": np.nan, "position_ok": np.nan, "hidden_ok": np.nan}
        if visible == 1:
            same = seen["identity"] == meta["identity"]
            row["identity_ok"] = float(same)
            err = np.abs(np.subtract(seen["centre"], meta["centres"][f])).max() if seen["centre"] else np.inf
            row["position_ok"] = float(same and err <= POSITION_TOLERANCE)
        elif visible == 0:
            row["hidden_ok"] = float(seen["identity"] is None)
        rows.append(row)
    return rows


def memory_from_x0(archive: Archive, progress: Callable[[Iterable], Iterable] = lambda it: it) -> pd.DataFrame:
    """One row per (sample, step, frame) of the run's memory-task samples."""
    samples = run_tasks(archive).get(MEMORY_TASK)
    if not samples:
        raise ValueError(f"{archive.run_id} has no '{MEMORY_TASK}' task samples: working memory needs a run of the "
                         "hidden-object task (`cos capture --task memory`)")
    task = task_for(archive, MEMORY_TASK)
    source = frame_source(archive, task)
    rows = []
    for sample in progress(samples):
        inst = instance_of(archive, task, sample)
        sf = step_frames(archive, sample, source)
        for i, step in enumerate(sf.steps):
            rows += [{"sample": sample, "step": step, **r} for r in read_frames(task.extract(sf.frames[i]), inst.meta)]
    return pd.DataFrame(rows)


def aggregate_x0(archive: Archive, per_frame: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure per (step, frame, phase) and per (step, phase), bootstrap CI over instances."""
    groups_of = dict(zip(archive.samples["sample"], instance_groups(archive)))
    chance = {"identity_ok": 1.0 / 4, "position_ok": np.nan, "hidden_ok": np.nan}
    rows = []
    for by in (["step", "frame", "phase"], ["step", "phase"]):
        for key, part in per_frame.groupby(by):
            key = dict(zip(by, key))
            # a sample may contribute several frames to a phase row: average them first (one value per sample)
            per_sample = part.groupby("sample")[list(chance)].mean()
            group, n_groups = encode_groups(np.array([groups_of[s] for s in per_sample.index]))
            weights = bootstrap_weights(n_groups, seed=0)
            for measure in chance:
                values = per_sample[measure].to_numpy()
                n = int(np.isfinite(values).sum())
                if n == 0:
                    continue
                mean, lo, hi = group_mean_ci(values, group, n_groups, weights)
                rows.append({"source": "x0_hat", "layer": -1, "step": key["step"],
                             "frame": key.get("frame", -1), "phase": key["phase"], "measure": measure,
                             "value": float(mean), "n": n, "n_instances": n_groups, "ci_low": float(lo),
                             "ci_high": float(hi), "chance": chance[measure]})
    return pd.DataFrame(rows)


def memory_probes(archive: Archive, spec: FeatureSpec, probe: dict[str, Any] | None = None) -> pd.DataFrame:
    """Probes for the hidden object's identity / position on activations averaged over each sample's frames of
    one phase (hidden vs before vs after), for every (layer, step)."""
    samples = np.array(run_tasks(archive).get(MEMORY_TASK, []))
    if len(samples) == 0:
        raise ValueError(f"{archive.run_id} has no '{MEMORY_TASK}' task samples to probe")
    task = task_for(archive, MEMORY_TASK)
    n_frames = check_spec(archive, spec)["reductions"][spec.reduction]["shape"][0]
    if n_frames != task.config.n_frames:
        raise ValueError(f"reduction {spec.reduction!r} has {n_frames} latent frames but the task has "
                         f"{task.config.n_frames} video frames; hidden frames cannot be mapped to activations")
    phases = np.stack([frame_phases(instance_of(archive, task, int(s)).meta, n_frames) for s in samples])
    labels = load_labels(archive, [n for n in PROBE_LABELS if f"label_{n}" in archive.samples], samples)
    groups = instance_groups(archive, samples)
    tables = []
    for phase in PHASES:
        x, cells = load_cells(archive, spec, samples, frame_masks=phases == phase)
        grid = ProbeGrid(**(probe or {})).fit(x, labels, groups)
        table = grid.table(cells)
        table = table.assign(source="probe", frame=-1, phase=phase, measure="probe_" + table["label"],
                             value=table["accuracy"])
        tables.append(table.drop(columns=["label", "accuracy"]))
    return pd.concat(tables, ignore_index=True)


def run_memory(archive: Archive, spec: FeatureSpec | None = None, probe: dict[str, Any] | None = None,
               progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict[str, pd.DataFrame]:
    """`memory` (x0_hat readings and, when activations were captured, probes) and `memory_frames` (per sample)."""
    per_frame = memory_from_x0(archive, progress)
    parts = [aggregate_x0(archive, per_frame)]
    if spec is not None:
        parts.append(memory_probes(archive, spec, probe))
    table = pd.concat(parts, ignore_index=True).merge(archive.steps, on="step", how="left")
    return {"memory": table, "memory_frames": per_frame.merge(archive.steps, on="step", how="left")}
