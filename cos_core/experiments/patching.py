"""Activation patching between two runs at (step, layer, token region), with the nulls that make it a measurement.

Owns `PatchConfig`, the choice of donors (seed → seed: another noise seed of the same instance; instance → instance:
another instance, where the answer means the same across instances), the jobs (the patch from a donor with another
answer, and the nulls: a self-patch, a random update of the same per-token norm, a patch from a donor with the
same answer), `run_patching` and the `patching_samples` table; the summary is `analysis.effects.patching_table`.
Imports torch through `batch`; never streamlit.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..analysis.commitment import regime
from ..analysis.effects import ALPHA, TRANSFER_LABELS, patching_table
from ..analysis.stats import N_BOOT
from .batch import Job
from .interventions import Progress, config_record, run_sweep
from .replay import Replay

log = logging.getLogger(__name__)

PAIRS = ("seed", "instance")
NULLS = ("self", "random", "same_answer")
CARRIES = ("update", "output")


@dataclass(frozen=True)
class PatchConfig:
    """pairs: "seed" (donor = another seed of the recipient's instance) or "instance" (another instance);
    layers None = all; steps: the steps patched; frames: latent frames whose tokens are patched (empty: all tokens);
    nulls: which of `NULLS` to run beside every patch; carry: "update" adds the donor's residual update
    (output − input) in place of the recipient's, "output" copies its whole output; alpha: level after Holm."""

    pairs: str = "seed"
    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] = (0,)
    frames: tuple[int, ...] = ()
    nulls: tuple[str, ...] = NULLS
    carry: str = "update"
    seed_base: int = 0
    batch_size: int = 32
    workers: int = 0
    n_boot: int = N_BOOT
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs={self.pairs!r} is not allowed; allowed: {', '.join(PAIRS)}")
        if self.carry not in CARRIES:
            raise ValueError(f"carry={self.carry!r} is not allowed; allowed: {', '.join(CARRIES)}")
        bad = [n for n in self.nulls if n not in NULLS]
        if bad:
            raise ValueError(f"nulls {bad} not allowed; allowed: {', '.join(NULLS)}")
        if not self.steps or any(int(s) < 0 for s in self.steps) or any(int(f) < 0 for f in self.frames):
            raise ValueError(f"steps {list(self.steps)} must be non-empty and, like frames {list(self.frames)}, >= 0")
        if self.batch_size < 2 or self.n_boot < 1 or self.workers < 0 or not 0 < self.alpha < 1:
            raise ValueError(f"batch_size {self.batch_size} >= 2, n_boot {self.n_boot} >= 1, workers "
                             f"{self.workers} >= 0 and alpha {self.alpha} in (0, 1) are required")

    def resolve(self, n_steps: int, n_frames: int, n_layers: int) -> "PatchConfig":
        layers = tuple(range(n_layers)) if self.layers is None else tuple(sorted(set(self.layers)))
        for name, values, size in (("layers", layers, n_layers), ("steps", self.steps, n_steps),
                                   ("frames", self.frames, n_frames)):
            bad = [v for v in values if not 0 <= int(v) < size]
            if bad:
                raise ValueError(f"{name} {bad} out of range; this run has {size} ({name.rstrip('s')} 0..{size - 1})")
        return dataclasses.replace(self, layers=layers, steps=tuple(sorted(set(self.steps))),
                                   frames=tuple(sorted(set(self.frames))))


def answers(task: Any, scores: Sequence[dict[str, Any]], pairs: str) -> list[str | None]:
    """The answer compared between recipient and donor: the answer key (seed pairs: same instance), or for instance
    pairs the transferring outcome label as text (None for every sample when the task's answer does not transfer)."""
    if pairs == "seed":
        return [s["answer_key"] for s in scores]
    label = TRANSFER_LABELS.get(task.name)
    if label is None:
        return [None] * len(scores)
    return [None if s.get(f"outcome_{label}") is None else str(s[f"outcome_{label}"]) for s in scores]


