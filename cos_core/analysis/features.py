"""From an archive to probe inputs: activation features per (layer, step) cell, labels and instance groups.

Owns the choice of features (site, reduction, branch, which frames, flatten or mean over frames), the cell table
(layer, step, t, sigma, expert) and every check on the way in: a site/reduction/branch that was not captured,
labels that are missing or absent, NaN/inf in activations (named by layer and step). Numpy/pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..archive import Archive

POOLS = ("flatten", "mean")


@dataclass(frozen=True)
class FeatureSpec:
    """Which activations a probe reads. `frames` indexes the reduction's frame axis (latent frames)."""

    site: str = "block_out"
    reduction: str = "frame_mean"
    branch: str = "cond"
    frames: tuple[int, ...] | None = None
    pool: str = "flatten"  # "flatten": concatenate the selected frames; "mean": average them

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not allowed; use one of {POOLS}")
        if self.frames is not None and (not isinstance(self.frames, tuple) or not self.frames
                                        or any(not isinstance(f, int) or f < 0 for f in self.frames)):
            raise ValueError(f"frames={self.frames!r} must be None or a non-empty tuple of frame indices >= 0")


def check_spec(archive: Archive, spec: FeatureSpec) -> dict:
    """The manifest entry of the spec's site, after checking that reduction, branch and frames were captured."""
    info = archive.site(spec.site)  # names the captured sites when this one is not
    if spec.reduction not in info["reductions"]:
        raise ValueError(f"reduction {spec.reduction!r} of site {spec.site!r} was not captured in "
                         f"{archive.run_id}; captured: {list(info['reductions'])}")
    if spec.branch not in info["branches"]:
        raise ValueError(f"branch {spec.branch!r} was not captured in {archive.run_id}; captured: "
                         f"{info['branches']}")
    n_frames = info["reductions"][spec.reduction]["shape"][0]
    if spec.frames is not None and max(spec.frames) >= n_frames:
        raise ValueError(f"frames {spec.frames} out of range: reduction {spec.reduction!r} has {n_frames} frames")
    return info


def reduce_frames(act: np.ndarray, spec: FeatureSpec, frame_mask: np.ndarray | None = None) -> np.ndarray:
    """(step, layer, frame, ...) -> (step, layer, feature): select frames (or a per-sample mask), then pool."""
    if frame_mask is not None:
        if not frame_mask.any():
            raise ValueError("a sample's frame mask selects no frame")
        return act[:, :, frame_mask].mean(2).reshape(act.shape[0], act.shape[1], -1)
    if spec.frames is not None:
        act = act[:, :, list(spec.frames)]
    if spec.pool == "mean":
        act = act.mean(2)
    return act.reshape(act.shape[0], act.shape[1], -1)


def load_cells(archive: Archive, spec: FeatureSpec, samples: np.ndarray | None = None,
               frame_masks: np.ndarray | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Features (cell, sample, feature) float32 with cells ordered layer-major, and the cell table.

    frame_masks: optional (sample, frame) bool, a per-sample choice of frames that are averaged (overrides
    spec.frames/pool), e.g. the frames where a sample's object is hidden.
    """
    info = check_spec(archive, spec)
    ids = np.arange(archive.n_samples) if samples is None else np.asarray(samples)
    if len(ids) == 0:
        raise ValueError("no samples selected")
    parts = []
    for k, sample in enumerate(ids):
        act = archive.act(spec.site, spec.reduction, sample=int(sample), branch=spec.branch)  # (step, layer, ...)
        mask = None if frame_masks is None else np.asarray(frame_masks[k], dtype=bool)
        parts.append(reduce_frames(act.astype(np.float32, copy=False), spec, mask))
    x = np.stack(parts, axis=2)  # (step, layer, sample, feature)
    steps, layers = list(info["steps"]), list(info["layers"])
    x = x.transpose(1, 0, 2, 3).reshape(len(layers) * len(steps), len(ids), -1)  # (cell, sample, feature)
    cells = cell_table(archive, layers, steps)
    check_finite(x, cells, ids)
    return np.ascontiguousarray(x), cells


def cell_table(archive: Archive, layers: list[int], steps: list[int]) -> pd.DataFrame:
    cells = pd.DataFrame({"layer": np.repeat(layers, len(steps)), "step": np.tile(steps, len(layers))})
    return cells.merge(archive.steps, on="step", how="left")


def check_finite(x: np.ndarray, cells: pd.DataFrame, samples: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    per_cell = bad.any(-1)  # (cell, sample)
    where = np.flatnonzero(per_cell.any(-1))
    listed = ", ".join(f"(layer {cells.layer[c]}, step {cells.step[c]}: samples "
                       f"{samples[per_cell[c]][:5].tolist()})" for c in where[:8])
    raise ValueError(f"activations hold NaN/inf in {len(where)} of {len(cells)} (layer, step) cells: {listed}"
                     f"{' ...' if len(where) > 8 else ''}; the capture diverged there, probes need finite values")


def label_names(archive: Archive) -> list[str]:
    return [c[len("label_"):] for c in archive.samples.columns if c.startswith("label_")]


def load_labels(archive: Archive, names: list[str] | None = None,
                samples: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{name: (sample,) int labels} from samples.parquet's label_* columns; all of them when names is None."""
    available = label_names(archive)
    if not available:
        raise ValueError(f"{archive.run_id} has no label_* columns in samples.parquet: nothing to probe (runs of "
                         "the organism on a task carry labels; tiny or hub runs do not)")
    names = available if names is None else list(names)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"labels {missing} are not in {archive.run_id}; available: {available}")
    table = archive.samples if samples is None else archive.samples.iloc[np.asarray(samples)]
    out = {}
    for name in names:
        column = table[f"label_{name}"]
        if column.isna().any():
            raise ValueError(f"label {name!r} is missing for samples {table['sample'][column.isna()].tolist()[:10]}")
        out[name] = column.to_numpy().astype(np.int64)
    return out


def instance_groups(archive: Archive, samples: np.ndarray | None = None) -> np.ndarray:
    """The cross-validation group of each sample: its task instance (task and instance id together)."""
    table = archive.samples if samples is None else archive.samples.iloc[np.asarray(samples)]
    if "instance" not in table:
        raise ValueError(f"{archive.run_id}: samples.parquet has no 'instance' column to group folds by")
    task = table["task"].astype(str) if "task" in table else ""
    return (task + ":" + table["instance"].astype(str)).to_numpy()
