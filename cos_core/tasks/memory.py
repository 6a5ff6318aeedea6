"""Working-memory task (object permanence): an object slides behind an occluder and must come back unchanged.

Owns the trajectory sampler, the drawing and the extractor that finds the object's identity and centre in each
frame. The object (one of 4 colour+shape identities) moves at constant speed toward an occluder block spanning its
lane with random margins, is fully hidden for one or more middle frames and reappears on the far side with the
same identity, where constant motion puts it. Motion is drawn left-to-right, then rotated: 4 directions.
`recall` is the same scene with the object *entering* after frame 0 through a grey gate at the canvas edge (which
fixes its lane, side and so every position): its identity is absent from the first frame (the noise picks it), so
what must come back after the occluder is content the model generated itself.
Must not import torch, diffusers or other task modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
    ENTER: ClassVar[bool] = False  # the object enters after frame 0 (recall) instead of starting in view
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
        if not trajectories(self, self.ENTER):
            start = "enter after frame 0, be seen fully" if self.ENTER else "start fully visible"
            raise ValueError(
                f"no trajectory fits speed={self.speed}, occluder_px={self.occluder_px}, n_frames={self.n_frames}, "
                f"width={self.width}: the object must {start}, hide fully, and be fully visible again"
            )


@dataclass(frozen=True)
class RecallConfig(MemoryConfig):
    ENTER: ClassVar[bool] = True
    speed: int = 3
    occluder_px: tuple[int, ...] = (6,)


def trajectories(c: MemoryConfig, enter: bool = False) -> list[tuple[int, int, int]]:
    """Every (occluder column, occluder width, first object column) of a left-to-right pass that hides and returns.

    `enter=False`: the object is fully visible in frame 0. `enter=True`: it is just outside the canvas in frame 0
    (first column -SPRITE, so it shows from frame 1) and fully visible in at least one frame before it hides."""
    out = []
    travel = c.speed * (c.n_frames - 1)
    starts = [-SPRITE] if enter else None  # entering: frame 1 shows it, so frame 0's gate fixes every position
    for w in c.occluder_px:
        for occ in range(1, c.width - w):
            for x0 in starts if enter else range(0, occ - SPRITE + 1):
                xs = x0 + c.speed * np.arange(c.n_frames)
                hidden = (xs >= occ) & (xs + SPRITE <= occ + w)
                seen_before = (xs >= 0) & (xs + SPRITE <= occ) & (np.arange(c.n_frames) < (np.argmax(hidden)))
                if x0 + travel + SPRITE <= c.width and x0 + travel >= occ + w and hidden.any() and \
                        (not enter or seen_before.any()):
                    out.append((occ, w, x0))
    return out


class MemoryTask(Task):
    name = "memory"
    prompt = "the object moves behind the wall and comes back"
    Config = MemoryConfig
    palette = PALETTE
    answer_field = "identity"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._trajectories = trajectories(self.config, self.config.ENTER)

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
        mask, rows = SPRITE_MASKS[spec["identity"]], spec["lane"] + np.arange(SPRITE)
        if c.ENTER:  # the gate the object will come through: fixes its lane and side, not its identity
            video[:, rows, 0] = OCCLUDER
        for f, x in enumerate(self._xs(spec)):
            cols = x + np.arange(SPRITE)
            keep = (cols >= 0) & (cols < c.width)  # an entering object is cut by the canvas edge
            block = np.ix_(rows, cols[keep])
            video[f][block] = np.where(mask[:, keep], 2 + spec["identity"], video[f][block])
        top, bottom = spec["occ_rows"]
        video[:, top:bottom, spec["occ"] : spec["occ"] + spec["occ_px"]] = OCCLUDER
        return np.ascontiguousarray(np.rot90(video, spec["turns"], axes=(1, 2)))  # (frame, H, W)

    def _visible(self, spec: dict[str, Any]) -> np.ndarray:
        """Fraction of the object's pixels in view (on the canvas and not behind the occluder), per frame."""
        mask = SPRITE_MASKS[spec["identity"]]
        cols = self._xs(spec)[:, None] + np.arange(SPRITE)[None, :]  # (frame, sprite col)
        unseen = (cols >= spec["occ"]) & (cols < spec["occ"] + spec["occ_px"]) | (cols < 0) | (cols >= self.config.width)
        return 1.0 - (unseen * mask.sum(axis=0)[None, :]).sum(axis=1) / mask.sum()

    def _behind(self, spec: dict[str, Any]) -> np.ndarray:
        """Whether the object is wholly behind the occluder, per frame."""
        xs = self._xs(spec)
        return (xs >= spec["occ"]) & (xs + SPRITE <= spec["occ"] + spec["occ_px"])

    def _centres(self, spec: dict[str, Any]) -> np.ndarray:
        """Object centre (row, col) per frame in the rotated (shown) frame."""
        n = self.config.width
        centre = np.stack([np.full(self.config.n_frames, spec["lane"] + 1.5), self._xs(spec) + 1.5], 1)
        for _ in range(spec["turns"]):  # np.rot90 counter-clockwise: (row, col) -> (n-1-col, row)
            centre = np.stack([n - 1 - centre[:, 1], centre[:, 0]], 1)
        return centre  # (frame, 2)

    def _phases(self, spec: dict[str, Any]) -> tuple[list[int], list[int]]:
        visible = self._visible(spec)
        hidden = np.flatnonzero(self._behind(spec)).tolist()
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
        if self.config.ENTER:
            assert self._visible(spec)[0] == 0 and self._meta(spec)["seen_frames"], f"object not entering: {spec}"
        else:
            assert self._visible(spec)[0] == 1, f"object not fully visible in frame 0: {spec}"
        score = self._score_meta(self._extract(video), self._meta(spec))
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
        return self._score_meta(answer, inst.meta)

    def _score_meta(self, answer: dict[str, Any], meta: dict[str, Any]) -> dict[str, float]:
        return grade(answer, meta)