def donors(items: Sequence[Any], answer: Sequence[str | None], pairs: str,
           index: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Per recipient: (the donor with another readable answer, the donor with the same answer), -1 where none.

    Candidates are scanned cyclically from the recipient (seed pairs: the other seeds of its instance; instance
    pairs: the samples of other instances, same seed first). Without comparable answers (instance pairs on a task
    whose answer does not transfer) the first candidate donates and no same-answer donor exists. `index`: each item's
    seed index (`--seeds` value; default its noise seed, right for shared noise)."""
    n = len(items)
    index = [it.seed for it in items] if index is None else list(index)
    other, same = [-1] * n, [-1] * n
    for r in range(n):
        order = [(r + k) % n for k in range(1, n)]
        if pairs == "seed":
            cands = [d for d in order if items[d].instance == items[r].instance]
        else:
            cands = [d for d in order if items[d].instance != items[r].instance]
            cands.sort(key=lambda d: index[d] != index[r])  # stable: same seed first, cyclic order kept
        if all(a is None for a in answer):
            other[r] = cands[0] if cands else -1
            continue
        if answer[r] is None:
            continue
        other[r] = next((d for d in cands if answer[d] is not None and answer[d] != answer[r]), -1)
        same[r] = next((d for d in cands if answer[d] == answer[r]), -1)
    return other, same


def patch_jobs(cfg: PatchConfig, other: list[int], same: list[int]) -> list[Job]:
    """The patch and its nulls for every recipient with a donor, layer and step (tag = the comparison), recipient by
    recipient, so that a call's few donor rows serve all of a recipient's layers and steps."""
    jobs = []
    for r, d in enumerate(other):
        if d < 0:
            continue
        for step in cfg.steps:
            for layer in cfg.layers:
                base = dict(sample=r, kind="patch", position=layer, step=step, frames=cfg.frames)
                jobs.append(Job(**base, partner=d, carry=cfg.carry, tag="patch"))
                if "random" in cfg.nulls:
                    jobs.append(Job(**base, partner=d, carry="random", tag="random"))
                if "self" in cfg.nulls:
                    jobs.append(Job(**base, partner=r, carry=cfg.carry, tag="self"))
                if "same_answer" in cfg.nulls and same[r] >= 0:
                    jobs.append(Job(**base, partner=same[r], carry=cfg.carry, tag="same_answer"))
    return jobs


def run_patching(replay: Replay, config: PatchConfig = PatchConfig(), *,
                 progress: Progress = lambda it: it) -> dict[str, pd.DataFrame]:
    """Clean runs first (their answers pick the donors), then every patch and null; returns {"patching",
    "patching_samples"} with the resolved config in `attrs["cos_config"]`. Nothing is written here."""
    n_frames = int(replay.pipe.config.video_shape[1])
    cfg = config.resolve(replay.n_steps, n_frames, len(replay.pipe.transformer.blocks))
    n = len(replay.items)
    clean = run_sweep(replay, [Job(i) for i in range(n)], batch_size=cfg.batch_size, seed_base=cfg.seed_base,
                      means=False, workers=cfg.workers)
    scores = [clean.scores[r] for r in range(n)]
    answer = answers(replay.task, scores, cfg.pairs)
    other, same = donors(replay.items, answer, cfg.pairs, replay.seed_indexes())
    jobs = patch_jobs(cfg, other, same)
    if not jobs:
        raise ValueError(f"{replay.archive.run_id}: no recipient has a donor with another answer for {cfg.pairs} "
                         f"pairs ({sum(a is not None for a in answer)} of {n} clean answers readable); use more "
                         "seeds per instance (--seeds) or instances, or pairs with a task whose answers differ")
    log.info("%s: %d patch jobs for %d recipients", replay.archive.run_id, len(jobs), sum(d >= 0 for d in other))
    sweep = run_sweep(replay, jobs, batch_size=cfg.batch_size, seed_base=cfg.seed_base, means=False,
                      workers=cfg.workers, progress=progress)
    rows = [(job, score) for job, score in zip(sweep.jobs, sweep.scores) if job.kind == "patch"]
    table = samples_table(replay, cfg, rows, answer, other, scores)
    summary = patching_table(table, n_boot=cfg.n_boot, alpha=cfg.alpha).assign(
        pairs=cfg.pairs, carry=cfg.carry, frames=",".join(map(str, cfg.frames)) or "all", regime=regime(replay.task),
        task=replay.task.name)
    tables = {"patching": summary, "patching_samples": table}
    for name, t in tables.items():
        t.attrs["cos_config"] = config_record(cfg, replay, table=name)
    return tables


def samples_table(replay: Replay, cfg: PatchConfig, rows: list[tuple[Job, dict]], answer: list[str | None],
                  other: list[int], clean: list[dict]) -> pd.DataFrame:
    """One row per patched run: recipient, donor, tag, layer, step, both clean answers, the patched answer,
    `flipped` (differs from the recipient's clean answer; unreadable counts as an answer) and `adopted` (equals the
    other-answer donor's clean answer; NaN where answers do not compare)."""
    comparable = any(a is not None for a in answer)
    out = []
    for job, score in rows:
        r = job.sample
        now = answers(replay.task, [score], cfg.pairs)[0] if comparable else None
        target = answer[other[r]] if other[r] >= 0 else None
        own = clean[r]["answer_key"]
        item = replay.items[r]
        out.append({"sample": r, "instance": item.instance, "seed": item.seed, "donor": job.partner,
                    "tag": job.tag, "layer": job.position, "step": job.step, "answer_key": score["answer_key"],
                    "clean_key": own, "answer": now, "clean_answer": answer[r], "donor_answer": target,
                    "correct": score["correct"], "clean_correct": clean[r]["correct"],
                    "flipped": (score["answer_key"] or "∅") != (own or "∅"),
                    "adopted": (float(now is not None and now == target) if comparable and target is not None
                                else np.nan)})
    return pd.DataFrame(out)
