"""Choice task: complete a rotation sequence by moving the right one of K candidate tiles into the empty slot.

Owns the puzzle sampler, the drawing, the extractor and the per-candidate evidence used to count candidates
alive per denoising step ("superposition"). Top row: three cue tiles showing a shape turned by a constant number
of quarter turns per tile, then an empty target slot; bottom row: K candidate tiles (the shape in K different
orientations). The video slides the candidate with the next orientation into the target slot. Shapes are random
polyominoes by default (so held-out seeds hold unseen puzzles) or one of three named shapes.
Must not import torch, diffusers or other task modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import STEPS, Instance, Task, check_frame_size, check_int, sanitize

BACKGROUND, SLOT = 0, 1
PALETTE = np.array(
    [[-1, -1, -1], [-0.4, -0.4, -0.4], [1, 1, 1], [1, 1, -1], [-1, 1, 1]], dtype=np.float32
)  # background, empty slot, then shape colours: white, yellow, cyan
N_COLOURS = len(PALETTE) - 2
TILE, GAP, MARGIN = 5, 1, 2  # tile side, gap between tiles, rows above the cue row and below the candidate row
SHAPES = np.array(
    [
        ["#....", "#....", "#....", "#....", "####."],  # L
        ["..#..", "...#.", "#####", "...#.", "..#.."],  # arrow
        ["#####", "..#..", "..#..", "..#..", "....."],  # T
    ]
)
SHAPE_MASKS = np.array([[[ch == "#" for ch in row] for row in shape] for shape in SHAPES])  # (shape, 5, 5)
SHAPE_SETS = ("random", "named")
RANDOM_CELLS = (5, 8)  # a random shape has 5..8 cells, grown 4-connected inside the tile
TILE_NEIGHBOURS = [
    [(r + dr) * TILE + c + dc for dr, dc in STEPS if 0 <= r + dr < TILE and 0 <= c + dc < TILE]
    for r, c in (divmod(cell, TILE) for cell in range(TILE * TILE))
]
ROTATIONS = np.stack([np.rot90(np.arange(TILE * TILE).reshape(TILE, TILE), t).ravel() for t in range(4)])  # (4, 25)
MATCH_DIST = 1.0  # a target-slot pixel matches a template pixel when closer than this (L2 over RGB)
MIN_TARGET_MATCH = 0.9  # fraction of target-slot pixels that must match the chosen candidate


@dataclass(frozen=True)
class ChoiceConfig:
    k: int = 4  # candidates
    rules: tuple[int, ...] = (1, 2, 3)  # allowed quarter turns (counter-clockwise) between consecutive cues
    shapes: str = "random"  # "random": a fresh polyomino per instance; "named": one of SHAPES
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_frame_size(self.height, self.width, self.n_frames)
        check_int("k", self.k, 2, 4)
        if self.shapes not in SHAPE_SETS:
            raise ValueError(f"shapes={self.shapes!r}: allowed {SHAPE_SETS}")
        if not isinstance(self.rules, (tuple, list)) or not self.rules or len(set(self.rules)) != len(self.rules):
            raise ValueError(f"rules={self.rules!r}: expected a non-empty tuple of distinct ints in [1, 3]")
        object.__setattr__(self, "rules", tuple(self.rules))  # a list from a CLI or JSON config is fine
        for r in self.rules:
            check_int("rules item", r, 1, 3)
        check_int("width", self.width, 4 * (TILE + GAP) - GAP, 4096)
        check_int("height", self.height, 2 * (TILE + MARGIN) + 2, 4096)


class ChoiceTask(Task):
    name = "choice"
    prompt = "complete the pattern with the right piece"
    Config = ChoiceConfig
    palette = PALETTE
    answer_field = "choice"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        c = self.config
        left = (c.width - (4 * (TILE + GAP) - GAP)) // 2
        self.top_slots = [(MARGIN, left + j * (TILE + GAP)) for j in range(4)]  # (row, col); the last is the target
        left_k = (c.width - (c.k * (TILE + GAP) - GAP)) // 2
        self.candidate_slots = [(c.height - MARGIN - TILE, left_k + j * (TILE + GAP)) for j in range(c.k)]

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        classes = {"answer": self.config.k, "rule": len(self.config.rules), "answer_turns": 4}
        return classes | ({"shape": len(SHAPES)} if self.config.shapes == "named" else {})

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config
        draws = rng.random(4)
        shape = int(draws[2] * len(SHAPES)) if c.shapes == "named" else -1
        mask = SHAPE_MASKS[shape] if c.shapes == "named" else random_shape(rng)
        turns0, rule_index = int(draws[0] * 4), int(draws[1] * len(c.rules))
        answer_turns = (turns0 + 3 * c.rules[rule_index]) % 4
        others = rng.permutation([t for t in range(4) if t != answer_turns])[: c.k - 1]
        order = rng.permutation(c.k)
        candidates = np.concatenate([[answer_turns], others])[order]
        return {
            "shape": shape,
            "mask": mask,
            "colour": 2 + int(draws[3] * N_COLOURS),
            "cue_turns": [(turns0 + i * c.rules[rule_index]) % 4 for i in range(3)],
            "rule_index": rule_index,
            "candidate_turns": candidates.tolist(),
            "answer": int(np.flatnonzero(order == 0)[0]),
        }

    def tiles(self, spec: dict[str, Any]) -> np.ndarray:
        """The shape turned 0..3 quarter turns counter-clockwise, as palette-index tiles (turns, 5, 5)."""
        turned = spec["mask"].ravel()[ROTATIONS]  # (turns, 25)
        return np.where(turned, spec["colour"], SLOT).astype(np.uint8).reshape(4, TILE, TILE)

    def _path(self, spec: dict[str, Any]) -> np.ndarray:
        """Top-left (row, col) of the moving tile per frame: leaves its slot, arrives one frame before the end."""
        start, end = np.array(self.candidate_slots[spec["answer"]]), np.array(self.top_slots[3])
        frac = np.minimum(1.0, np.arange(self.config.n_frames) / max(1, self.config.n_frames - 2))
        return np.rint(start + (end - start) * frac[:, None]).astype(int)  # (frame, 2)

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        c, tiles = self.config, self.tiles(spec)
        canvas = np.full((c.height, c.width), BACKGROUND, dtype=np.uint8)
        for row, col in self.top_slots + self.candidate_slots:
            canvas[row : row + TILE, col : col + TILE] = SLOT
        for (row, col), turns in zip(self.top_slots, spec["cue_turns"]):
            canvas[row : row + TILE, col : col + TILE] = tiles[turns]
        for j, ((row, col), turns) in enumerate(zip(self.candidate_slots, spec["candidate_turns"])):
            if j != spec["answer"]:
                canvas[row : row + TILE, col : col + TILE] = tiles[turns]
        video = np.repeat(canvas[None], c.n_frames, axis=0)
        moving = tiles[spec["candidate_turns"][spec["answer"]]]
        for f, (row, col) in enumerate(self._path(spec)):
            video[f, row : row + TILE, col : col + TILE] = moving
        return video  # (frame, H, W)

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        return {
            "answer": spec["answer"],
            "rule": spec["rule_index"],
            "answer_turns": spec["candidate_turns"][spec["answer"]],
        } | ({"shape": spec["shape"]} if self.config.shapes == "named" else {})

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "answer": spec["answer"],
            "rule_turns": self.config.rules[spec["rule_index"]],
            "cue_turns": spec["cue_turns"],
            "candidate_turns": spec["candidate_turns"],
            "shape": ["".join("#" if v else "." for v in row) for row in spec["mask"]],
            "colour": spec["colour"],
            "tile_path": self._path(spec).tolist(),
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        turns = spec["candidate_turns"]
        assert not np.array_equal(np.rot90(spec["mask"], 2), spec["mask"]), "shape has rotational symmetry"
        assert len(set(turns)) == len(turns), f"candidates repeat an orientation: {turns}"
        cue = spec["cue_turns"]
        step = (cue[1] - cue[0]) % 4
        assert (cue[2] - cue[1]) % 4 == step and (cue[2] + step) % 4 == turns[spec["answer"]], f"bad rule: {spec}"
        assert self._path(spec)[-1].tolist() == list(self.top_slots[3]), "tile does not end in the target slot"
        read = self._extract(video)
        assert read["choice"] == spec["answer"] and read["target_match"][spec["answer"]] == 1.0, f"{read} vs {spec}"

    # -- reading answers ----------------------------------------------------------------------------------------
    def _crop(self, frame: np.ndarray, slot: tuple[int, int]) -> np.ndarray:
        return frame[:, slot[0] : slot[0] + TILE, slot[1] : slot[1] + TILE]  # (3, 5, 5)

    def _evidence(self, first: np.ndarray, last: np.ndarray) -> dict[str, np.ndarray]:
        """Per candidate: how far its slot was vacated, its weight in the target slot, their mean ("mass")."""
        empty = np.broadcast_to(PALETTE[SLOT][:, None, None], (3, TILE, TILE)).reshape(-1)
        templates = np.stack([self._crop(first, s).reshape(-1) for s in self.candidate_slots])  # (k, 75)
        left = np.stack([self._crop(last, s).reshape(-1) for s in self.candidate_slots])  # (k, 75)
        target = self._crop(last, self.top_slots[3]).reshape(-1)  # (75,)
        signal = templates - empty  # (k, 75)
        power = (signal**2).sum(axis=1)
        vacancy = np.where(power > 1e-3, ((templates - left) * signal).sum(axis=1) / np.maximum(power, 1e-3), 0.0)
        fill = np.linalg.lstsq(signal.T, target - empty, rcond=None)[0] if np.isfinite(signal).all() else vacancy * 0
        pixel_dist = np.linalg.norm((templates - target).reshape(len(templates), 3, -1), axis=1)  # (k, 25)
        return {
            "vacancy": vacancy,
            "fill": fill,
            "mass": np.clip(0.5 * (vacancy + fill), 0.0, 1.0),
            "target_match": (pixel_dist < MATCH_DIST).mean(axis=1),
        }

    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        ev = self._evidence(frames[:, 0], frames[:, -1])
        best = int(ev["mass"].argmax())
        return {
            "choice": best if ev["mass"][best] >= 0.5 else None,
            **{key: [round(float(v), 4) for v in value] for key, value in ev.items()},
        }

    def candidates(self, frames: Any, inst: Instance) -> np.ndarray:
        """Evidence mass per candidate (k,) in [0, 1], templates taken from the instance's true first frame."""
        last = sanitize(frames, self.video_shape)[:, -1]
        return self._evidence(inst.first_frame, last)["mass"].astype(np.float32)

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        truth = inst.meta["answer"]
        mass = np.asarray(answer.get("mass", []), dtype=float)
        match = answer.get("target_match", [])
        filled = len(match) > truth and match[truth] >= MIN_TARGET_MATCH
        share = float(mass[truth] / mass.sum()) if len(mass) > truth and mass.sum() > 0 else 0.0
        return {
            "correct": float(answer.get("choice") == truth and filled),
            "score": share,
            "answer_mass": float(mass[truth]) if len(mass) > truth else 0.0,
            "target_match": float(match[truth]) if len(match) > truth else 0.0,
        }


def random_shape(rng: np.random.Generator) -> np.ndarray:
    """A 4-connected shape of RANDOM_CELLS cells in the tile whose four quarter turns all differ (TILE, TILE) bool."""
    while True:
        draws = iter(rng.random(RANDOM_CELLS[1] + 2).tolist())
        size = RANDOM_CELLS[0] + int(next(draws) * (RANDOM_CELLS[1] - RANDOM_CELLS[0] + 1))
        cells = {int(next(draws) * TILE * TILE)}
        while len(cells) < size:
            frontier = sorted({n for cell in cells for n in TILE_NEIGHBOURS[cell]} - cells)
            cells.add(frontier[int(next(draws) * len(frontier))])
        mask = np.zeros(TILE * TILE, dtype=bool)
        mask[list(cells)] = True
        mask = mask.reshape(TILE, TILE)
        if not np.array_equal(np.rot90(mask, 2), mask):  # no 180-degree (hence no 90-degree) symmetry
            return mask
