"""Maze task: an agent walks the unique path of a perfect maze from start to goal, leaving a trace.

Owns maze generation (randomised depth-first search = a spanning tree, so the path is unique), its drawing in
a few pixels per cell, and the extractor that reads walls, start, goal and trace back from any frames.
Must not import torch, diffusers or other task modules.

Drawing: cells of `cell_px` pixels on a 1-pixel wall lattice; frame 0 is the unsolved maze (agent on the start
cell, goal cell red); frame f shows the trace up to path index round(f * (L-1) / (F-1)), the last frame the full
trace with the agent on the goal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import STEPS, Instance, Task, check_frame_size, check_int, nearest

FLOOR, WALL, TRACE, AGENT, GOAL = range(5)
PALETTE = np.array(
    [[-1, -1, -1], [1, 1, 1], [1, 1, -1], [-1, 1, 1], [1, -1, -1]], dtype=np.float32
)  # floor black, wall white, trace yellow, agent cyan, goal red
MAX_COLOUR_DIST = 1.0  # half the smallest palette distance (2.0): farther means "unreadable"


@dataclass(frozen=True)
class MazeConfig:
    size: int = 5  # cells per side
    cell_px: int = 4  # cell pitch in pixels, wall line included
    min_path: int = 6  # cells on the path, start and goal included (falls back to the farthest cell)
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_maze_geometry(self, min_size=2)
        check_int("min_path", self.min_path, 2, self.size * self.size)


def check_maze_geometry(cfg: Any, min_size: int) -> None:
    """Frame size, cell pitch and maze size of a maze-like config fit together (ValueError naming what is off)."""
    check_frame_size(cfg.height, cfg.width, cfg.n_frames)
    check_int("cell_px", cfg.cell_px, 2, 64)
    max_size = (min(cfg.height, cfg.width) - 1) // cfg.cell_px
    if max_size < min_size:
        raise ValueError(f"cell_px={cfg.cell_px} leaves no room for a {min_size}x{min_size} maze in "
                         f"{cfg.height}x{cfg.width} px")
    check_int("size", cfg.size, min_size, max_size)


class MazeTask(Task):
    name = "maze"
    prompt = "solve the maze"
    Config = MazeConfig
    palette = PALETTE
    answer_field = "path"
    difficulty_label = "path_len_bin"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        c, n = self.config, self.config.size
        extent = n * c.cell_px + 1
        self.origin = ((c.height - extent) // 2, (c.width - extent) // 2)  # (row, col) of the top-left wall pixel
        self.links = all_links(n)  # every inner wall segment as (a, b), a < b
        self._neighbours = [neighbours(n, cell) for cell in range(n * n)]
        flat = np.arange(c.height * c.width).reshape(c.height, c.width)
        self._cell_px = np.stack([flat[self._cell_slices(k)].ravel() for k in range(n * n)])  # (cell, px)
        self._link_px = np.stack([flat[self._link_slices(a, b)].ravel() for a, b in self.links])  # (link, px)
        self._link_row = {link: i for i, link in enumerate(self.links)}
        self._base = self._draw_lattice().ravel()  # (H*W,) every wall closed

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        n = self.config.size
        classes = {"first_move": 4, "last_move": 4, "path_len_bin": 4}
        classes.update({f"visits_r{r}c{c}": 2 for r in range(n) for c in range(n)})
        return classes

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        n, c = self.config.size, self.config
        draws = rng.random(n * n + 2)
        links = carve(self._neighbours, draws[2:])
        start = int(draws[0] * n * n)
        dist, parent = bfs(n * n, links, start)
        far = np.flatnonzero(dist >= c.min_path - 1)
        goal = int(far[int(draws[1] * len(far))]) if len(far) else int(dist.argmax())
        path = [goal]
        while path[-1] != start:
            path.append(int(parent[path[-1]]))
        return {"links": links, "path": path[::-1]}

    def _cell_slices(self, cell: int) -> tuple[slice, slice]:
        r, col = divmod(cell, self.config.size)
        p, (oy, ox) = self.config.cell_px, self.origin
        return slice(oy + r * p + 1, oy + (r + 1) * p), slice(ox + col * p + 1, ox + (col + 1) * p)

    def _link_slices(self, a: int, b: int) -> tuple[slice, slice]:
        """Pixels of the wall between adjacent cells a < b (open: floor, closed: wall)."""
        ra, ca = divmod(a, self.config.size)
        p, (oy, ox) = self.config.cell_px, self.origin
        if b == a + 1:  # horizontal neighbour: a vertical wall segment
            return slice(oy + ra * p + 1, oy + (ra + 1) * p), slice(ox + (ca + 1) * p, ox + (ca + 1) * p + 1)
        return slice(oy + (ra + 1) * p, oy + (ra + 1) * p + 1), slice(ox + ca * p + 1, ox + (ca + 1) * p)

    def _draw_lattice(self) -> np.ndarray:
        c, (oy, ox) = self.config, self.origin
        base = np.full((c.height, c.width), FLOOR, dtype=np.uint8)
        for k in range(c.size + 1):
            base[oy + k * c.cell_px, ox : ox + c.size * c.cell_px + 1] = WALL
            base[oy : oy + c.size * c.cell_px + 1, ox + k * c.cell_px] = WALL
        return base

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        c, path = self.config, spec["path"]
        base = self._base.copy()  # (H*W,)
        base[self._link_px[[self._link_row[link] for link in spec["links"]]]] = FLOOR
        base[self._cell_px[path[-1]]] = GOAL
        painted_at = np.full(base.shape, 1 << 14, dtype=np.int16)  # path index at which a pixel turns to trace
        painted_at[self._cell_px[path]] = np.arange(len(path))[:, None]
        steps = [self._link_row[(min(a, b), max(a, b))] for a, b in zip(path, path[1:])]
        painted_at[self._link_px[steps]] = np.arange(1, len(path))[:, None]
        reached = agent_steps(len(path), c.n_frames)  # (frame,) path index of the agent
        video = np.where(painted_at[None] <= reached[:, None], TRACE, base[None]).astype(np.uint8)  # (frame, H*W)
        video[np.arange(c.n_frames)[:, None], self._cell_px[np.asarray(path)[reached]]] = AGENT
        return video.reshape(c.n_frames, c.height, c.width)

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        n, path = self.config.size, spec["path"]
        on_path = set(path)
        labels = {
            "first_move": move_of(n, path[0], path[1]),
            "last_move": move_of(n, path[-2], path[-1]),
            "path_len_bin": self.path_len_bin(len(path)),
        }
        labels.update({f"visits_r{r}c{c}": int(r * n + c in on_path) for r in range(n) for c in range(n)})
        return labels

    def path_len_bin(self, length: int) -> int:
        """4 bins of path length (cells) above min_path: +0..1, +2..4, +5..8, +9.. (scaled by size**2/25), near
        balanced for 5x5 depth-first mazes."""
        scale = self.config.size**2 / 25
        edges = [self.config.min_path + round(k * scale) for k in (2, 5, 9)]
        return int(np.searchsorted(edges, length, side="right"))

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        n = self.config.size
        right, down = np.zeros((n, n - 1), dtype=bool), np.zeros((n - 1, n), dtype=bool)
        for a, b in spec["links"]:
            (ra, ca), (rb, cb) = divmod(a, n), divmod(b, n)
            if ra == rb:
                right[ra, ca] = True
            else:
                down[ra, ca] = True
        return {
            "size": n,
            "cell_px": self.config.cell_px,
            "origin": list(self.origin),
            "right_open": right.tolist(),  # (size, size-1): wall between (r, c) and (r, c+1) is open
            "down_open": down.tolist(),  # (size-1, size): wall between (r, c) and (r+1, c) is open
            "start": list(divmod(spec["path"][0], n)),
            "goal": list(divmod(spec["path"][-1], n)),
            "path": [list(divmod(cell, n)) for cell in spec["path"]],
            "agent_step": agent_steps(len(spec["path"]), self.config.n_frames).tolist(),
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        n, path = self.config.size, spec["path"]
        links = set(spec["links"])
        assert len(links) == n * n - 1, f"maze has {len(links)} open walls; a spanning tree of {n*n} cells has {n*n-1}"
        assert len(set(path)) == len(path), f"path {path} revisits a cell"
        for a, b in zip(path, path[1:]):
            assert (min(a, b), max(a, b)) in links, f"path step {a}->{b} goes through a wall"
        assert len(path) >= 2, "start and goal coincide"
        drawn = self._extract(video)["path"]
        assert drawn == [list(divmod(cell, n)) for cell in path], f"drawn trace reads as {drawn}, not {path}"

    # -- reading answers ----------------------------------------------------------------------------------------
    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        """Start/goal/walls from frame 0, trace from the last frame; `path` is the trace walked over open walls."""
        n = self.config.size
        cells0, links0 = self._read(frames[:, 0])
        cells1, links1 = self._read(frames[:, -1])
        starts, goals = np.flatnonzero(cells0 == AGENT), np.flatnonzero(cells0 == GOAL)
        start = int(starts[0]) if len(starts) == 1 else None
        goal = int(goals[0]) if len(goals) == 1 else None
        trace = set(np.flatnonzero((cells1 == TRACE) | (cells1 == AGENT)).tolist())
        open0 = {link for link, k in links0.items() if k == FLOOR}
        closed0 = [link for link, k in links0.items() if k == WALL]
        path = trace_path(start, goal, trace, open0)
        return {
            "start": None if start is None else list(divmod(start, n)),
            "goal": None if goal is None else list(divmod(goal, n)),
            "cells": [list(divmod(cell, n)) for cell in sorted(trace)],
            "path": None if path is None else [list(divmod(cell, n)) for cell in path],
            "walls_last": [cell_pair(n, link) for link, k in links1.items() if k == WALL],  # wall segments drawn
            "trace_links": [cell_pair(n, link) for link, k in links1.items() if k == TRACE],  # painted as trace
            "walls_kept": float(np.mean([links1[link] == WALL for link in closed0])) if closed0 else 0.0,
        }

    def _read(self, frame: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int], int]]:
        """One frame (3, H, W) -> palette class per cell (size*size,) and per inner wall segment {(a, b): class}."""
        flat = frame.reshape(3, -1)
        cell_class = nearest(flat[:, self._cell_px].mean(axis=2), PALETTE, MAX_COLOUR_DIST)  # (cell,)
        link_class = nearest(flat[:, self._link_px].mean(axis=2), PALETTE, MAX_COLOUR_DIST)  # (link,)
        return cell_class, dict(zip(self.links, link_class.tolist()))

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        """Exact = the trace covers exactly the path cells and crosses no true wall; graded = cell IoU."""
        truth = {tuple(cell) for cell in inst.meta["path"]}
        cells = {tuple(cell) for cell in answer.get("cells", [])}
        iou = len(truth & cells) / len(truth | cells)
        closed = self.closed_walls(inst.meta)
        crossings = len(closed & pair_set(answer.get("trace_links", [])))
        path = [tuple(cell) for cell in inst.meta["path"]]
        prefix = next((k for k, cell in enumerate(path) if cell not in cells), len(path))
        return {
            "correct": float(cells == truth and crossings == 0),
            "score": float(iou),
            "cell_iou": float(iou),
            "prefix": prefix / len(path),  # share of the path traced without a gap from the start
            "walls_kept": len(closed & pair_set(answer.get("walls_last", []))) / max(1, len(closed)),
            "wall_crossings": float(crossings),
            "path_found": float(answer.get("path") is not None),
        }

    def closed_walls(self, meta: dict[str, Any]) -> set[tuple[tuple[int, int], tuple[int, int]]]:
        """The maze's closed inner wall segments as ((row, col), (row, col)) pairs."""
        right, down = np.array(meta["right_open"]), np.array(meta["down_open"])
        closed = {((int(r), int(c)), (int(r), int(c) + 1)) for r, c in zip(*np.nonzero(~right))}
        return closed | {((int(r), int(c)), (int(r) + 1, int(c))) for r, c in zip(*np.nonzero(~down))}


