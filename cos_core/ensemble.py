"""The latent ensemble (paper §6) as a measurement: n seeds of one task instance merged during the first K steps.

Owns the merge operators (`merged_steps`, a wrapper around a flow-matching scheduler's `step` removed in `finally`),
the noise-mean control, the sweep over (method, K, n) that scores member 0's final video per instance, and the
`ensemble` / `ensemble_samples` tables with instance-bootstrap intervals. Runs the organism through
`cos_core.replay`; must not import streamlit or diffusers (the scheduler is recognised by its class name).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .analysis.stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci
from .capture.run import WorkItem
from .capture.sources import Source
from .replay import ORGANISM_DIR, Replay, held_out_instances

log = logging.getLogger(__name__)

MERGES = ("mean_x_t", "mean_v_hat", "mean_x0_hat")
CONTROL = "noise_mean"  # one trajectory from the mean of n noises (k does not apply: recorded as 0)
BASELINE = "none"  # member 0 alone: the plain model (k = 0, n = 1); always in the table
METHODS = (*MERGES, CONTROL)
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
TABLE, SAMPLES_TABLE = "ensemble", "ensemble_samples"


@dataclass(frozen=True)
class EnsembleConfig:
    """What `run_ensemble` measures. `steps` None = the archive's; `instances` None = the archive's own instances,
    else the task's held-out instances `TEST_SEEDS[first_instance:first_instance + instances]`. Member m of every
    ensemble uses noise seed `seed_base + m`, so smaller ensembles are subsets of larger ones (paired)."""

    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (0, 1, 2, 4)
    ns: tuple[int, ...] = (1, 2, 4)
    steps: int | None = None
    instances: int | None = None
    first_instance: int = 0
    seed_base: int = 0
    batch_size: int = 128
    n_boot: int = N_BOOT
    random_state: int = 0

    def __post_init__(self) -> None:
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
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")

    def check_steps(self, n_steps: int) -> None:
        """ValueError when a K exceeds the number of denoising steps."""
        over = sorted(k for k in self.ks if k > n_steps)
        if over:
            raise ValueError(f"k {over} exceed the {n_steps} denoising steps; allowed: 0..{n_steps}")


# ---- merge operators ------------------------------------------------------------------------------------------
def check_flow_matching(scheduler: Any) -> None:
    """ValueError unless `scheduler` is a deterministic FlowMatchEulerDiscreteScheduler (x̂0 = x_t − σ v̂)."""
    names = [c.__name__ for c in type(scheduler).__mro__]
    if FLOW_SCHEDULER not in names:
        raise ValueError(f"the latent ensemble needs a {FLOW_SCHEDULER} (x0_hat = x_t - sigma * v_hat); "
                         f"this pipeline has {type(scheduler).__name__}")
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise ValueError(f"{FLOW_SCHEDULER} with stochastic_sampling=True re-draws noise each step; "
                         "the merge operators need the deterministic Euler step")


def group_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """(G*n, ...) -> (G*n, ...): every member replaced by the mean of its group of n consecutive members."""
    assert x.shape[0] % n == 0, f"batch {x.shape[0]} is not whole groups of {n}"
    g = x.reshape(x.shape[0] // n, n, *x.shape[1:])  # (group, member, ...)
    return g.mean(dim=1, keepdim=True).expand_as(g).reshape(x.shape)


def noise_mean_start(noise: torch.Tensor, n: int) -> torch.Tensor:
    """(G*n, C, F, H, W) member noises -> (G, C, F, H, W): each group's mean (std 1/√n, not rescaled)."""
    assert noise.shape[0] % n == 0, f"batch {noise.shape[0]} is not whole groups of {n}"
    return noise.reshape(noise.shape[0] // n, n, *noise.shape[1:]).mean(dim=1)


@contextlib.contextmanager
def merged_steps(scheduler: Any, method: str, k: int, n: int) -> Iterator[None]:
    """Inside the block, `scheduler.step` merges each group of n consecutive batch members during steps < k.

    mean_x_t: the Euler step, then every member takes its group's mean x_next. mean_v_hat: the step with the
    group-mean v̂. mean_x0_hat: x_next_i = (1 − σ_next)·mean(x̂0) + σ_next·ε̂_i, with x̂0 = x_t − σ v̂ and
    ε̂ = x_t + (1 − σ) v̂. σ, σ_next are read from the scheduler's `sigmas` at its `step_index`, as it does."""
    check_flow_matching(scheduler)
    if method not in MERGES:
        raise ValueError(f"merge method {method!r} unknown; allowed: {', '.join(MERGES)}")
    had_own = "step" in vars(scheduler)  # someone else's wrapper stays in place after ours
    previous = vars(scheduler).get("step")
    original = scheduler.step

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("the merge operators do not support per_token_timesteps")
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        index = int(scheduler.step_index)
        if index >= k or n == 1:
            return original(model_output, timestep, sample, *args, **kwargs)
        if method == "mean_v_hat":
            v_bar = group_mean(model_output.float(), n).to(model_output.dtype)
            return original(v_bar, timestep, sample, *args, **kwargs)
        out = original(model_output, timestep, sample, *args, **kwargs)  # also advances step_index
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        if method == "mean_x_t":
            merged = group_mean(prev.float(), n)
        else:  # mean_x0_hat
            sigma = scheduler.sigmas[index].to(device=sample.device, dtype=torch.float32)
            sigma_next = scheduler.sigmas[index + 1].to(device=sample.device, dtype=torch.float32)
            x, v = sample.float(), model_output.float()
            x0_hat, eps_hat = x - sigma * v, x + (1.0 - sigma) * v  # (B, C, F, H, W) each
            merged = (1.0 - sigma_next) * group_mean(x0_hat, n) + sigma_next * eps_hat
        merged = merged.to(prev.dtype)
        return (merged, *out[1:]) if isinstance(out, tuple) else type(out)(prev_sample=merged)

    scheduler.step = step
    try:
        yield
    finally:
        if had_own:
            scheduler.step = previous
        else:
            del scheduler.step


@dataclass(frozen=True)
class MergeSpec:
    """A latent ensemble to capture (`cos capture --ensemble METHOD:K:N`): each work item runs as n members (seeds
    seed, seed + 1, ...) merged by `method` during the first k steps; member 0 is recorded."""

    method: str
    k: int
    n: int

    @classmethod
    def parse(cls, text: str) -> "MergeSpec":
        """'METHOD:K:N' (e.g. 'mean_x0_hat:4:4'); ValueError naming what is allowed."""
        parts = text.split(":")
        try:
            method, k, n = parts[0], int(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"--ensemble {text!r} must be METHOD:K:N, e.g. mean_x0_hat:4:4") from None
        if method not in MERGES or k < 0 or n < 1:
            raise ValueError(f"--ensemble {text!r}: METHOD one of {', '.join(MERGES)}, K >= 0 merged steps, N >= 1 "
                             "seeds")
        return cls(method, k, n)


def merged_capture(source: Source, spec: MergeSpec) -> Source:
    """`source`, the organism loaded with `SourceConfig(members=spec.n)`, captured as latent ensembles: merging wraps
    the capture (`Source.around`), and the run id and manifest (`config.ensemble`) say which ensemble it was."""
    assert source.members == spec.n, f"load the source with members={spec.n}, not {source.members}"
    steps = source.call_kwargs["num_inference_steps"]
    if spec.k > steps:
        raise ValueError(f"--ensemble {spec.method}:{spec.k}:{spec.n} merges {spec.k} steps of only {steps}")
    extra = {**source.extra, "ensemble": {"method": spec.method, "k": spec.k, "n": spec.n, "captured_member": 0,
                                          "member_seeds": "seed + m for member m = 0..n-1"}}
    run_id = f"organism-{source.extra['task']}-{spec.method}-k{spec.k}-n{spec.n}-{len(source.items)}x{steps}"
    return replace(source, extra=extra, default_run_id=run_id,
                   around=functools.partial(merged_steps, source.pipe.scheduler, spec.method, spec.k, spec.n))


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


def member_items(replay: Replay, instances: Sequence[int], n: int, seed_base: int) -> list[WorkItem]:
    """Instance-major work items: member m of instance j at position j*n + m, noise seed seed_base + m."""
    task = replay.task.name
    return [WorkItem(sample_id=f"{task}-{inst}-m{m}", seed=seed_base + m, task=task, instance=str(inst))
            for inst in instances for m in range(n)]


def run_job(replay: Replay, job: Job, instances: Sequence[int], steps: int, seed_base: int) -> list[dict[str, Any]]:
    """Generate one batch of instances under `job`; per instance member 0's score and every trajectory's answer."""
    items = member_items(replay, instances, job.n, seed_base)
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
    out = []
    for j, inst in enumerate(instances):
        scores = [replay.score(scored_items[j * per + m], finals[j * per + m]) for m in range(per)]
        out.append({"instance": int(inst), "scores": scores})
    return out


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


def summary_table(samples: pd.DataFrame, config: EnsembleConfig, task: str, steps: int) -> pd.DataFrame:
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
                     "num_inference_steps": int(steps), "task": task})
    return pd.DataFrame(rows)


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
    for job, chunk in progress(batches(jobs, instances, config.batch_size)):
        results[job] += run_job(replay, job, chunk, steps, config.seed_base)
    log.info("%s: %d jobs x %d instances in %.1f s", replay.archive.run_id, len(jobs), len(instances),
             time.perf_counter() - started)
    samples = sample_rows(config, results)
    return summary_table(samples, config, replay.task.name, steps), samples


def ensemble_run(archive: Any, config: EnsembleConfig = EnsembleConfig(), *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, model_dir: Any = None, command: Sequence[str] | None = None,
                 write: bool = True, progress: Callable[[Iterable], Iterable] = lambda it: it
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load `archive`'s organism, measure, and (with `write`) put both tables into its ``derived/``.

    Everything is validated before the model runs; the tables are written only after every job finished, each
    carrying the resolved config and the command in its ``cos_config`` parquet metadata."""
    from . import __version__
    from .archive import Archive
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
        archive.write_derived(TABLE, table)
        archive.write_derived(SAMPLES_TABLE, samples)
    return table, samples
