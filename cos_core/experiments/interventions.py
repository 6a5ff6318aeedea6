"""Interventions on a replayed organism run (paper Fig. 3 and 6): noise at one step vs at one frame, off and on the
data distribution, at several strengths; the commitment curve; the propagation of a perturbation; the layer swap.

Owns `InterventionConfig`, the job list of a sweep, `run_interventions` (every job through `batch.run_batch` in
packed calls, scores collected from `scoring.Scorer` while the device runs the next call) and the
`interventions` / `interventions_samples` tables. The commitment and propagation tables are built by
`analysis.commitment` and `analysis.propagation`. Imports torch; never streamlit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from ..analysis.commitment import commitment_table, regime
from ..analysis.effects import TRANSFER_LABELS
from ..analysis.propagation import MIN_SAMPLES, propagation_tables
from ..analysis.stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci
from ..capture.run import WorkItem
from .batch import Job, plan_batches, run_batch
from .noise import RENOISE, REPLACE
from .replay import Replay, held_out_instances
from .scoring import Scorer

log = logging.getLogger(__name__)

KINDS = ("noise_step", "noise_frame", "renoise_step", "renoise_frame", "propagation", "layer_swap")
SWAP_MODES = ("update", "output")  # what a layer swap carries over: the block's residual update, or its whole output
SCORED = ("noise_step", "noise_frame", "renoise_step", "renoise_frame", "layer_swap")  # kinds in `interventions`
Progress = Callable[[Iterable], Iterable]


@dataclass(frozen=True)
class InterventionConfig:
    """What `run_interventions` measures. `steps`/`frames`/`layers` None = every one the run has.

    steps: positions of the step kinds and the propagation inject steps; frames: positions of the frame kinds;
    strengths: λ of every noise kind (noise_*: x <- (1-λ)·x + λ·ε; renoise_*: the fraction of the noise variance
    redrawn around x̂0 at the step's σ; renoise_step at λ = 1 is the commitment curve's probe); layers: blocks
    swapped; swap_steps: steps whose block update (or output, `swap`) is swapped from the next instance's run;
    propagation_strength: λ of the renoise perturbation whose propagation is measured; seed_base seeds every ε;
    batch_size: rows per pipeline call; workers: scoring processes (0 = inline); n_boot: bootstrap replicates.
    """

    which: tuple[str, ...] = KINDS
    steps: tuple[int, ...] | None = None
    frames: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (1.0,)
    swap_steps: tuple[int, ...] = (0,)
    swap: str = "update"
    propagation_strength: float = 0.5
    seed_base: int = 0
    batch_size: int = 32
    workers: int = 0
    n_boot: int = N_BOOT

    def __post_init__(self) -> None:
        bad = [k for k in self.which if k not in KINDS]
        if bad or not self.which:
            raise ValueError(f"which={list(self.which)}: name one or more of {list(KINDS)}")
        if self.swap not in SWAP_MODES:
            raise ValueError(f"swap={self.swap!r} is not allowed; allowed: {', '.join(SWAP_MODES)}")
        for value in (*self.strengths, self.propagation_strength):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"strength {value} must lie in [0, 1] (0 = no noise, 1 = all of it)")
        if not self.strengths:
            raise ValueError("strengths must name at least one λ in [0, 1]")
        if self.batch_size < 2 or self.n_boot < 1 or self.workers < 0:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2, n_boot={self.n_boot} >= 1 and "
                             f"workers={self.workers} >= 0")
        for name in ("steps", "frames", "layers", "swap_steps"):
            values = getattr(self, name)
            if values is not None and (not values or any(int(v) < 0 for v in values)):
                raise ValueError(f"{name}={list(values)} must be non-empty non-negative indices (or None = all)")

    def resolve(self, n_steps: int, n_frames: int, n_layers: int) -> "InterventionConfig":
        """The same config with None filled in; ValueError for a position the run does not have."""
        sizes = {"steps": n_steps, "frames": n_frames, "layers": n_layers, "swap_steps": n_steps}
        out: dict[str, Any] = {"strengths": tuple(sorted({float(v) for v in self.strengths}))}
        for name, size in sizes.items():
            values = getattr(self, name)
            values = tuple(range(size)) if values is None else tuple(sorted({int(v) for v in values}))
            bad = [v for v in values if v >= size]
            if bad:
                raise ValueError(f"{name} {bad} out of range; this run has {size} ({name.rstrip('s')} 0..{size - 1})")
            out[name] = values
        return dataclasses.replace(self, **out)


def partners(items: Sequence[WorkItem], index: Sequence[int] | None = None) -> list[int]:
    """Sample i's layer-swap partner: the next instance's sample (cyclically) with the same seed index (`index`, the
    `--seeds` value per item; default the items' noise seeds, right for shared noise), else its first."""
    index = [it.seed for it in items] if index is None else list(index)
    order = list(dict.fromkeys(it.instance for it in items))
    if len(order) < 2:
        raise ValueError(f"layer swap needs >= 2 task instances; this run has {len(order)}")
    by_key = {(it.instance, k): i for i, (it, k) in enumerate(zip(items, index))}
    first = {inst: next(i for i, it in enumerate(items) if it.instance == inst) for inst in order}
    out = []
    for it, k in zip(items, index):
        nxt = order[(order.index(it.instance) + 1) % len(order)]
        out.append(by_key.get((nxt, k), first[nxt]))
    return out


def with_instances(replay: Replay, first: int, n: int) -> Replay:
    """The replay on held-out task instances TEST_SEEDS[first:first + n], each with the archive's seeds (`--seeds`
    values; under per-instance noise each held-out instance draws its own noise for them, as a capture would)."""
    from ..capture.sources import instance_noise_seed

    seeds = list(dict.fromkeys(replay.seed_indexes()))
    shared = replay.noise_mode == "shared"
    task = replay.task.name
    items = [WorkItem(sample_id=f"{task}-{inst}-s{s}", seed=s if shared else instance_noise_seed(inst, s), task=task,
                      instance=str(inst)) for inst in held_out_instances(first, n) for s in seeds]
    return dataclasses.replace(replay, items=items, instances={})


def sweep_jobs(cfg: InterventionConfig, n: int, partner: list[int] | None) -> list[Job]:
    """Every job of a resolved config: clean runs first, then kind by kind, position by position, sample-minor."""
    jobs = [Job(i) for i in range(n)]
    for kind in ("noise_step", "renoise_step"):
        if kind in cfg.which:
            jobs += [Job(i, kind, s, lam) for lam in cfg.strengths for s in cfg.steps for i in range(n)]
    for kind in ("noise_frame", "renoise_frame"):
        if kind in cfg.which:
            jobs += [Job(i, kind, f, lam) for lam in cfg.strengths for f in cfg.frames for i in range(n)]
    if "propagation" in cfg.which:  # sample-major: a sample's perturbed runs share a call with its clean twin
        jobs += [Job(i, "propagation", s, cfg.propagation_strength) for i in range(n) for s in cfg.steps]
    if "layer_swap" in cfg.which:
        jobs += [Job(i, "layer_swap", layer, 0.0, st, partner[i], carry=cfg.swap)  # sample-major: one donor row
                 for i in range(n) for st in cfg.swap_steps for layer in cfg.layers]  # serves all its swaps
    return jobs


@dataclass
class SweepResult:
    """Every planned row of a sweep: its job, scores and, for propagation rows, distances to the clean twin that ran
    in the same call (the final video's RMS change; block outputs per step and layer)."""

    jobs: list[Job]
    scores: list[dict[str, Any]]
    final_dist: dict[int, float]  # row -> RMS of (final − the clean twin's final)
    token_dist: dict[int, np.ndarray]  # row -> (step, layer)
    frame_dist: dict[int, np.ndarray]
    means: dict[int, np.ndarray]  # row -> (step, layer, d), clean and propagation rows, when recorded


def run_sweep(replay: Replay, jobs: Sequence[Job], *, batch_size: int, seed_base: int, means: bool,
              workers: int = 0, progress: Progress = lambda it: it) -> SweepResult:
    """Run `jobs` packed by `plan_batches`; scoring of call k overlaps the device's call k + 1 when workers > 0."""
    batches = plan_batches(jobs, batch_size)
    log.info("%s: %d jobs in %d pipeline calls of <= %d rows", replay.archive.run_id, len(jobs), len(batches),
             batch_size)
    rows: list[Job] = []
    pending = []
    out = SweepResult([], [], {}, {}, {}, {})
    with Scorer(workers) as scorer:
        for batch in progress(batches):
            record = means and any(j.kind == "propagation" for j in batch)
            res = run_batch(replay, batch, seed_base=seed_base, means=record)
            seeds = [int(replay.items[j.sample].instance) for j in batch]
            pending.append(scorer.scores(replay.task, seeds, res.finals))
            twin = {j.sample: r for r, j in enumerate(batch) if j.kind == "clean"}
            for r, job in enumerate(batch):
                row = len(rows) + r
                if job.kind == "propagation":
                    out.token_dist[row], out.frame_dist[row] = res.token_dist[r], res.frame_dist[r]
                    out.final_dist[row] = float(np.sqrt(((res.finals[r] - res.finals[twin[job.sample]]) ** 2).mean()))
                if record and job.kind in ("clean", "propagation"):
                    out.means[row] = res.means[r]
            rows += batch
        out.scores = [s for p in pending for s in p.result()]
    out.jobs = rows
    return out


def run_interventions(replay: Replay, config: InterventionConfig = InterventionConfig(), *,
                      progress: Progress = lambda it: it) -> dict[str, pd.DataFrame]:
    """Run the chosen interventions; returns the tables (nothing is written here), each with the resolved config in
    `attrs["cos_config"]`: `interventions` + `interventions_samples` (a scored kind chosen), `commitment` (renoise_step
    chosen), `propagation` + `propagation_samples` + `sensitivity` (propagation chosen)."""
    n_frames = int(replay.pipe.config.video_shape[1])
    cfg = config.resolve(replay.n_steps, n_frames, len(replay.pipe.transformer.blocks))
    n = len(replay.items)
    if "propagation" in cfg.which and n < MIN_SAMPLES:
        raise ValueError(f"propagation needs >= {MIN_SAMPLES} samples for CKA; this run has {n} "
                         "(use more --instances, or leave propagation out of --which)")
    partner = partners(replay.items, replay.seed_indexes()) if "layer_swap" in cfg.which else None
    jobs = sweep_jobs(cfg, n, partner)
    sweep = run_sweep(replay, jobs, batch_size=cfg.batch_size, seed_base=cfg.seed_base,
                      means="propagation" in cfg.which, workers=cfg.workers, progress=progress)
    first_clean = {}
    for row, job in enumerate(sweep.jobs):
        if job.kind == "clean":
            first_clean.setdefault(job.sample, row)
    assert len(first_clean) == n, f"{len(first_clean)} of {n} samples ran clean"
    tables: dict[str, pd.DataFrame] = {}
    keep = [r for r, j in enumerate(sweep.jobs) if (j.kind == "clean" and first_clean[j.sample] == r)
            or j.kind in SCORED or j.kind == "propagation"]
    samples = per_sample(replay, [sweep.jobs[r] for r in keep], [sweep.scores[r] for r in keep])
    if any(k in cfg.which for k in SCORED):
        scored = samples[samples["kind"] != "propagation"].reset_index(drop=True)
        tables["interventions_samples"] = scored
        table = summarise(scored, n_boot=cfg.n_boot)
        if not table.empty:
            table["swap"] = np.where(table["kind"] == "layer_swap", cfg.swap, None)
            table["regime"] = regime(replay.task)
        tables["interventions"] = table
    if "renoise_step" in cfg.which:
        tables["commitment"] = commitment_table(tables["interventions_samples"], replay.task, n_boot=cfg.n_boot)
    if "propagation" in cfg.which:
        tables.update(_propagation(replay, cfg, sweep, samples))
    for name, table in tables.items():
        table.attrs["cos_config"] = config_record(cfg, replay, table=name)
    return tables


def _propagation(replay: Replay, cfg: InterventionConfig, sweep: SweepResult,
                 samples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    rows = [r for r, j in enumerate(sweep.jobs) if j.kind == "propagation"]
    twin = {sweep.jobs[r].sample: r for r in sweep.means if sweep.jobs[r].kind == "clean"}  # clean rows measured
    clean_means = np.stack([sweep.means[twin[i]] for i in range(len(replay.items))])  # (sample, step, layer, d)
    perturbed = {s: np.stack([sweep.means[r] for r in rows if sweep.jobs[r].position == s]) for s in cfg.steps}
    flipped = samples[samples["kind"] == "propagation"]["flipped"].to_numpy()
    per_job = pd.DataFrame({"sample": [sweep.jobs[r].sample for r in rows],
                            "inject_step": [sweep.jobs[r].position for r in rows],
                            "instance": [replay.items[sweep.jobs[r].sample].instance for r in rows],
                            "final_distance": [sweep.final_dist[r] for r in rows], "flipped": flipped})
    return propagation_tables(clean_means, perturbed, per_job, np.stack([sweep.token_dist[r] for r in rows]),
                              np.stack([sweep.frame_dist[r] for r in rows]), strength=cfg.propagation_strength,
                              n_boot=cfg.n_boot, regime=regime(replay.task))


def per_sample(replay: Replay, jobs: Sequence[Job], scores: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per job: what ran (kind, position, step, strength, partner) and its scores, with flips marked; a
    layer swap's partner is another instance, so adoption compares the answer that transfers (`TRANSFER_LABELS`)."""
    rows = []
    for job, score in zip(jobs, scores):
        item = replay.items[job.sample]
        rows.append({"kind": job.kind, "position": job.position, "step": job.step, "strength": job.strength,
                     "sample": job.sample, "sample_id": item.sample_id, "instance": item.instance, "seed": item.seed,
                     "partner": job.partner, **score})
    label = TRANSFER_LABELS.get(replay.task.name)
    table = mark_flips(pd.DataFrame(rows), f"outcome_{label}" if label else None)
    table["distribution"] = np.select([table["kind"].isin(REPLACE), table["kind"].isin(RENOISE)], ["off", "on"],
                                      "")
    return table


def mark_flips(table: pd.DataFrame, adopt_on: str | None = "answer_key") -> pd.DataFrame:
    """Add `flipped` (the answer differs from the sample's clean answer; unreadable counts as an answer) and
    `adopted` (for rows with a partner: flipped, to a readable `adopt_on` value equal to the partner's clean one; NaN
    when `adopt_on` is None, i.e. the task's answers mean nothing across instances) to a per-sample table whose
    "clean" rows hold each sample's clean answer; noise_step / renoise_step rows get `step` = position."""
    table = table.copy()
    clean = table[table["kind"] == "clean"].set_index("sample")
    table["flipped"] = table["answer_key"].fillna("∅") != table["sample"].map(clean["answer_key"]).fillna("∅")
    has = table["partner"] >= 0
    if adopt_on is None:
        table["adopted"] = np.where(has, np.nan, 0.0)
    else:
        value = table[adopt_on]
        same = value.notna() & (value == table["partner"].map(clean[adopt_on]))
        table["adopted"] = (has & table["flipped"] & same).astype(float)
    at_step = table["kind"].isin(["noise_step", "renoise_step", "propagation"])
    table.loc[at_step, "step"] = table.loc[at_step, "position"]
    return table


def summarise(samples: pd.DataFrame, n_boot: int = N_BOOT) -> pd.DataFrame:
    """One row per (kind, position, step, strength) from the per-sample table: accuracy (noise kinds) or flip rate
    (layer swap) with its instance-bootstrap interval, the clean baseline, mean_score, flip_rate and adopt_rate."""
    samples = samples.reset_index(drop=True)
    group, n_groups = encode_groups(samples["instance"].to_numpy())
    weights = bootstrap_weights(n_groups, n_boot)
    clean = samples["kind"] == "clean"
    baseline = float(samples.loc[clean, "correct"].mean())
    rows = []
    for (kind, position, step, strength), part in samples[~clean].groupby(["kind", "position", "step", "strength"],
                                                                            sort=True):
        metric = "flip_rate" if kind == "layer_swap" else "accuracy"
        values = part["flipped" if metric == "flip_rate" else "correct"].to_numpy(dtype=float)
        value, low, high = group_mean_ci(values, group[part.index], n_groups, weights)
        rows.append({"kind": kind, "position": int(position), "step": int(step), "value": float(value),
                     "ci_low": float(low), "ci_high": float(high), "n": len(part),
                     "n_instances": part["instance"].nunique(), "baseline": baseline, "metric": metric,
                     "mean_score": float(part["score"].mean()), "flip_rate": float(part["flipped"].mean()),
                     "adopt_rate": float(part["adopted"].mean()) if kind == "layer_swap" else np.nan,  # NaN: no transfer
                     "strength": float(strength), "distribution": str(part["distribution"].iloc[0]) or None})
    return pd.DataFrame(rows)


def config_record(config: Any, replay: Replay, **extra: Any) -> str:
    """The JSON stored as each table's `cos_config` parquet metadata."""
    from .. import __version__

    return json.dumps({"cos_version": __version__, "run_id": replay.archive.run_id, "task": replay.task.name,
                       "regime": regime(replay.task), "config": dataclasses.asdict(config),
                       "n_samples": len(replay.items), "instances": sorted({it.instance for it in replay.items}),
                       "call": replay.call_kwargs, **extra}, sort_keys=True, default=str)
