"""The latent ensemble (paper §6) as a measurement: n seeds of one task instance merged during the first K steps.

Owns the sweep over (method, K, n) that scores member 0's final video per instance (against the plain model and the
noise-mean control) and the `ensemble` / `ensemble_samples` tables with instance-bootstrap intervals. The merge
operators are `merge.py`; the organism runs through `replay.py`. Must not import streamlit or diffusers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..analysis.commitment import regime
from ..analysis.publish import publish
from ..analysis.stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci
from ..capture.run import WorkItem
from ..capture.sources import NOISE_MODES, ORGANISM_DIR, instance_noise_seed
from .merge import MERGES, check_flow_matching, merged_steps, noise_mean_start
from .replay import Replay, held_out_instances
from .scoring import Scorer

log = logging.getLogger(__name__)

CONTROL = "noise_mean"  # one trajectory from the mean of n noises (k does not apply: recorded as 0)
BASELINE = "none"  # member 0 alone: the plain model (k = 0, n = 1); always in the table
METHODS = (*MERGES, CONTROL)
TABLE, SAMPLES_TABLE = "ensemble", "ensemble_samples"


@dataclass(frozen=True)
class EnsembleConfig:
    """What `run_ensemble` measures. `steps` None = the archive's; `instances` None = the archive's own instances,
    else the task's held-out instances `TEST_SEEDS[first_instance:first_instance + instances]`. Member m of every
    ensemble uses noise seed `seed_base + m`, so smaller ensembles are subsets of larger ones (paired); with
    `noise="per_instance"` that seed is made the instance's own (`capture.sources.instance_noise_seed`), so no two
    instances share a noise and intervals over instances sample the noise too."""

    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (0, 1, 2, 4)
    ns: tuple[int, ...] = (1, 2, 4)
    steps: int | None = None
    instances: int | None = None
    first_instance: int = 0
    seed_base: int = 0
    batch_size: int = 128
    workers: int = 0
    n_boot: int = N_BOOT
    random_state: int = 0
    noise: str = "shared"

    def __post_init__(self) -> None:
        check_noise(self.noise)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods {list(bad) or '(none)'} not allowed; allowed: {', '.join(METHODS)}")
        if not self.ks or any(int(k) < 0 for k in self.ks):
            raise ValueError(f"k (merged steps) must be a non-empty list of integers >= 0, got {list(self.ks)}")
        if not self.ns or any(int(n) < 1 for n in self.ns):
            raise ValueError(f"n (seeds per ensemble) must be a non-empty list of integers >= 1, got {list(self.ns)}")
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.instances is not None and int(self.instances) < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.first_instance < 0 or self.seed_base < 0:
            raise ValueError(f"first_instance {self.first_instance} and seed_base {self.seed_base} must be >= 0")
        if self.batch_size < max(self.ns):
            raise ValueError(f"batch_size {self.batch_size} must hold one whole ensemble (n up to {max(self.ns)})")
        if self.n_boot < 1 or self.workers < 0:
            raise ValueError(f"n_boot must be >= 1 and workers >= 0, got {self.n_boot} and {self.workers}")

    def check_steps(self, n_steps: int) -> None:
        """ValueError when a K exceeds the number of denoising steps."""
        over = sorted(k for k in self.ks if k > n_steps)
        if over:
            raise ValueError(f"k {over} exceed the {n_steps} denoising steps; allowed: 0..{n_steps}")


# ---- the sweep ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One pipeline configuration over all instances: `method` "plain" (no merge), "noise_mean", or a merge;
    `n` members per instance (trajectories per instance: 1 for noise_mean)."""

    method: str
    k: int
    n: int

    @property
    def trajectories(self) -> int:
        return 1 if self.method == CONTROL else self.n


def plan_jobs(config: EnsembleConfig) -> list[Job]:
    """The runs the rows need. K = 0 rows (every operator) and n = 1 rows (merging one member is the identity) are
    read from one unmerged run of max(n) members; merges with K ≥ 1, n ≥ 2 and noise_mean with n ≥ 2 run apart."""
    merges = [m for m in config.methods if m in MERGES]
    plain_n = max(config.ns) if merges and 0 in config.ks else 1
    jobs = [Job("plain", 0, plain_n)]
    jobs += [Job(m, int(k), int(n)) for m in merges for k in sorted(set(config.ks)) if k > 0
             for n in sorted(set(config.ns)) if n > 1]
    if CONTROL in config.methods:
        jobs += [Job(CONTROL, 0, int(n)) for n in sorted(set(config.ns)) if n > 1]
    return jobs


