"""Procedural reasoning tasks with known answers: a registry, seeds and the shared `Instance`/`Task` types.

`get_task(name, **params)` builds a task; `task.instance(seed)` gives the ground-truth video, prompt and labels;
`task.extract(frames)` + `task.score(answer, inst)` read and grade the answer in any frames (final video or one
step's x0_hat). Must not import torch or diffusers.
"""

from __future__ import annotations

from typing import Any

from .arrows import ArrowsTask
from .choice import ChoiceTask
from .common import TASK_NAMES, TEST_SEEDS, TRAIN_SEEDS, VIDEO_SHAPE, Instance, Task
from .fork import ForkTask
from .maze import MazeTask
from .memory import MemoryTask, RecallTask
from .dispatch import DispatchTask

TASKS: dict[str, type[Task]] = {"maze": MazeTask, "memory": MemoryTask, "choice": ChoiceTask, "fork": ForkTask,
                            "arrows": ArrowsTask, "recall": RecallTask, "dispatch": DispatchTask}
assert tuple(TASKS) == TASK_NAMES, f"registry order {tuple(TASKS)} must equal task ids {TASK_NAMES}"


def get_task(name: str, **params: Any) -> Task:
    """The task called `name`, configured by `params` (ValueError names what is allowed)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**params)


__all__ = ["TASKS", "TASK_NAMES", "TEST_SEEDS", "TRAIN_SEEDS", "VIDEO_SHAPE", "Instance", "Task", "get_task"]