def cell_pair(n: int, link: tuple[int, int]) -> list[list[int]]:
    return [list(divmod(link[0], n)), list(divmod(link[1], n))]


def pair_set(pairs: list) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    return {(tuple(p), tuple(q)) for p, q in pairs}


def neighbours(n: int, cell: int) -> tuple[int, ...]:
    r, c = divmod(cell, n)
    return tuple((r + dr) * n + c + dc for dr, dc in STEPS if 0 <= r + dr < n and 0 <= c + dc < n)


def carve(neighbour_lists: list[tuple[int, ...]], draws: np.ndarray) -> list[tuple[int, int]]:
    """Randomised depth-first search from cell 0, one uniform draw per carved wall -> open walls (a, b), a < b."""
    visited = [False] * len(neighbour_lists)
    visited[0], stack, links = True, [0], []
    while stack:
        cell = stack[-1]
        options = [nxt for nxt in neighbour_lists[cell] if not visited[nxt]]
        if not options:
            stack.pop()
            continue
        nxt = options[int(draws[len(links)] * len(options))]
        links.append((min(cell, nxt), max(cell, nxt)))
        visited[nxt] = True
        stack.append(nxt)
    return links


def all_links(n: int) -> list[tuple[int, int]]:
    horizontal = [(r * n + c, r * n + c + 1) for r in range(n) for c in range(n - 1)]
    return horizontal + [(r * n + c, (r + 1) * n + c) for r in range(n - 1) for c in range(n)]