def instance_seeds(replay: Replay, config: EnsembleConfig) -> list[int]:
    """The task instances (instance seeds) measured: the archive's own, or held-out TEST_SEEDS[F:F+N]."""
    if config.instances is None:
        return list(dict.fromkeys(int(it.instance) for it in replay.items))
    return held_out_instances(config.first_instance, config.instances)


def check_noise(noise: str) -> str:
    if noise not in NOISE_MODES:
        raise ValueError(f"noise {noise!r}: choose one of {', '.join(NOISE_MODES)}")
    return noise


def member_items(replay: Replay, instances: Sequence[int], n: int, seed_base: int,
                 noise: str = "shared") -> list[WorkItem]:
    """Instance-major work items: member m of instance j at position j*n + m, noise seed seed_base + m (shared by
    every instance) or, with noise="per_instance", that seed made the instance's own."""
    task = replay.task.name
    seed = (lambda inst, s: s) if check_noise(noise) == "shared" else instance_noise_seed
    return [WorkItem(sample_id=f"{task}-{inst}-m{m}", seed=seed(int(inst), seed_base + m), task=task,
                     instance=str(inst)) for inst in instances for m in range(n)]


def run_job(replay: Replay, job: Job, instances: Sequence[int], steps: int, seed_base: int,
            scorer: Scorer | None = None, noise: str = "shared") -> Callable[[], list[dict[str, Any]]]:
    """Generate one batch of instances under `job`; returns a function giving, per instance, every trajectory's
    scores (member 0 first), read by `scorer` (inline without one) while the caller goes on."""
    items = member_items(replay, instances, job.n, seed_base, noise)
    noise = replay.noise([it.seed for it in items])  # (I*n, C, F, H, W)
    if job.method == CONTROL:
        scored_items = items[::job.n]
        finals = replay.run(scored_items, latents=noise_mean_start(noise, job.n), num_inference_steps=steps)
    else:
        scored_items = items
        merge = merged_steps(replay.pipe.scheduler, job.method, job.k, job.n) if job.method in MERGES \
            else contextlib.nullcontext()
        with merge:
            finals = replay.run(items, latents=noise, num_inference_steps=steps)
    per = job.trajectories
    pending = (scorer or Scorer(0)).scores(replay.task, [int(it.instance) for it in scored_items], finals)

    def collect() -> list[dict[str, Any]]:
        scores = pending.result()
        return [{"instance": int(inst), "scores": scores[j * per:(j + 1) * per]} for j, inst in enumerate(instances)]
    return collect


def _row(inst: dict[str, Any], method: str, k: int, n: int) -> dict[str, Any]:
    """One ensemble_samples row: member 0's outcome and how many of members 1..n-1 reached member 0's answer."""
    scores = inst["scores"][:n]
    first = scores[0]
    others = [s["answer_key"] for s in scores[1:]]
    agree = (np.mean([key is not None and key == first["answer_key"] for key in others]) if others else np.nan)
    return {"instance": inst["instance"], "method": method, "k": k, "n": n, "correct": first["correct"],
            "score": first["score"], "answer_key": first["answer_key"], "agreement": float(agree)}


def sample_rows(config: EnsembleConfig, results: dict[Job, list[dict[str, Any]]]) -> pd.DataFrame:
    """The `ensemble_samples` table from every job's per-instance results (see `plan_jobs` for what is shared)."""
    ks, ns = sorted(set(config.ks)), sorted(set(config.ns))
    rows = []
    for inst in next(v for j, v in results.items() if j.method == "plain"):
        rows.append(_row(inst, BASELINE, 0, 1))
        for method in config.methods:
            if method == CONTROL:
                rows += [_row(inst, CONTROL, 0, 1)] if 1 in ns else []
                continue
            rows += [_row(inst, method, 0, n) for n in ns] if 0 in ks else []
            rows += [_row(inst, method, k, 1) for k in ks if k > 0] if 1 in ns else []
    for job, per_instance in results.items():
        if job.method != "plain":
            rows += [_row(inst, job.method, job.k, job.n) for inst in per_instance]
    table = pd.DataFrame(rows)
    return table.sort_values(["method", "k", "n", "instance"], kind="stable", ignore_index=True)


