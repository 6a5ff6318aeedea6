"""The shared shape of every procedural reasoning task: `Instance`, the `Task` base class, seeds and pixel helpers.

Owns the canonical video shape, the train/test seed ranges, seeding (one `np.random.default_rng(seed)` per
instance, no global RNG), palette rendering (a task draws palette *indices*, one lookup turns them into pixels)
and frame sanitising for extractors. Must not import torch, diffusers or any task module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import numpy as np

VIDEO_SHAPE = (3, 8, 24, 24)  # (channel, frame, height, width)
TASK_NAMES = ("maze", "memory", "choice", "fork", "arrows", "recall", "dispatch")  # order = task_id, the organism's task embedding index
TRAIN_SEEDS = range(0, 10**9)
TEST_SEEDS = range(10**9, 2 * 10**9)
MAX_SEED = 2**63 - 1
MOVES = ("up", "right", "down", "left")  # label order shared by maze moves and memory exit sides
STEPS = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (drow, dcol) per move


@dataclass(frozen=True, eq=False)
class Instance:
    """One generated problem: the ground-truth video and the facts needed to probe and score it."""

    task: str
    seed: int
    video: np.ndarray  # (3, frame, height, width) float32 in [-1, 1]
    prompt: str
    task_id: int
    labels: dict[str, int]
    meta: dict[str, Any]  # JSON-serialisable

    @property
    def first_frame(self) -> np.ndarray:
        return self.video[:, 0]  # (3, height, width)


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """ValueError unless `value` is an int in [low, high] (the message names both)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is not allowed: expected an int in [{low}, {high}]")


def check_frame_size(height: int, width: int, n_frames: int) -> None:
    check_int("height", height, 8, 4096)
    check_int("width", width, 8, 4096)
    check_int("n_frames", n_frames, 2, 1024)
    if height % 2 or width % 2:
        raise ValueError(f"height={height}, width={width}: both must be even (the organism patchifies 2x2)")


def check_seed(seed: Any) -> int:
    check_int("seed", seed, 0, MAX_SEED)
    return int(seed)


