"""Training batches for the organism: a mixture of tasks, deterministic in the step index, made on CPU workers.

Owns the task mixture (`name:weight` specs), the seed layout (batch `step` uses TRAIN seeds `step*B .. step*B+B-1`,
below a reserved validation block) and prefetching in worker processes. Workers ship palette-index videos (uint8,
12x smaller than pixels); the palette lookup runs on the training device. Imports torch and cos_core.tasks.
"""

from __future__ import annotations

import collections
import multiprocessing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cos_core.tasks import TASKS, TRAIN_SEEDS, get_task

VAL_SEEDS = range(TRAIN_SEEDS.stop - 1_000_000, TRAIN_SEEDS.stop)  # held out of training; used to pick checkpoints
TRAIN_STOP = VAL_SEEDS.start


@dataclass(frozen=True)
class TaskMix:
    """Which tasks a batch holds and how many of each: `counts[k]` instances of `names[k]` per batch."""

    names: tuple[str, ...]
    counts: tuple[int, ...]
    params: tuple[tuple[str, str], ...] = ()  # ((task name, JSON of get_task params), ...)

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.counts):
            raise ValueError(f"task mix needs one count per task, got names={self.names} counts={self.counts}")
        for name in self.names:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"task listed twice in {self.names}")
        if min(self.counts) < 1:
            raise ValueError(f"every task needs at least one instance per batch, got counts {self.counts}")

    @property
    def batch_size(self) -> int:
        return sum(self.counts)


def parse_tasks(spec: str) -> tuple[tuple[str, float], ...]:
    """'maze:2,memory,choice' -> (('maze', 2.0), ('memory', 1.0), ('choice', 1.0))."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in --tasks {spec!r}; allowed: {', '.join(TASKS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"task weight {weight!r} in --tasks {spec!r} is not a number") from None
        if not w > 0:
            raise ValueError(f"task weight for {name!r} must be > 0, got {w}")
        out.append((name, w))
    if not out:
        raise ValueError(f"--tasks {spec!r} names no task; allowed: {', '.join(TASKS)}")
    return tuple(out)


def task_mix(tasks: tuple[tuple[str, float], ...], batch_size: int, params: dict[str, dict] | None = None) -> TaskMix:
    """Split `batch_size` over weighted tasks by largest remainder (each task gets at least one)."""
    import json

    if batch_size < len(tasks):
        raise ValueError(f"batch_size={batch_size} is smaller than the number of tasks ({len(tasks)})")
    weights = np.array([w for _, w in tasks], dtype=np.float64)
    exact = weights / weights.sum() * batch_size
    counts = np.maximum(np.floor(exact).astype(int), 1)
    while counts.sum() < batch_size:
        counts[np.argmax(exact - counts)] += 1
    while counts.sum() > batch_size:
        counts[np.argmax(counts)] -= 1
    params = params or {}
    return TaskMix(tuple(n for n, _ in tasks), tuple(int(c) for c in counts),
                   tuple((n, json.dumps(params.get(n, {}), sort_keys=True)) for n, _ in tasks))


def build_tasks(mix: TaskMix) -> list[Any]:
    import json

    params = dict(mix.params)
    return [get_task(name, **json.loads(params.get(name, "{}"))) for name in mix.names]


def step_seeds(mix: TaskMix, step: int) -> list[range]:
    """The TRAIN seeds of batch `step`, one range per task."""
    start = step * mix.batch_size
    if start + mix.batch_size > TRAIN_STOP:
        raise ValueError(f"step {step} runs past the training seeds (stop {TRAIN_STOP})")
    out, offset = [], start
    for count in mix.counts:
        out.append(range(offset, offset + count))
        offset += count
    return out


_WORKER_TASKS: list[Any] = []


def _init_worker(mix: TaskMix) -> None:
    _WORKER_TASKS[:] = build_tasks(mix)


def _index_batch(mix: TaskMix, step: int, tasks: list[Any] | None = None) -> list[np.ndarray]:
    tasks = tasks if tasks is not None else _WORKER_TASKS
    return [task.index_videos(seeds) for task, seeds in zip(tasks, step_seeds(mix, step))]  # each (n, F, H, W)


class BatchSource:
    """`source.batch(step)` -> (videos (B, 3, F, H, W) float32 on `device`, task_ids (B,) int64), same for any run.

    With `workers > 0` batches are made ahead in worker processes (spawned, so CUDA in the parent is safe).
    """

    def __init__(self, mix: TaskMix, device: torch.device | str, workers: int = 0, prefetch: int = 0):
        self.mix, self.device = mix, torch.device(device)
        self.tasks = build_tasks(mix)
        self.palettes = [torch.as_tensor(t.palette, dtype=torch.float32, device=self.device) for t in self.tasks]
        self.task_ids = torch.cat([torch.full((c,), t.task_id, dtype=torch.long) for t, c in
                                   zip(self.tasks, mix.counts)]).to(self.device)
        self.workers = int(workers)
        self.prefetch = int(prefetch) or 2 * self.workers
        self._pool = None
        self._pending: collections.deque = collections.deque()
        self._next_step = None
        if self.workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(mix,))

    def _indices(self, step: int) -> list[np.ndarray]:
        if self._pool is None:
            return _index_batch(self.mix, step, self.tasks)
        if self._next_step is None or not self._pending or self._pending[0][0] != step:
            self._pending.clear()
            self._next_step = step
        while len(self._pending) < self.prefetch:
            s = self._next_step
            self._pending.append((s, self._pool.apply_async(_index_batch, (self.mix, s))))
            self._next_step += 1
        _, result = self._pending.popleft()
        return result.get()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for index, palette in zip(self._indices(step), self.palettes):
            idx = torch.from_numpy(index).to(self.device, non_blocking=True).long()  # (n, F, H, W)
            parts.append(palette[idx].permute(0, 4, 1, 2, 3))  # (n, 3, F, H, W)
        return torch.cat(parts).contiguous(), self.task_ids

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
