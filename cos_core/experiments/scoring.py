"""Reading answers off many generated videos while the device makes the next batch: the task's extractor, inline
or in a pool of worker processes.

Owns `Scorer` (submit a batch of videos, collect their scores later: `correct`, `score`, `answer_key` and the
task's outcome labels as `outcome_<name>`) and `answer_keys` (the discrete answer only, for x̂0 at early steps).
Workers are spawned (never forked from a process that holds torch threads) and import numpy and the tasks only.
Must not import torch, pipelines or archives.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from typing import Any, Sequence

import numpy as np

from ..tasks import Instance, Task

_INSTANCES: dict[tuple[str, int], Instance] = {}  # per process: instances already built


def _instance(task: Task, seed: int) -> Instance:
    key = (repr(task), int(seed))
    if key not in _INSTANCES:
        if len(_INSTANCES) > 4096:
            _INSTANCES.clear()
        _INSTANCES[key] = task.instance(int(seed))
    return _INSTANCES[key]


def score_videos(task: Task, seeds: Sequence[int], videos: np.ndarray) -> list[dict[str, Any]]:
    """Score video i (3, F, H, W) as an answer to instance seeds[i]."""
    out = []
    for seed, video in zip(seeds, videos):
        answer = task.extract(video)
        scores = task.score(answer, _instance(task, seed))
        row = {"correct": bool(scores["correct"]), "score": float(scores["score"]),
               "answer_key": task.answer_key(answer)}
        row.update({f"outcome_{k}": (None if v is None else int(v)) for k, v in task.outcome_labels(answer).items()})
        out.append(row)
    return out


def answer_keys(task: Task, videos: np.ndarray) -> list[str | None]:
    """The discrete answer (`Task.answer_key`) of each video (3, F, H, W); None where unreadable."""
    return [task.answer_key(task.extract(video)) for video in videos]


def default_workers(device: str) -> int:
    """0 (score inline) on the CPU, where the model needs the cores; else up to 8 processes, one core kept free."""
    if str(device).startswith("cpu"):
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class Pending:
    """Scores of one submitted batch, ready or on their way."""

    def __init__(self, parts: list[Any]):
        self.parts = parts

    def result(self) -> list[Any]:
        out: list[Any] = []
        for part in self.parts:
            out.extend(part.result() if isinstance(part, futures.Future) else part)
        return out


class Scorer:
    """`submit(fn, task, ...)` runs `score_videos` / `answer_keys` inline (workers = 0) or in worker processes,
    split into chunks so that several workers share one batch; `Pending.result()` returns them in order. Use as a
    context manager (the pool is shut down on exit)."""

    def __init__(self, workers: int = 0, chunk: int = 64):
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0 (0 = score in this process)")
        self.workers, self.chunk = int(workers), int(chunk)
        self._pool: futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def scores(self, task: Task, seeds: Sequence[int], videos: np.ndarray) -> Pending:
        return self._submit(score_videos, task, list(seeds), videos)

    def keys(self, task: Task, videos: np.ndarray) -> Pending:
        return self._submit(answer_keys, task, None, videos)

    def _submit(self, fn: Any, task: Task, seeds: list[int] | None, videos: np.ndarray) -> Pending:
        videos = np.asarray(videos, dtype=np.float32)
        if self.workers == 0:
            return Pending([fn(task, *([seeds] if seeds is not None else []), videos)])
        parts = []
        for lo in range(0, len(videos), self.chunk):
            args = ([seeds[lo:lo + self.chunk]] if seeds is not None else []) + [videos[lo:lo + self.chunk]]
            parts.append(self._executor().submit(fn, task, *args))
        return Pending(parts)
