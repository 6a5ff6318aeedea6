"""Fork task: a perfect maze with TWO red goals at the same path distance from the start; walking to either is right.

Owns the fork sampler (a start and two goals whose solution paths split within `max_shared` moves), the choice of
which goal the ground-truth video walks to (a coin flip independent of the maze, so the first frame cannot tell)
and the per-goal evidence used to count candidate paths alive per denoising step. Maze carving, drawing and
reading are `maze`'s, called not copied. Must not import torch, diffusers or task modules other than `maze`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from .common import Instance, check_int, render, sanitize
from .maze import FLOOR, GOAL, PALETTE, TRACE, MazeTask, bfs, carve, check_maze_geometry, move_of, trace_path

MOVE_PAIRS = tuple(combinations(range(4), 2))  # label `fork_moves`: unordered pair of moves out of the fork cell
MAX_MAZES = 10_000  # mazes carved before giving up on one instance (only the largest min_path come near it)
N_LEN_BINS = 4  # label `path_len_bin`: cells beyond min_path on each solution, 0, 1, 2, 3+ (~45/26/15/14 %)
TRACE_SPAN = float(np.linalg.norm(PALETTE[TRACE] - PALETTE[FLOOR]))


@dataclass(frozen=True)
class ForkConfig:
    size: int = 5  # cells per side
    cell_px: int = 4  # cell pitch in pixels, wall line included
    min_path: int = 6  # cells on each solution path, start and goal included
    max_shared: int = 1  # moves both solutions share before they split (0: they split at the start cell)
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_maze_geometry(self, min_size=3)
        check_int("max_shared", self.max_shared, 0, 3)
        check_int("min_path", self.min_path, 3, self.size * self.size // 2)  # two near-disjoint paths must fit


class ForkTask(MazeTask):
    name = "fork"
    prompt = "walk to either goal"
    Config = ForkConfig
    palette = PALETTE
    answer_field = "goal"
    answer_is_unique = False
    difficulty_label = None  # maze's bins do not apply; fork's path_len_bin is a label, not a difficulty knob

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        n = self.config.size
        classes = {"fork_depth": self.config.max_shared + 1, "fork_moves": len(MOVE_PAIRS), "path_len_bin": N_LEN_BINS}
        classes.update({f"on_either_r{r}c{c}": 2 for r in range(n) for c in range(n)})
        return classes

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """Carve a maze, try starts in random order until one has a valid goal pair, pick a pair and a coin."""
        c, n_cells = self.config, self.config.size**2
        for rejected_mazes in range(MAX_MAZES):
            links = carve(self._neighbours, rng.random(n_cells - 1))
            for rejected_starts, start in enumerate(rng.permutation(n_cells).tolist()):
                dist, parent = bfs(n_cells, links, start)
                pairs = fork_pairs(dist, parent, c.min_path - 1, c.max_shared)
                if not pairs:
                    continue
                goals = pairs[int(rng.random() * len(pairs))]
                gt_goal = int(rng.random() * 2)
                paths = [path_to(parent, start, g) for g in goals]
                return {
                    "links": links,
                    "path": paths[gt_goal],  # what the ground-truth video walks (maze's drawing reads this key)
                    "paths": paths,
                    "goals": list(goals),
                    "gt_goal": gt_goal,
                    "fork_depth": shared_moves(*paths),
                    "rejected": [rejected_mazes, rejected_starts],
                }
        raise RuntimeError(f"no fork instance in {MAX_MAZES} mazes with {c}; lower min_path or raise max_shared")

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        video = super()._draw(spec)  # (frame, H, W): walks spec["path"], its goal red
        other = spec["goals"][1 - spec["gt_goal"]]
        frame_px = video.reshape(len(video), -1)  # (frame, H*W), a view of the fresh contiguous video
        frame_px[:, self._cell_px[other]] = GOAL
        return video

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        n, (p0, p1), fork = self.config.size, spec["paths"], spec["fork_depth"]
        moves = sorted((move_of(n, p0[fork], p0[fork + 1]), move_of(n, p1[fork], p1[fork + 1])))
        on_either = set(p0) | set(p1)
        labels = {
            "fork_depth": fork,
            "fork_moves": MOVE_PAIRS.index(tuple(moves)),
            "path_len_bin": min(len(p0) - self.config.min_path, N_LEN_BINS - 1),
        }
        labels.update({f"on_either_r{r}c{c}": int(r * n + c in on_either) for r in range(n) for c in range(n)})
        return labels

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        n, paths = self.config.size, spec["paths"]
        meta = super()._meta(spec)
        del meta["goal"], meta["path"]  # the walked goal is a coin flip: only `gt_goal` names it
        return meta | {
            "goals": [list(divmod(g, n)) for g in spec["goals"]],  # ordered by cell index (row-major)
            "paths": [[list(divmod(cell, n)) for cell in path] for path in paths],
            "gt_goal": spec["gt_goal"],  # which of `goals` the ground-truth video walks to; both are correct
            "fork": list(divmod(paths[0][spec["fork_depth"]], n)),
            "fork_depth": spec["fork_depth"],
            "rejected_mazes": spec["rejected"][0],
            "rejected_starts": spec["rejected"][1],
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        super()._check(spec, video)  # a spanning tree; the walked path is valid and reads back from its trace
        (p0, p1), fork = spec["paths"], spec["fork_depth"]
        assert len(p0) == len(p1) >= self.config.min_path, f"solution lengths {len(p0)} != {len(p1)} or too short"
        assert p0[0] == p1[0] and spec["goals"] == [p0[-1], p1[-1]] and p0[-1] < p1[-1], f"bad goals {spec['goals']}"
        assert p0[: fork + 1] == p1[: fork + 1] and fork <= self.config.max_shared, f"fork at move {fork}"
        assert not set(p0[fork + 1 :]) & set(p1[fork + 1 :]), "solutions meet again after the fork"
        read = self._extract(video)
        n = self.config.size
        assert read["goals"] == [list(divmod(g, n)) for g in spec["goals"]], f"goals read as {read['goals']}"
        assert read["goal"] == spec["gt_goal"], f"walked goal read as {read['goal']}, not {spec['gt_goal']}"

    def solution_video(self, inst: Instance, goal: int) -> np.ndarray:
        """The instance's video walking to goal `goal` (0 or 1) instead: (3, frame, H, W); both are correct."""
        if goal not in (0, 1):
            raise ValueError(f"goal={goal!r}: allowed 0 or 1")
        n, meta = self.config.size, inst.meta
        paths = [[r * n + c for r, c in path] for path in meta["paths"]]
        spec = {"links": links_of(meta), "path": paths[goal], "goals": [p[-1] for p in paths], "gt_goal": goal}
        return render(self._draw(spec), self.palette)

    # -- reading answers ----------------------------------------------------------------------------------------
    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        """Maze's reading, plus both red goals of frame 0 and which one (0/1) the trace walks to (None: neither
        or both)."""
        n, answer = self.config.size, super()._extract(frames)  # its `goal`/`path` need exactly one red cell
        cells0, links0 = self._read(frames[:, 0])
        goals = np.flatnonzero(cells0 == GOAL).tolist()
        goals = goals if len(goals) == 2 else []
        start = None if answer["start"] is None else answer["start"][0] * n + answer["start"][1]
        trace = {r * n + c for r, c in answer["cells"]}
        open0 = {link for link, k in links0.items() if k == FLOOR}
        paths = [trace_path(start, g, trace, open0) for g in goals]
        reached = [k for k, path in enumerate(paths) if path is not None]
        goal = reached[0] if len(reached) == 1 else None
        return answer | {
            "goals": [list(divmod(g, n)) for g in goals],
            "goal": goal,
            "reached": reached,
            "path": None if goal is None else [list(divmod(cell, n)) for cell in paths[goal]],
        }

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        """Maze's grading against each solution; the nearer one counts. `goal`: walked goal, -1 for none."""
        per_goal = [super(ForkTask, self)._score(answer, dataclasses.replace(inst, meta=inst.meta | {"path": p}))
                    for p in inst.meta["paths"]]
        best = max(per_goal, key=lambda s: (s["correct"], s["cell_iou"]))
        goal = answer.get("goal")
        return best | {"goal": float(goal) if goal in (0, 1) else -1.0}

    def outcome_labels(self, answer: dict[str, Any]) -> dict[str, int | None]:
        """`goal`: which of the two goals (ordered by cell index) the video walked to; None when neither."""
        goal = answer.get("goal")
        return {"goal": int(goal) if goal in (0, 1) else None}

    def candidates(self, frames: Any, inst: Instance) -> np.ndarray:
        """Trace evidence per goal (2,) in [0, 1]: mean over the pixels only that goal's solution paints (its cells
        after the fork, goal cell excluded, and the wall gaps it walks through) of how far the last frame's
        colour has gone from floor to trace. One path traced: one-hot; a 50:50 blend of both: (0.5, 0.5)."""
        last = sanitize(frames, self.video_shape)[:, -1].reshape(3, -1)  # (3, H*W)
        evidence = np.clip(1 - np.linalg.norm(last - PALETTE[TRACE][:, None], axis=0) / TRACE_SPAN, 0, 1)  # (H*W,)
        return np.array([evidence[px].mean() for px in self.exclusive_pixels(inst.meta)], dtype=np.float32)

    def exclusive_pixels(self, meta: dict[str, Any]) -> list[np.ndarray]:
        """Per goal, the flat pixel indices (H*W) that only its solution turns to trace."""
        n = self.config.size
        paths = [[r * n + c for r, c in path] for path in meta["paths"]]
        steps = [{(min(a, b), max(a, b)) for a, b in zip(p, p[1:])} for p in paths]
        out = []
        for k, path in enumerate(paths):
            cells = sorted(set(path[:-1]) - set(paths[1 - k]))
            links = sorted(steps[k] - steps[1 - k])
            rows = [self._link_row[link] for link in links]
            out.append(np.concatenate([self._cell_px[cells].ravel(), self._link_px[rows].ravel()]))
        return out


