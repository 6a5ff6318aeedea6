"""Working-memory task (object permanence): an object slides behind an occluder and must come back unchanged.

Owns the trajectory sampler, the drawing and the extractor that finds the object's identity and centre in each
frame. The object (one of 4 colour+shape identities) moves at constant speed toward an occluder block spanning its
lane with random margins, is fully hidden for one or more middle frames and reappears on the far side with the
same identity, where constant motion puts it. Motion is drawn left-to-right, then rotated: 4 directions.
Must not import torch, diffusers or other task modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import Instance, Task, check_frame_size, check_int, nearest

BACKGROUND, OCCLUDER = 0, 1
PALETTE = np.array(
    [[-1, -1, -1], [0.3, 0.3, 0.3], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=np.float32
)  # background, occluder, then identities: red, green, blue, yellow
SPRITE = 4
SPRITES = np.array(
    [
        ["####", "####", "####", "####"],  # 0 red square
        [".##.", "####", "####", ".##."],  # 1 green plus
        ["####", "#..#", "#..#", "####"],  # 2 blue ring
        ["#..#", ".##.", ".##.", "#..#"],  # 3 yellow cross
    ]
)
SPRITE_MASKS = np.array([[[ch == "#" for ch in row] for row in sprite] for sprite in SPRITES])  # (id, 4, 4)
N_IDENTITIES = len(SPRITE_MASKS)
MAX_COLOUR_DIST = 0.8
MIN_PIXELS = 4  # fewer identity-coloured pixels than this in a frame: no object there
POSITION_TOLERANCE = 1.0  # pixels (L-inf) between read and true centre in a reappearance frame


@dataclass(frozen=True)
class MemoryConfig:
    speed: int = 2  # pixels per frame
    occluder_px: tuple[int, ...] = (6, 8, 10)  # allowed occluder thicknesses
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_frame_size(self.height, self.width, self.n_frames)
        if self.height != self.width:
            raise ValueError(f"height={self.height} != width={self.width}: memory rotates its canvas, use a square")
        check_int("speed", self.speed, 1, self.width)
        if not isinstance(self.occluder_px, (tuple, list)) or not self.occluder_px:
            raise ValueError(f"occluder_px={self.occluder_px!r}: expected a non-empty tuple of ints")
        object.__setattr__(self, "occluder_px", tuple(self.occluder_px))  # a list from a CLI or JSON config is fine
        for w in self.occluder_px:
            check_int("occluder_px item", w, SPRITE, self.width - 2)
        if not trajectories(self):
            raise ValueError(
                f"no trajectory fits speed={self.speed}, occluder_px={self.occluder_px}, n_frames={self.n_frames}, "
                f"width={self.width}: the object must start fully visible, hide fully, and be fully visible again"
            )


def trajectories(c: MemoryConfig) -> list[tuple[int, int, int]]:
    """Every (occluder column, occluder width, first object column) of a left-to-right pass that hides and returns."""
    out = []
    travel = c.speed * (c.n_frames - 1)
    for w in c.occluder_px:
        for occ in range(1, c.width - w):
            for x0 in range(0, occ - SPRITE + 1):
                xs = x0 + c.speed * np.arange(c.n_frames)
                hidden = (xs >= occ) & (xs + SPRITE <= occ + w)
                if x0 + travel + SPRITE <= c.width and x0 + travel >= occ + w and hidden.any():
                    out.append((occ, w, x0))
    return out


class MemoryTask(Task):
    name = "memory"
    prompt = "the object moves behind the wall and comes back"
    Config = MemoryConfig
    palette = PALETTE

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._trajectories = trajectories(self.config)

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        # hidden_position: 3x3 grid cell (row-major) of the object's centre in the middle fully hidden frame
        return {"identity": N_IDENTITIES, "exit_side": 4, "hidden_position": 9, "reappear_frame": self.config.n_frames}

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config
        draws = rng.random(6)
        occ, w, x0 = self._trajectories[int(draws[0] * len(self._trajectories))]
        lane = 1 + int(draws[1] * (c.height - SPRITE - 1))  # sprite's top row, 1 px margin
        return {
            "occ": occ,
            "occ_px": w,
            "occ_rows": [int(draws[4] * lane), lane + SPRITE + 1 + int(draws[5] * (c.height - lane - SPRITE))],
            "x0": x0,
            "lane": lane,
            "identity": int(draws[2] * N_IDENTITIES),
            "turns": int(draws[3] * 4),  # quarter turns counter-clockwise applied to the left-to-right drawing
        }

    def _xs(self, spec: dict[str, Any]) -> np.ndarray:
        return spec["x0"] + self.config.speed * np.arange(self.config.n_frames)  # (frame,) sprite's left column

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        c = self.config
        video = np.full((c.n_frames, c.height, c.width), BACKGROUND, dtype=np.uint8)
        mask, lane = SPRITE_MASKS[spec["identity"]], slice(spec["lane"], spec["lane"] + SPRITE)
        for f, x in enumerate(self._xs(spec)):
            video[f, lane, x : x + SPRITE][mask] = 2 + spec["identity"]
        top, bottom = spec["occ_rows"]
        video[:, top:bottom, spec["occ"] : spec["occ"] + spec["occ_px"]] = OCCLUDER
        return np.ascontiguousarray(np.rot90(video, spec["turns"], axes=(1, 2)))  # (frame, H, W)

    def _visible(self, spec: dict[str, Any]) -> np.ndarray:
        """Fraction of the object's pixels in view, per frame."""
        mask = SPRITE_MASKS[spec["identity"]]
        cols = self._xs(spec)[:, None] + np.arange(SPRITE)[None, :]  # (frame, sprite col)
        behind = (cols >= spec["occ"]) & (cols < spec["occ"] + spec["occ_px"])
        return 1.0 - (behind * mask.sum(axis=0)[None, :]).sum(axis=1) / mask.sum()

    def _centres(self, spec: dict[str, Any]) -> np.ndarray:
        """Object centre (row, col) per frame in the rotated (shown) frame."""
        n = self.config.width
        centre = np.stack([np.full(self.config.n_frames, spec["lane"] + 1.5), self._xs(spec) + 1.5], 1)
        for _ in range(spec["turns"]):  # np.rot90 counter-clockwise: (row, col) -> (n-1-col, row)
            centre = np.stack([n - 1 - centre[:, 1], centre[:, 0]], 1)
        return centre  # (frame, 2)

    def _phases(self, spec: dict[str, Any]) -> tuple[list[int], list[int]]:
        visible = self._visible(spec)
        hidden = np.flatnonzero(visible == 0).tolist()
        back = [f for f in range(hidden[-1] + 1, len(visible)) if visible[f] == 1] if hidden else []
        return hidden, back

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        hidden, back = self._phases(spec)
        row, col = self._centres(spec)[hidden[len(hidden) // 2]]
        return {
            "identity": spec["identity"],
            "exit_side": (1 - spec["turns"]) % 4,  # up/right/down/left as in common.MOVES
            "hidden_position": int(row * 3 // self.config.height) * 3 + int(col * 3 // self.config.width),
            "reappear_frame": back[0],
        }

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        hidden, back = self._phases(spec)
        return {
            "identity": spec["identity"],
            "direction": (1 - spec["turns"]) % 4,
            "centres": self._centres(spec).tolist(),  # (frame, [row, col])
            "visible": self._visible(spec).tolist(),
            "hidden_frames": hidden,
            "reappear_frames": back,
            "occluder": {"cols": [spec["occ"], spec["occ"] + spec["occ_px"]], "rows": spec["occ_rows"],
                         "turns": spec["turns"]},  # drawn left-to-right, then turned counter-clockwise
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        hidden, back = self._phases(spec)
        assert hidden, f"object never fully hidden: {spec}"
        assert back, f"object does not come back fully visible after hiding: {spec}"
        assert self._visible(spec)[0] == 1, f"object not fully visible in frame 0: {spec}"
        score = grade(self._extract(video), self._meta(spec))
        assert score["correct"] == 1.0, f"ground truth does not read back: {score} for {spec}"

    # -- reading answers ----------------------------------------------------------------------------------------
    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        classes = nearest(frames, PALETTE, MAX_COLOUR_DIST)  # (frame, H, W)
        per_frame = []
        for frame_classes in classes:
            counts = [(frame_classes == 2 + k).sum() for k in range(N_IDENTITIES)]
            k = int(np.argmax(counts))
            if counts[k] < MIN_PIXELS:
                per_frame.append({"identity": None, "centre": None, "n_px": 0})
                continue
            rows, cols = np.nonzero(frame_classes == 2 + k)
            centre = [float(rows.mean()), float(cols.mean())]
            per_frame.append({"identity": k, "centre": centre, "n_px": int(counts[k])})
        return {"frames": per_frame, "identity": per_frame[-1]["identity"], "centre": per_frame[-1]["centre"]}

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        return grade(answer, inst.meta)


def grade(answer: dict[str, Any], truth: dict[str, Any]) -> dict[str, float]:
    """Right identity within POSITION_TOLERANCE px of the true centre in every reappearance frame."""
    read = answer.get("frames", [])
    ok, same_identity, errors = [], [], []
    for f in truth["reappear_frames"]:
        seen = read[f] if f < len(read) else {"identity": None, "centre": None}
        same = seen["identity"] == truth["identity"]
        error = np.abs(np.subtract(seen["centre"], truth["centres"][f])).max() if seen["centre"] else np.inf
        ok.append(same and error <= POSITION_TOLERANCE)
        same_identity.append(same)
        errors.append(error)
    hidden_ok = [f < len(read) and read[f]["identity"] is None for f in truth["hidden_frames"]]
    finite = [e for e in errors if np.isfinite(e)]
    return {
        "correct": float(all(ok)),
        "score": float(np.mean(ok)),
        "identity_ok": float(np.mean(same_identity)),
        "position_err": float(np.mean(finite)) if finite else float("nan"),
        "hidden_ok": float(np.mean(hidden_ok)),
    }