def render(index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette indices (..., frame, H, W) uint8 -> pixels (..., 3, frame, H, W) float32."""
    lead = index.shape[:-3]
    out = np.empty((*lead, 3, *index.shape[-3:]), dtype=np.float32)
    for channel in range(3):
        np.take(palette[:, channel], index, out=out[(..., channel, slice(None), slice(None), slice(None))])
    return out


def sanitize(frames: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Any frames (numpy or CPU/GPU torch tensor) -> float32 numpy, NaN/inf replaced, clipped to [-1, 1].

    A wrong shape is a caller bug (ValueError); garbage *values* are the extractor's normal input.
    """
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch
        frames = frames.detach().float().cpu().numpy()
    array = np.asarray(frames, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"frames have shape {array.shape}; this task expects {tuple(shape)} (channel, frame, H, W)")
    array = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(array, -1.0, 1.0)


def nearest(colours: np.ndarray, palette: np.ndarray, max_dist: float) -> np.ndarray:
    """Colours (3, ...) -> index of the nearest palette row, or -1 where it is farther than `max_dist` (L2)."""
    flat = colours.reshape(3, -1).T  # (n, 3)
    dist = np.linalg.norm(flat[:, None, :] - palette[None, :, :], axis=-1)  # (n, n_palette)
    index = dist.argmin(axis=1)
    index[dist[np.arange(len(flat)), index] > max_dist] = -1
    return index.reshape(colours.shape[1:])


class Task:
    """Base class: a subclass sets `name`, `prompt`, `Config`, `palette` and implements the five hooks below."""

    name: ClassVar[str]
    prompt: ClassVar[str]
    Config: ClassVar[type]
    palette: ClassVar[np.ndarray]  # (n_colours, 3) float32 in [-1, 1]
    # True: the first frame fixes one right answer (its posterior mean is that answer, so what the steps add is
    # computation); False: several answers are right and the noise picks one (mode selection).
    answer_is_unique: ClassVar[bool] = True
    # the label that bins instances by difficulty (e.g. path length), or None
    difficulty_label: ClassVar[str | None] = None
    # the field of an extracted answer that is the discrete answer compared across steps and runs (Task.answer_key)
    answer_field: ClassVar[str | None] = None

    def __init__(self, **params: Any) -> None:
        allowed = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for task {self.name!r}; allowed: {allowed}")
        self.config = self.Config(**params)
        self.label_classes: dict[str, int] = self._label_classes()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def task_id(self) -> int:
        return TASK_NAMES.index(self.name)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (3, c.n_frames, c.height, c.width)

    # -- generation ---------------------------------------------------------------------------------------------
    def instance(self, seed: int) -> Instance:
        seed = check_seed(seed)
        spec = self._sample(np.random.default_rng(seed))
        video = render(self._draw(spec), self.palette)  # (3, frame, H, W)
        labels, meta = self._labels(spec), self._meta(spec)
        self._check(spec, video)
        assert set(labels) == set(self.label_classes), f"{self.name}: labels {sorted(labels)} != label_classes"
        for key, value in labels.items():
            assert 0 <= value < self.label_classes[key], f"{self.name}: label {key}={value} out of range"
        return Instance(self.name, seed, video, self.prompt, self.task_id, labels, meta)

    def index_videos(self, seeds: Iterable[int]) -> np.ndarray:
        """Palette-index videos (B, frame, H, W) uint8: 12x smaller than pixels; `palette[index]` gives pixels."""
        seeds = [check_seed(s) for s in seeds]
        out = np.empty((len(seeds), *self.video_shape[1:]), dtype=np.uint8)  # (B, frame, H, W)
        for i, seed in enumerate(seeds):
            out[i] = self._draw(self._sample(np.random.default_rng(seed)))
        return out

    def instances(self, seeds: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Batch for training: videos (B, 3, frame, H, W) float32 equal to `instance(seed).video`, task_ids (B,)."""
        videos = render(self.index_videos(seeds), self.palette)  # (B, 3, frame, H, W)
        return videos, np.full(len(videos), self.task_id, dtype=np.int64)

    # -- reading answers ----------------------------------------------------------------------------------------
    def extract(self, frames: Any) -> dict[str, Any]:
        """Read the answer from any frames (3, frame, H, W) in [-1, 1]; never raises on garbage values."""
        return self._extract(sanitize(frames, self.video_shape))

    def score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        """`correct` (1.0 / 0.0), `score` (graded, in [0, 1]) and task-specific figures."""
        if inst.task != self.name:
            raise ValueError(f"instance of task {inst.task!r} given to task {self.name!r}")
        return self._score(answer, inst)

    @classmethod
    def answer_key(cls, answer: dict[str, Any]) -> str | None:
        """The discrete answer used to compare steps and runs (the task's `answer_field`: maze path, memory identity,
        fork goal, ...; None: unreadable); for a task without one (or the base class) the whole answer."""
        field = cls.answer_field
        value = answer if field is None else answer.get(field)
        return None if value is None else json.dumps(value, sort_keys=True)

    def outcome_labels(self, answer: dict[str, Any]) -> dict[str, int | None]:
        """Labels fixed by the generated answer rather than the instance (e.g. which of two valid goals the model
        walked to; decided by the noise, not the first frame). None where the answer does not tell. Probing them
        asks when and where the model's own decision becomes readable. Default: none."""
        return {}

    def candidates(self, frames: Any, inst: Instance) -> np.ndarray:
        raise NotImplementedError(f"task {self.name!r} has no discrete candidates; only 'choice' and 'fork' do")

    # -- hooks for subclasses -----------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        raise NotImplementedError

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:  # (frame, H, W) uint8 palette indices
        raise NotImplementedError

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        raise NotImplementedError

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        raise NotImplementedError

    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        raise NotImplementedError