def bfs(n_cells: int, links: list[tuple[int, int]], start: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in moves) and BFS parents from `start` over the open walls."""
    adjacent: list[list[int]] = [[] for _ in range(n_cells)]
    for a, b in links:
        adjacent[a].append(b)
        adjacent[b].append(a)
    dist, parent = [-1] * n_cells, [-1] * n_cells
    dist[start], queue = 0, deque([start])
    while queue:
        cell = queue.popleft()
        for nxt in adjacent[cell]:
            if dist[nxt] < 0:
                dist[nxt], parent[nxt] = dist[cell] + 1, cell
                queue.append(nxt)
    return np.array(dist), np.array(parent)


def trace_path(start: int | None, goal: int | None, trace: set[int], links: set[tuple[int, int]]) -> list[int] | None:
    """Shortest start->goal walk through trace cells over open walls, or None when the trace does not connect them."""
    if start is None or goal is None or start not in trace or goal not in trace:
        return None
    parent, queue = {start: start}, deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [goal]
            while path[-1] != start:
                path.append(parent[path[-1]])
            return path[::-1]
        for a, b in links:
            nxt = b if a == cell else a if b == cell else None
            if nxt is not None and nxt in trace and nxt not in parent:
                parent[nxt] = cell
                queue.append(nxt)
    return None


def move_of(n: int, a: int, b: int) -> int:
    (ra, ca), (rb, cb) = divmod(a, n), divmod(b, n)
    assert (rb - ra, cb - ca) in STEPS, f"cells {a} and {b} are not neighbours"
    return STEPS.index((rb - ra, cb - ca))


def agent_steps(length: int, n_frames: int) -> np.ndarray:
    """Path index of the agent in each frame: 0 in frame 0, length-1 in the last, evenly spread (rounded)."""
    f = np.arange(n_frames)
    return (f * (length - 1) * 2 + (n_frames - 1)) // (2 * (n_frames - 1))
