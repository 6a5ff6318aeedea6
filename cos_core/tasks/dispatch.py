"""Dispatch task (perception before action): an object appears with a colour the first frame does not show and
must move to the exit of that colour.

Owns the sampler, the drawing and the extractor. Frame 0 shows four exits (coloured bars at the middle of each
side, a random permutation of four colours) and an empty grey pad in the centre. From frame 1 an object of one of
the four colours stands on the pad (which colour: the noise picks, every one is right) and then slides to the exit
of its own colour. What the object is (the scene) must be settled before the motion (the action) can be drawn
right, so the step at which each settles in x0_hat can be compared. Must not import torch, diffusers or other
task modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import STEPS, Instance, Task, check_frame_size, check_int, nearest

BACKGROUND, PAD = 0, 1
PALETTE = np.array(
    [[-1, -1, -1], [0.3, 0.3, 0.3], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=np.float32
)  # background, pad, then colours: red, green, blue, yellow (as memory's identities)
N_COLOURS = 4
OBJECT = 4  # object side (px)
BAR_LEN, BAR_WIDTH = 6, 2  # exit bars
MAX_COLOUR_DIST = 0.8
MIN_PIXELS = 8  # fewer object-coloured pixels than this in a frame: no object there
POSITION_TOLERANCE = 1.0  # pixels (L-inf) between the read and the true centre


@dataclass(frozen=True)
class DispatchConfig:
    speed: int = 2  # pixels per frame once the object moves
    travel: int = 8  # pixels from the pad to where it stops, in front of its exit
    n_frames: int = 8
    height: int = 24
    width: int = 24

    def __post_init__(self) -> None:
        check_frame_size(self.height, self.width, self.n_frames)
        if self.height != self.width:
            raise ValueError(f"height={self.height} != width={self.width}: dispatch needs a square canvas")
        check_int("n_frames", self.n_frames, 3, 1024)
        check_int("speed", self.speed, 1, self.width)
        room = (self.width - OBJECT) // 2 - BAR_WIDTH
        check_int("travel", self.travel, self.speed, room)


class DispatchTask(Task):
    name = "dispatch"
    prompt = "the object goes to the exit of its colour"
    Config = DispatchConfig
    palette = PALETTE
    answer_field = "direction"
    answer_is_unique = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        c = self.config
        self.pad = ((c.height - OBJECT) // 2, (c.width - OBJECT) // 2)  # top-left of the pad
        mid = (c.width - BAR_LEN) // 2
        self.bars = (  # per exit side (common.MOVES order): (rows, cols) of its bar
            (slice(0, BAR_WIDTH), slice(mid, mid + BAR_LEN)),
            (slice(mid, mid + BAR_LEN), slice(c.width - BAR_WIDTH, c.width)),
            (slice(c.height - BAR_WIDTH, c.height), slice(mid, mid + BAR_LEN)),
            (slice(mid, mid + BAR_LEN), slice(0, BAR_WIDTH)),
        )
        self.offsets = np.r_[0, np.minimum(c.speed * np.arange(c.n_frames - 1), c.travel)]  # (frame,) px moved

    # -- generation ---------------------------------------------------------------------------------------------
    def _label_classes(self) -> dict[str, int]:
        exits = {f"exit_{side}_colour": N_COLOURS for side in ("up", "right", "down", "left")}
        return {"colour": N_COLOURS, "direction": 4} | exits

    def _sample(self, rng: np.random.Generator) -> dict[str, Any]:
        exits = rng.permutation(N_COLOURS).tolist()  # exits[side] = colour of that side's exit
        colour = int(rng.integers(N_COLOURS))  # independent of the first frame: the noise's pick for the model
        return {"exits": exits, "colour": colour, "direction": exits.index(colour)}

    def centres(self, direction: int) -> np.ndarray:
        """Object centre (row, col) per frame for a move toward exit `direction`; NaN in frame 0 (no object)."""
        dr, dc = STEPS[direction]
        centre = np.array(self.pad, dtype=np.float64) + (OBJECT - 1) / 2
        out = centre[None] + self.offsets[:, None] * np.array([dr, dc])[None]  # (frame, 2)
        out[0] = np.nan
        return out

    def _draw(self, spec: dict[str, Any]) -> np.ndarray:
        c = self.config
        video = np.full((c.n_frames, c.height, c.width), BACKGROUND, dtype=np.uint8)
        for side, colour in enumerate(spec["exits"]):
            video[(slice(None), *self.bars[side])] = 2 + colour
        py, px = self.pad
        video[:, py:py + OBJECT, px:px + OBJECT] = PAD
        for f, (row, col) in enumerate(self.centres(spec["direction"])[1:], start=1):
            top, left = int(row - (OBJECT - 1) / 2), int(col - (OBJECT - 1) / 2)
            video[f, top:top + OBJECT, left:left + OBJECT] = 2 + spec["colour"]
        return video

    def _labels(self, spec: dict[str, Any]) -> dict[str, int]:
        sides = ("up", "right", "down", "left")
        return {"colour": spec["colour"], "direction": spec["direction"]} | {
            f"exit_{side}_colour": spec["exits"][k] for k, side in enumerate(sides)}

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "exits": spec["exits"],  # colour of the exit on each side (up, right, down, left)
            "colour": spec["colour"],  # the ground-truth video's pick; any colour is right
            "direction": spec["direction"],
            "pad": list(self.pad),
            "offsets": self.offsets.tolist(),
            "colour_free": True,
        }

    def _check(self, spec: dict[str, Any], video: np.ndarray) -> None:
        assert sorted(spec["exits"]) == list(range(N_COLOURS)), f"exits {spec['exits']} are not a permutation"
        assert spec["exits"][spec["direction"]] == spec["colour"], "the object does not head to its colour's exit"
        answer = self._extract(video)
        assert answer["exits"] == spec["exits"], f"exits read as {answer['exits']}, not {spec['exits']}"
        score = self._score(answer, Instance(self.name, 0, video, self.prompt, self.task_id, {}, self._meta(spec)))
        assert score["correct"] == 1.0, f"ground truth does not read back: {score} for {spec}"

    # -- reading answers ----------------------------------------------------------------------------------------
    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        """Exit colours from frame 0; per later frame the object's colour and centre (outside the exit bars);
        `colour` = frame 1's, `direction` = the side it moved toward between frame 1 and the last frame."""
        classes = nearest(frames, PALETTE, MAX_COLOUR_DIST)  # (frame, H, W)
        exits = []
        for rows, cols in self.bars:
            values, counts = np.unique(classes[0, rows, cols], return_counts=True)
            top = values[counts.argmax()]
            exits.append(int(top) - 2 if top >= 2 and counts.max() > BAR_LEN * BAR_WIDTH // 2 else None)
        inside = np.ones(classes.shape[1:], dtype=bool)
        for rows, cols in self.bars:
            inside[rows, cols] = False
        per_frame = []
        for frame_classes in classes[1:]:
            counts = [((frame_classes == 2 + k) & inside).sum() for k in range(N_COLOURS)]
            k = int(np.argmax(counts))
            if counts[k] < MIN_PIXELS:
                per_frame.append({"colour": None, "centre": None})
                continue
            rows, cols = np.nonzero((frame_classes == 2 + k) & inside)
            per_frame.append({"colour": k, "centre": [float(rows.mean()), float(cols.mean())]})
        first, last = per_frame[0]["centre"], per_frame[-1]["centre"]
        direction = None
        if first is not None and last is not None:
            moved = np.subtract(last, first)
            if np.abs(moved).max() >= self.config.travel / 2:
                step = (int(np.sign(moved[0])), 0) if abs(moved[0]) > abs(moved[1]) else (0, int(np.sign(moved[1])))
                direction = STEPS.index(step)
        return {"exits": exits, "frames": per_frame, "colour": per_frame[0]["colour"], "direction": direction}

    def _score(self, answer: dict[str, Any], inst: Instance) -> dict[str, float]:
        """Right when one colour holds in every object frame and the object follows the path to the exit of that
        colour (centre within POSITION_TOLERANCE px in every frame). `action_ok`: it heads to its colour's exit;
        `colour_consistent`: its colour never changes."""
        read = answer.get("frames", [])
        colours = [seen.get("colour") for seen in read]
        colour = colours[0] if colours and colours[0] is not None and len(set(colours)) == 1 else None
        exits = inst.meta["exits"]
        target = exits.index(colour) if colour is not None else None
        on_path = []
        if target is not None:
            truth = self.centres(target)[1:]
            on_path = [seen.get("centre") is not None and
                       np.abs(np.subtract(seen["centre"], truth[f])).max() <= POSITION_TOLERANCE
                       for f, seen in enumerate(read)]
        action_ok = target is not None and answer.get("direction") == target
        return {
            "correct": float(target is not None and len(on_path) == len(read) > 0 and all(on_path)),
            "score": float(np.mean(on_path)) if on_path else 0.0,
            "action_ok": float(action_ok),
            "colour_consistent": float(colour is not None),
            "colour": float(-1 if colour is None else colour),
        }

    def outcome_labels(self, answer: dict[str, Any]) -> dict[str, int | None]:
        """`colour`: the object's colour in frame 1 (the noise's pick); `direction`: the exit side it moved to."""
        return {"colour": answer.get("colour"), "direction": answer.get("direction")}