def fork_pairs(dist: np.ndarray, parent: np.ndarray, min_moves: int, max_shared: int) -> list[tuple[int, int]]:
    """Goal pairs (a, b), a < b, at equal distance >= min_moves whose paths from the start share <= max_shared
    moves: their ancestors at depth max_shared + 1 (their "branch") differ. In a tree the distance is the unique
    path's length."""
    depth, dists, parents = max_shared + 1, dist.tolist(), parent.tolist()
    branch: dict[int, int] = {}
    by_dist: dict[int, list[int]] = {}
    for cell in np.argsort(dist, kind="stable").tolist():  # parents before children; equal distances by cell
        d = dists[cell]
        if d >= depth:
            branch[cell] = cell if d == depth else branch[parents[cell]]
            if d >= min_moves:
                by_dist.setdefault(d, []).append(cell)
    return [(a, b) for cells in by_dist.values() for a, b in combinations(cells, 2) if branch[a] != branch[b]]


def path_to(parent: np.ndarray, start: int, goal: int) -> list[int]:
    path = [goal]
    while path[-1] != start:
        path.append(int(parent[path[-1]]))
    return path[::-1]


def shared_moves(a: list[int], b: list[int]) -> int:
    """Moves two paths from the same start share before they split (index of the fork cell)."""
    k = 0
    while k + 1 < min(len(a), len(b)) and a[k + 1] == b[k + 1]:
        k += 1
    return k


def links_of(meta: dict[str, Any]) -> list[tuple[int, int]]:
    """Open walls (a, b), a < b, from maze meta's right_open/down_open."""
    n = meta["size"]
    right = [(r * n + c, r * n + c + 1) for r, row in enumerate(meta["right_open"]) for c, o in enumerate(row) if o]
    return right + [(r * n + c, (r + 1) * n + c) for r, row in enumerate(meta["down_open"]) for c, o in enumerate(row)
                    if o]

