"""Arrows task (pointer chasing): follow the arrows from the start cell to the stop cell, leaving a trace.

Owns the instance sampler (a self-avoiding chain of `path_len` moves through a grid of arrow cells, every other
cell's arrow random), the drawing and the exact extractor. The answer is unique and inherently sequential: which
cell comes k moves after the start depends on the k arrows before it, so one forward pass of a shallow model cannot
follow a long chain, while denoising steps can extend a partly drawn trace (regime (b) of docs/architecture.md).
Must not import torch, diffusers or other task modules.

Drawing: a grid of `grid` × `grid` cells of 2×2 pixels (one organism token each). A cell's top-left pixel is its
arrow (one of 4 colours: up, right, down, left; black on the stop cell), its other three pixels its state: floor,
trace, agent or goal. Frame 0: the agent on the start cell, the stop cell red. Frame f: the trace up to chain index
round(f·L/(F−1)), the agent at its head; the last frame the whole chain traced, the agent on the stop cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import STEPS, Instance, Task, check_frame_size, check_int, nearest

FLOOR, TRACE, AGENT, GOAL, UP, RIGHT, DOWN, LEFT = range(8)
ARROWS = (UP, RIGHT, DOWN, LEFT)  # palette index of the arrow for move k (common.MOVES order)
PALETTE = np.array(
    [[-1, -1, -1], [1, 1, -1], [-1, 1, 1], [1, -1, -1],  # floor black, trace yellow, agent cyan, goal red
     [1, -1, 1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]],  # arrows: up magenta, right green, down blue, left white
    dtype=np.float32,
)
MAX_COLOUR_DIST = 1.0  # half the smallest palette distance (2.0): farther means "unreadable"
MAX_TRIES = 1000  # self-avoiding walks tried before giving up on one instance
CELL = 2  # pixels per cell side: one 2x2 patch of the organism per cell
N_LEN_BINS = 4


@dataclass(frozen=True)
class ArrowsConfig:
    grid: int = 12  # cells per side
    min_len: int = 12  # moves on the chain from start to stop, inclusive range
    max_len: int = 30
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_frame_size(self.height, self.width, self.n_frames)
        check_int("grid", self.grid, 3, min(self.height, self.width) // CELL)
        check_int("min_len", self.min_len, 1, self.grid * self.grid - 1)
        check_int("max_len", self.max_len, self.min_len, self.grid * self.grid - 1)


class ArrowsTask(Task):
    name = "arrows"
    prompt = "follow the arrows"
    Config = ArrowsConfig
    palette = PALETTE
    answer_field = "cells"
    difficulty_label = "path_len_bin"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        c, n = self.config, self.config.grid
        self.origin = ((c.height - n * CELL) // 2, (c.width - n * CELL) // 2)
        oy, ox = self.origin
        rows, cols = np.divmod(np.arange(n * n), n)
        top, left = oy + rows * CELL, ox + cols * CELL
        self._arrow_px = top * c.width + left  # (cell,) flat index of each cell's arrow pixel
        self._state_px = np.stack([top * c.width + left + 1, (top + 1) * c.width + left,
                                   (top + 1) * c.width + left + 1], axis=1)  # (cell, 3)
        self._neighbours = [[int((r + dr) * n + cc + dc) if 0 <= r + dr < n and 0 <= cc + dc < n else -1
                             for dr, dc in STEPS] for r, cc in zip(rows, cols)]  # (cell, move) -> cell or -1

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        return {"first_move": 4, "last_move": 4, "path_len_bin": N_LEN_BINS, "start_quadrant": 4,
                "stop_quadrant": 4}

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        c, n = self.config, self.config.grid
        length = int(rng.integers(c.min_len, c.max_len + 1))
        for _ in range(MAX_TRIES):
            path = self._walk(rng, length)
            if path is not None:
                break
        else:
            raise RuntimeError(f"no self-avoiding chain of {length} moves in {MAX_TRIES} tries with {c}")
        moves = rng.integers(0, 4, n * n)  # random arrows everywhere, then the chain's own
        for k in range(n * n):  # arrows that would point off the grid are turned until they point inside
            while self._neighbours[k][moves[k]] < 0:
                moves[k] = (moves[k] + 1) % 4
        for a, b in zip(path, path[1:]):
            moves[a] = self._neighbours[a].index(b)
        return {"path": [int(cell) for cell in path], "moves": [int(m) for m in moves]}

    def _walk(self, rng: np.random.Generator, length: int) -> list[int] | None:
        """A random self-avoiding walk of `length` moves from a random start, or None when it gets stuck."""
        n = self.config.grid
        path = [int(rng.integers(n * n))]  # plain ints: the meta is JSON
        seen = {path[0]}
        for _ in range(length):
            options = [b for b in self._neighbours[path[-1]] if b >= 0 and b not in seen]
            if not options:
                return None
            nxt = int(options[int(rng.integers(len(options)))])
            path.append(nxt)
            seen.add(nxt)
        return path

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        c, path = self.config, spec["path"]
        base = np.full(c.height * c.width, FLOOR, dtype=np.uint8)
        base[self._arrow_px] = np.array(ARROWS, dtype=np.uint8)[spec["moves"]]
        base[self._arrow_px[path[-1]]] = FLOOR  # the stop cell has no arrow
        base[self._state_px[path[-1]]] = GOAL
        video = np.repeat(base[None], c.n_frames, axis=0)  # (frame, H*W)
        reached = head_index(len(path), c.n_frames)
        for f, head in enumerate(reached):
            video[f, self._state_px[path[:head]].ravel()] = TRACE
            video[f, self._state_px[path[head]]] = AGENT
        return video.reshape(c.n_frames, c.height, c.width)

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        n, path, moves = self.config.grid, spec["path"], spec["moves"]
        return {
            "first_move": int(moves[path[0]]),
            "last_move": int(moves[path[-2]]),
            "path_len_bin": self.len_bin(len(path) - 1),
            "start_quadrant": quadrant(n, path[0]),
            "stop_quadrant": quadrant(n, path[-1]),
        }

    def len_bin(self, moves: int) -> int:
        """4 equal-width bins of chain length over [min_len, max_len]."""
        c = self.config
        return min(N_LEN_BINS - 1, (moves - c.min_len) * N_LEN_BINS // (c.max_len - c.min_len + 1))

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        n = self.config.grid
        return {
            "grid": n,
            "origin": list(self.origin),
            "moves": spec["moves"],  # (cell,) arrow per cell, row-major (the stop cell's is not drawn)
            "start": list(divmod(spec["path"][0], n)),
            "stop": list(divmod(spec["path"][-1], n)),
            "path": [list(divmod(cell, n)) for cell in spec["path"]],
            "path_len": len(spec["path"]) - 1,  # moves: the task's difficulty
            "agent_step": head_index(len(spec["path"]), self.config.n_frames).tolist(),
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        path, moves = spec["path"], spec["moves"]
        assert len(set(path)) == len(path), f"chain {path} revisits a cell"
        for a, b in zip(path, path[1:]):
            assert self._neighbours[a][moves[a]] == b, f"arrow of cell {a} does not point to {b}"
        assert all(self._neighbours[k][m] >= 0 for k, m in enumerate(moves)), "an arrow points off the grid"
        read = self._extract(video)
        n = self.config.grid
        assert read["path"] == [list(divmod(cell, n)) for cell in path], f"chain reads as {read['path']}"

    # -- reading answers ----------------------------------------------------------------------------------------
    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        """Arrows, start and stop from frame 0; traced cells from the last frame; `path` = the arrows followed from
        the start while the cells stay traced (None unless that walk ends on the stop cell)."""
        n = self.config.grid
        arrows0, state0 = self._read(frames[:, 0])
        _, state1 = self._read(frames[:, -1])
        starts, stops = np.flatnonzero(state0 == AGENT), np.flatnonzero(state0 == GOAL)
        start = int(starts[0]) if len(starts) == 1 else None
        stop = int(stops[0]) if len(stops) == 1 else None
        traced = set(np.flatnonzero((state1 == TRACE) | (state1 == AGENT)).tolist())  # the agent ends on the stop
        path = follow(start, stop, traced, arrows0, self._neighbours)
        return {
            "start": None if start is None else list(divmod(start, n)),
            "stop": None if stop is None else list(divmod(stop, n)),
            "cells": [list(divmod(cell, n)) for cell in sorted(traced)],
            "path": None if path is None else [list(divmod(cell, n)) for cell in path],
        }

    def _read(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame (3, H, W) -> arrow class per cell (cell,) and state class per cell (cell,), -1 = unreadable."""
        flat = frame.reshape(3, -1)
        arrows = nearest(flat[:, self._arrow_px], PALETTE, MAX_COLOUR_DIST)  # (cell,)
        state = nearest(flat[:, self._state_px].mean(axis=2), PALETTE, MAX_COLOUR_DIST)  # (cell,)
        return arrows, state

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        """Exact = the traced cells are exactly the chain (stop cell included); graded = cell IoU; `prefix` = the
        share of the chain traced without a gap from the start (how far along the chain the answer got)."""
        return grade_chain(answer, inst.meta["path"])


