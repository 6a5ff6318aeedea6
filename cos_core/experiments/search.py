"""Test-time scaling at equal compute, each method placed by the forward passes (NFE) it spends per instance. Owns
`SearchConfig`, the independent runs (n seeds, x̂0's answer read at the prune steps), the selection rules (majority
of n; early search: keep the seed whose x̂0 after k steps most others share — with a deterministic sampler its
continuation is its independent run, costed n·k + S − k; the oracle "any of n"), the plain model at other step
counts, the ensemble rows (`ensemble.run_job`) and the `search` tables. Imports torch; never streamlit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..analysis.commitment import regime
from ..analysis.stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci
from .ensemble import CONTROL, METHODS, Job, check_noise, member_items, run_job
from .merge import MERGES, check_flow_matching
from .replay import Replay, held_out_instances
from .scoring import Scorer

log = logging.getLogger(__name__)

SINGLE, MAJORITY, EARLY, ORACLE, STEPS = "single", "majority", "early_search", "oracle_any", "steps"
TABLE, SAMPLES_TABLE = "search", "search_samples"
Progress = Callable[[Iterable], Iterable]


@dataclass(frozen=True)
class SearchConfig:
    """ns: samples per instance (majority vote, early search, ensembles); prune_steps: k, the steps an early search
    runs every seed before it keeps one; merges: latent-ensemble operators and the noise-mean control to add (from
    `ensemble.METHODS`); ks: merged steps; step_counts: the plain model at other numbers of steps (NFE = steps);
    steps: S (None = the run's); instances: held-out TEST_SEEDS[first_instance:+instances] (None = the run's own);
    member m uses noise seed seed_base + m, shared by every instance or (noise="per_instance") its own."""

    ns: tuple[int, ...] = (1, 2, 4, 8)
    prune_steps: tuple[int, ...] = (1, 2, 4)
    merges: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (1, 2, 4)
    step_counts: tuple[int, ...] = ()
    steps: int | None = None
    instances: int | None = None
    first_instance: int = 0
    seed_base: int = 0
    batch_size: int = 128
    workers: int = 0
    n_boot: int = N_BOOT
    noise: str = "shared"

    def __post_init__(self) -> None:
        check_noise(self.noise)
        if not self.ns or min(self.ns) < 1:
            raise ValueError(f"ns {list(self.ns)} must be a non-empty list of integers >= 1")
        bad = [m for m in self.merges if m not in METHODS]
        if bad:
            raise ValueError(f"merges {bad} not allowed; allowed: {', '.join(METHODS)}")
        if any(k < 1 for k in (*self.prune_steps, *self.ks, *self.step_counts)):
            raise ValueError("prune steps, merged steps and step counts must be >= 1")
        if self.batch_size < max(self.ns) or self.n_boot < 1 or self.workers < 0:
            raise ValueError(f"batch_size {self.batch_size} must hold n = {max(self.ns)} members; n_boot >= 1 and "
                             "workers >= 0")
        if self.instances is not None and self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")

    def check(self, steps: int) -> None:
        merged = self.ks if any(m in MERGES for m in self.merges) else ()
        over = sorted(k for k in (*self.prune_steps, *merged) if k > steps)
        if over:
            raise ValueError(f"prune or merge steps {over} exceed the {steps} sampling steps")


def majority(keys: Sequence[str | None]) -> int:
    """Index of the member whose readable answer is the most common (ties: the earliest such member; all
    unreadable: member 0)."""
    counts: dict[str, int] = {}
    for key in keys:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return 0
    best = max(counts.values())
    return next(i for i, key in enumerate(keys) if key is not None and counts[key] == best)


def consensus(keys: Sequence[str | None]) -> int:
    """Early search's pick: the member whose answer (x̂0 after k steps) the most other members share; an unreadable
    answer agrees with nothing; ties go to the earliest member. The same rule as `majority`, on early answers."""
    return majority(keys)


def independent_runs(replay: Replay, instances: Sequence[int], n: int, steps: int, read_at: Sequence[int],
                     cfg: SearchConfig, scorer: Scorer, progress: Progress) -> list[dict[str, Any]]:
    """n seeds per instance run apart; per instance the members' final scores and their x̂0 answers after each
    step count in `read_at`."""
    per_call = max(1, cfg.batch_size // n)
    pending = []
    for lo in progress(range(0, len(instances), per_call)):
        chunk = list(instances[lo:lo + per_call])
        items = member_items(replay, chunk, n, cfg.seed_base, cfg.noise)
        early: dict[int, np.ndarray] = {}

        def keep(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if i + 1 in read_at:
                early[i + 1] = kwargs["x0_hat"].float().cpu().numpy()
            return {}

        finals = replay.run(items, callback=keep, tensor_inputs=("x0_hat",), num_inference_steps=steps)
        keys = {k: scorer.keys(replay.task, early[k]) for k in read_at}
        pending.append((chunk, scorer.scores(replay.task, [int(it.instance) for it in items], finals), keys))
    out = []
    for chunk, scores, keys in pending:
        scores, keys = scores.result(), {k: v.result() for k, v in keys.items()}
        for j, inst in enumerate(chunk):
            out.append({"instance": int(inst), "scores": scores[j * n:(j + 1) * n],
                        "early": {k: v[j * n:(j + 1) * n] for k, v in keys.items()}})
    return out


def _pick(row: dict[str, Any], member: int) -> dict[str, Any]:
    s = row["scores"][member]
    return {"correct": bool(s["correct"]), "answer_key": s["answer_key"], "member": member}


def selection_rows(runs: list[dict[str, Any]], cfg: SearchConfig, steps: int) -> list[dict[str, Any]]:
    """Rows of `search_samples` read from the independent runs: single, majority, early search, oracle."""
    rows = []
    for run in runs:
        base = {"instance": run["instance"]}
        rows.append({**base, "method": SINGLE, "n": 1, "k": 0, "nfe": steps, **_pick(run, 0)})
        for n in sorted(set(cfg.ns)):
            if n == 1:
                continue
            keys = [s["answer_key"] for s in run["scores"][:n]]
            rows.append({**base, "method": MAJORITY, "n": n, "k": 0, "nfe": n * steps, **_pick(run, majority(keys))})
            any_ok = any(s["correct"] for s in run["scores"][:n])
            rows.append({**base, "method": ORACLE, "n": n, "k": 0, "nfe": n * steps, "correct": any_ok,
                         "answer_key": None, "member": -1})
            for k in sorted(set(cfg.prune_steps)):
                pick = consensus(run["early"][k][:n])
                rows.append({**base, "method": EARLY, "n": n, "k": k, "nfe": n * k + steps - k, **_pick(run, pick)})
    return rows


def ensemble_rows(replay: Replay, instances: Sequence[int], cfg: SearchConfig, steps: int, scorer: Scorer,
                  progress: Progress) -> list[dict[str, Any]]:
    """Rows of `search_samples` for every merge operator (K, n ≥ 2) and the noise-mean control: member 0's output."""
    jobs = [Job(m, k, n) for m in cfg.merges if m in MERGES for k in sorted(set(cfg.ks)) for n in sorted(set(cfg.ns))
            if n > 1]
    jobs += [Job(CONTROL, 0, n) for n in sorted(set(cfg.ns)) if n > 1 and CONTROL in cfg.merges]
    pending = []
    for job in progress(jobs):
        per_call = max(1, cfg.batch_size // job.n)  # the control draws n noises per instance too
        for lo in range(0, len(instances), per_call):
            pending.append((job, run_job(replay, job, instances[lo:lo + per_call], steps, cfg.seed_base, scorer,
                                                cfg.noise)))
    rows = []
    for job, collect in pending:
        for inst in collect():
            method = job.method if job.method == CONTROL else f"ensemble_{job.method}"
            cost = steps if job.method == CONTROL else job.n * steps
            rows.append({"instance": inst["instance"], "method": method, "n": job.n, "k": job.k, "nfe": cost,
                         **_pick(inst, 0)})
    return rows


def step_rows(replay: Replay, instances: Sequence[int], cfg: SearchConfig, scorer: Scorer) -> list[dict[str, Any]]:
    """Rows of `search_samples` for member 0 sampled with each of `step_counts` steps (accuracy vs steps)."""
    pending = []
    for count in sorted(set(cfg.step_counts)):
        for lo in range(0, len(instances), cfg.batch_size):
            items = member_items(replay, instances[lo:lo + cfg.batch_size], 1, cfg.seed_base, cfg.noise)
            finals = replay.run(items, num_inference_steps=count)
            pending.append((count, items, scorer.scores(replay.task, [int(it.instance) for it in items], finals)))
    rows = []
    for count, items, scores in pending:
        for item, s in zip(items, scores.result()):
            rows.append({"instance": int(item.instance), "method": STEPS, "n": 1, "k": count, "nfe": count,
                         "correct": bool(s["correct"]), "answer_key": s["answer_key"], "member": 0})
    return rows


def summary_table(samples: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per (method, n, k): accuracy with its instance-bootstrap interval, NFE, and the paired gain over `single`."""
    samples = samples.reset_index(drop=True)
    group, n_groups = encode_groups(samples["instance"].astype(str).to_numpy())
    weights = bootstrap_weights(n_groups, n_boot, seed)
    single = samples[samples["method"] == SINGLE].set_index("instance")["correct"].astype(float)
    rows = []
    for (method, n, k), part in samples.groupby(["method", "n", "k"], sort=True):
        correct = part["correct"].to_numpy(dtype=float)
        acc, low, high = group_mean_ci(correct, group[part.index], n_groups, weights)
        gain, g_low, g_high = group_mean_ci(correct - single.loc[part["instance"]].to_numpy(), group[part.index],
                                            n_groups, weights)
        rows.append({"method": method, "n": int(n), "k": int(k), "nfe": int(part["nfe"].iloc[0]),
                     "accuracy": float(acc), "ci_low": float(low), "ci_high": float(high), "gain": float(gain),
                     "gain_ci_low": float(g_low), "gain_ci_high": float(g_high),
                     "unreadable": float(part["answer_key"].isna().mean()) if method != ORACLE else np.nan,
                     "n_instances": int(part["instance"].nunique())})
    return pd.DataFrame(rows).sort_values(["nfe", "method", "n", "k"], ignore_index=True)


def run_search(replay: Replay, config: SearchConfig = SearchConfig(), *,
               progress: Progress = lambda it: it) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method of `config` on the same instances and member seeds; returns (search, search_samples)."""
    steps = int(config.steps or replay.n_steps)
    config.check(steps)
    check_flow_matching(replay.pipe.scheduler)
    if config.instances is None:
        instances = list(dict.fromkeys(int(it.instance) for it in replay.items))
    else:
        instances = held_out_instances(config.first_instance, config.instances)
    n = max(config.ns)
    with torch.no_grad(), Scorer(config.workers) as scorer:
        runs = independent_runs(replay, instances, n, steps, sorted(set(config.prune_steps)), config, scorer,
                                progress)
        rows = selection_rows(runs, config, steps)
        rows += ensemble_rows(replay, instances, config, steps, scorer, progress)
        rows += step_rows(replay, instances, config, scorer)
    samples = pd.DataFrame(rows).sort_values(["method", "n", "k", "instance"], kind="stable", ignore_index=True)
    table = summary_table(samples, config.n_boot)
    for frame in (table, samples):
        frame["task"] = replay.task.name
        frame["regime"] = regime(replay.task)
        frame["num_inference_steps"] = steps
    log.info("%s: %d instances, %d rows", replay.archive.run_id, len(instances), len(samples))
    return table, samples


def config_json(config: SearchConfig, replay: Replay, steps: int, **extra: Any) -> str:
    from .. import __version__

    return json.dumps({"cos_version": __version__, "run_id": replay.archive.run_id, "task": replay.task.name,
                       "regime": regime(replay.task), "config": {**asdict(config), "steps": steps}, **extra},
                      sort_keys=True, default=str)