class RecallTask(MemoryTask):
    """Working memory of generated content: the object enters after frame 0 with an identity the first frame does
    not show (the noise picks it; every identity is right), hides behind the occluder and must come back as the
    identity the video itself showed before it hid, where constant motion puts it."""

    name = "recall"
    prompt = "an object enters, hides behind the wall and comes back"
    Config = RecallConfig
    answer_is_unique = False
    answer_field = "identity_first"

    def _meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        hidden, _ = self._phases(spec)
        seen = [f for f in range(hidden[0]) if self._visible(spec)[f] == 1]
        return super()._meta(spec) | {"seen_frames": seen, "identity_free": True}

    def _extract(self, frames: np.ndarray) -> dict[str, Any]:
        answer = super()._extract(frames)
        first = next((seen["identity"] for seen in answer["frames"] if seen["identity"] is not None), None)
        return answer | {"identity_first": first}

    def _score_meta(self, answer: dict[str, Any], meta: dict[str, Any]) -> dict[str, float]:
        """Right when the identity seen before hiding comes back, and the object is where constant motion puts it
        in every frame where it is fully in view; `consistent` ignores positions. The drawn identity of the
        instance does not matter: the first frame does not show it."""
        read = answer.get("frames", [])
        before = [read[f]["identity"] if f < len(read) else None for f in meta["seen_frames"]]
        identity = before[0] if before and before[0] is not None and len(set(before)) == 1 else None
        graded = grade(answer, dict(meta, identity=identity))
        in_view = grade(answer, dict(meta, identity=identity, reappear_frames=meta["seen_frames"]))
        return graded | {
            "correct": float(identity is not None and graded["correct"] == 1.0 and in_view["correct"] == 1.0),
            "consistent": float(identity is not None and graded["identity_ok"] == 1.0),
            "identity": float(-1 if identity is None else identity),
        }

    def outcome_labels(self, answer: dict[str, Any]) -> dict[str, int | None]:
        """`identity`: the identity the video gave the object when it first showed it (chosen by the noise)."""
        return {"identity": answer.get("identity_first")}


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