def summary_table(samples: pd.DataFrame, config: EnsembleConfig, task: str, steps: int, regime_name: str = ""
                  ) -> pd.DataFrame:
    """The `ensemble` table: per (method, k, n) accuracy over instances with its instance-bootstrap interval, and
    the paired gain over the plain model (`none`) on the same instances and bootstrap draws."""
    group, n_groups = encode_groups(samples["instance"].to_numpy())
    weights = bootstrap_weights(n_groups, config.n_boot, config.random_state)  # the same draws for every row
    plain = samples[samples["method"] == BASELINE].set_index("instance")["correct"].astype(float)
    rows = []
    for (method, k, n), part in samples.groupby(["method", "k", "n"], sort=True):
        correct = part["correct"].to_numpy(dtype=float)
        acc, low, high = group_mean_ci(correct, group[part.index], n_groups, weights)
        gain = correct - plain.loc[part["instance"]].to_numpy()
        gain, gain_low, gain_high = group_mean_ci(gain, group[part.index], n_groups, weights)
        agreement = part["agreement"]
        rows.append({"method": method, "k": int(k), "n": int(n), "accuracy": float(acc), "ci_low": float(low),
                     "ci_high": float(high), "n_instances": int(part["instance"].nunique()),
                     "gain": float(gain), "gain_ci_low": float(gain_low), "gain_ci_high": float(gain_high),
                     "mean_score": float(part["score"].mean()), "unreadable": float(part["answer_key"].isna().mean()),
                     "member_agreement": float(agreement.mean()) if agreement.notna().any() else np.nan,
                     "num_inference_steps": int(steps), "nfe": int(nfe(method, n, steps)), "task": task,
                     "regime": regime_name})
    return pd.DataFrame(rows)


def nfe(method: str, n: int, steps: int) -> int:
    """Transformer forward passes one instance costs (guidance 1: one per trajectory and step)."""
    return steps if method in (CONTROL, BASELINE) else n * steps


def batches(jobs: Sequence[Job], instances: Sequence[int], batch_size: int) -> list[tuple[Job, list[int]]]:
    """Every (job, instances) pipeline call: groups of n members along the batch, at most `batch_size` items."""
    out = []
    for job in jobs:
        per_call = max(1, batch_size // job.trajectories)
        out += [(job, list(instances[i:i + per_call])) for i in range(0, len(instances), per_call)]
    return out


def run_ensemble(replay: Replay, config: EnsembleConfig = EnsembleConfig(), *,
                 progress: Callable[[Iterable], Iterable] = lambda it: it) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every (method, k, n) of `config` on `replay`'s task; returns (ensemble, ensemble_samples)."""
    steps = int(config.steps or replay.n_steps)
    config.check_steps(steps)
    check_flow_matching(replay.pipe.scheduler)
    instances = instance_seeds(replay, config)
    jobs = plan_jobs(config)
    results: dict[Job, list[dict[str, Any]]] = {job: [] for job in jobs}
    started = time.perf_counter()
    with Scorer(config.workers) as scorer:
        pending = [(job, run_job(replay, job, chunk, steps, config.seed_base, scorer, config.noise))
                   for job, chunk in progress(batches(jobs, instances, config.batch_size))]
        for job, collect in pending:
            results[job] += collect()
    log.info("%s: %d jobs x %d instances in %.1f s", replay.archive.run_id, len(jobs), len(instances),
             time.perf_counter() - started)
    samples = sample_rows(config, results)
    return summary_table(samples, config, replay.task.name, steps, regime(replay.task)), samples


def ensemble_run(archive: Any, config: EnsembleConfig = EnsembleConfig(), *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, model_dir: Any = None, command: Sequence[str] | None = None,
                 write: bool = True, progress: Callable[[Iterable], Iterable] = lambda it: it
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load `archive`'s organism, measure, and (with `write`) put both tables into its ``derived/``.

    Everything is validated before the model runs; the tables are written only after every job finished, each
    carrying the resolved config and the command in its ``cos_config`` parquet metadata."""
    from .. import __version__
    from ..archive import Archive
    from .replay import load_replay

    archive = archive if isinstance(archive, Archive) else Archive.open(archive)
    config = replace(config, steps=int(config.steps or archive.n_steps))
    config.check_steps(config.steps)
    replay = load_replay(archive, device=device, dtype=dtype, model_dir=model_dir)
    table, samples = run_ensemble(replay, config, progress=progress)
    record = {"cos_version": __version__, "run_id": archive.run_id, "config": asdict(config),
              "task": replay.task.name, "instances": instance_seeds(replay, config), "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "model_dir": str(model_dir or ORGANISM_DIR),
              "command": list(command) if command is not None else None}
    for name, frame in ((TABLE, table), (SAMPLES_TABLE, samples)):
        frame.attrs["cos_config"] = json.dumps({**record, "table": name}, sort_keys=True, default=str)
    if write:
        publish(archive, {TABLE: table, SAMPLES_TABLE: samples}, producer="cos ensemble")
    return table, samples