def grade_chain(answer: dict[str, Any], truth_path: list) -> dict[str, float]:
    """Exact / IoU / prefix of a traced cell set against the true path (list of [row, col], start first)."""
    truth = [tuple(cell) for cell in truth_path]
    cells = {tuple(cell) for cell in answer.get("cells", [])}
    truth_set = set(truth)
    iou = len(truth_set & cells) / len(truth_set | cells)
    prefix = 0
    while prefix < len(truth) and truth[prefix] in cells:
        prefix += 1
    return {
        "correct": float(cells == truth_set),
        "score": float(iou),
        "cell_iou": float(iou),
        "prefix": prefix / len(truth),
        "recall": len(truth_set & cells) / len(truth_set),
        "extra_cells": float(len(cells - truth_set)),
    }


def follow(start: int | None, stop: int | None, traced: set[int], arrows: np.ndarray,
           neighbours: list[list[int]]) -> list[int] | None:
    """Walk the arrows read in frame 0 from `start` through traced cells; the walk if it ends on `stop`, else None."""
    if start is None or stop is None or start not in traced:
        return None
    path, seen = [start], {start}
    while path[-1] != stop:
        move = int(arrows[path[-1]]) - UP
        if not 0 <= move < 4:
            return None
        nxt = neighbours[path[-1]][move]
        if nxt < 0 or nxt in seen or nxt not in traced:
            return None
        path.append(nxt)
        seen.add(nxt)
    return path


def head_index(length: int, n_frames: int) -> np.ndarray:
    """Chain index of the agent in each frame: 0 in frame 0, length-1 in the last, evenly spread (rounded)."""
    f = np.arange(n_frames)
    return (f * (length - 1) * 2 + (n_frames - 1)) // (2 * (n_frames - 1))


def quadrant(n: int, cell: int) -> int:
    r, c = divmod(cell, n)
    return int(r >= n / 2) * 2 + int(c >= n / 2)
