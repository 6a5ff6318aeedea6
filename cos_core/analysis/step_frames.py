"""The frames a task's answer extractor reads at every step of a sample, and the task instance they answer.

Owns where those frames come from: x0_hat itself when the latent is the video (the organism: pixel space,
(3, frame, H, W) in [-1, 1]), else the decoded x0_hat frames (uint8) when the capture decoded them; and the task
(name and parameters from the manifest) with its `Instance` rebuilt from the instance seed. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from ..archive import Archive
from ..tasks import Instance, Task, get_task


@dataclass(frozen=True)
class StepFrames:
    """Per-step frames of one sample in the task layout, plus the final video and the steps they belong to."""

    steps: list[int]
    frames: np.ndarray  # (step, 3, frame, H, W) float32 in [-1, 1] (values as the model made them)
    final: np.ndarray  # (3, frame, H, W)


def run_tasks(archive: Archive) -> dict[str, list[int]]:
    """{task name: samples} of the run's task samples; ValueError when the run has none."""
    table = archive.samples
    if "task" not in table or not (table["task"].astype(str) != "").any():
        raise ValueError(f"{archive.run_id} has no task samples (samples.parquet 'task' is empty): answer "
                         "dynamics need a run of a task, e.g. `cos capture --task maze`")
    out: dict[str, list[int]] = {}
    for sample, name in zip(table["sample"], table["task"].astype(str)):
        if name:
            out.setdefault(name, []).append(int(sample))
    return out


def task_for(archive: Archive, name: str) -> Task:
    """Task `name` with the parameters the run was captured with: manifest config.task_params is {task: params}
    (what `cos capture` records, empty for a task at its defaults); an older flat {param: value} is read as such."""
    params = archive.manifest.get("config", {}).get("task_params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{archive.run_id}: manifest config.task_params must be an object, got {params!r}")
    if all(isinstance(v, dict) for v in params.values()):  # per task
        params = params.get(name) or {}
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return get_task(name, **params)


def instance_of(archive: Archive, task: Task, sample: int) -> Instance:
    row = archive.samples.iloc[sample]
    try:
        seed = int(row["instance"])
    except (TypeError, ValueError):
        raise ValueError(f"{archive.run_id} sample {sample}: instance {row['instance']!r} is not a task seed") from None
    return task.instance(seed)


def frame_source(archive: Archive, task: Task) -> str:
    """'x0_hat' when the latent is the task's video, 'decoded' when decoded frames match it; else ValueError."""
    shape = tuple(task.video_shape)
    info = archive.manifest["tensors"].get("x0_hat")
    if info is not None and tuple(info["shape"]) == shape:
        return "x0_hat"
    decoded = archive.manifest.get("decoded")
    if decoded and tuple(decoded["shape"]) == (shape[1], shape[2], shape[3], 3):
        return "decoded"
    got = info["shape"] if info else None
    raise ValueError(f"{archive.run_id}: no per-step frames in the task's layout {shape}: x0_hat has shape {got} "
                     f"and decoded frames are {decoded['shape'] if decoded else 'absent'} (capture x0_hat of a "
                     "pixel-space model, or decode with --decode)")


def step_frames(archive: Archive, sample: int, source: str) -> StepFrames:
    if source == "x0_hat":
        steps = list(archive.manifest["tensors"]["x0_hat"]["steps"])
        frames = archive.tensor("x0_hat", sample=sample).astype(np.float32)  # (step, 3, F, H, W)
        final = archive.read(sample, "final").astype(np.float32)
    elif source == "decoded":
        steps = list(archive.manifest["decoded"]["steps"])
        frames = _from_uint8(archive.read(sample, "decoded/x0_hat"))
        final = _from_uint8(archive.read(sample, "decoded/final")[None])[0]
    else:
        raise ValueError(f"frame source {source!r} is not allowed; use 'x0_hat' or 'decoded'")
    check_finite_frames(archive.run_id, sample, steps, frames, final)
    return StepFrames(steps, frames, final)


def check_finite_frames(run_id: str, sample: int, steps: list[int], frames: np.ndarray, final: np.ndarray) -> None:
    """ValueError naming the sample and steps where x0_hat (step, ...) or the final output holds NaN/inf."""
    bad = [int(s) for s, ok in zip(steps, np.isfinite(frames).reshape(len(frames), -1).all(1)) if not ok]
    if bad:
        raise ValueError(f"{run_id} sample {sample}: x0_hat holds NaN/inf at step {', '.join(map(str, bad))} "
                         "(the sampler diverged there); distances and answers would be meaningless")
    if not np.isfinite(final).all():
        raise ValueError(f"{run_id} sample {sample}: the final output holds NaN/inf")


def _from_uint8(frames: np.ndarray) -> np.ndarray:
    """(step, F, H, W, 3) uint8 -> (step, 3, F, H, W) float32 in [-1, 1]."""
    return frames.transpose(0, 4, 1, 2, 3).astype(np.float32) / 127.5 - 1.0
