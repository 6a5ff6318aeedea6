"""Interventions on a replayed organism run (paper Fig. 3 and 6): noise at one step vs at one frame, layer swap.

Owns `InterventionConfig`, `Job` (one sample under one intervention), the batched executor that runs many jobs
through one pipeline call (noise mixed into the latent from the step callback, block outputs recorded or replaced by
forward hooks from `capture.hooks`, removed in `finally`), `run_interventions` and the `interventions` /
`interventions_samples` tables. The propagation map's table is `analysis.propagation`. Imports torch; never streamlit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..analysis.propagation import MIN_SAMPLES, propagation_table
from ..analysis.stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci
from ..capture.hooks import BranchTracker, hooked
from ..capture.run import WorkItem
from .replay import Replay, held_out_instances

log = logging.getLogger(__name__)

KINDS = ("noise_step", "noise_frame", "propagation", "layer_swap")
SWAP_MODES = ("update", "output")  # what a layer swap carries over: the block's residual update, or its whole output
NOISE_KINDS = ("noise_step", "propagation")  # kinds that mix noise into the whole latent entering one step
Progress = Callable[[Iterable], Iterable]


@dataclass(frozen=True)
class InterventionConfig:
    """What `run_interventions` measures. `steps`/`frames`/`layers` None = every one the run has.

    steps: noise_step positions and propagation inject steps; frames: noise_frame positions; layers: blocks swapped;
    swap_steps: the steps whose block output is swapped; swap: "update" carries block L's residual update
    (output − input) of scene B into scene A (A's input + B's update), "output" its whole output — which makes every
    later block compute B's prediction whenever the scene enters only through the input tokens; strength λ in x <- (1-λ)·x + λ·ε (noise probes) and
    propagation_strength λ for the propagation perturbation; seed_base: the noise ε's generators are seeded from it,
    the sample and the kind; batch_size: jobs per pipeline call; n_boot: bootstrap replicates over instances.
    """

    which: tuple[str, ...] = KINDS
    steps: tuple[int, ...] | None = None
    frames: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    swap_steps: tuple[int, ...] = (0,)
    swap: str = "update"
    strength: float = 1.0
    propagation_strength: float = 0.5
    seed_base: int = 0
    batch_size: int = 32
    n_boot: int = N_BOOT

    def __post_init__(self) -> None:
        bad = [k for k in self.which if k not in KINDS]
        if bad or not self.which:
            raise ValueError(f"which={list(self.which)}: name one or more of {list(KINDS)}")
        if self.swap not in SWAP_MODES:
            raise ValueError(f"swap={self.swap!r} is not allowed; allowed: {', '.join(SWAP_MODES)}")
        for name in ("strength", "propagation_strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1] (0 = no noise, 1 = pure noise)")
        if self.batch_size < 1 or self.n_boot < 1:
            raise ValueError(f"batch_size={self.batch_size} and n_boot={self.n_boot} must be >= 1")
        for name in ("steps", "frames", "layers", "swap_steps"):
            values = getattr(self, name)
            if values is not None and (not values or any(int(v) < 0 for v in values)):
                raise ValueError(f"{name}={list(values)} must be non-empty non-negative indices (or None = all)")

    def resolve(self, n_steps: int, n_frames: int, n_layers: int) -> "InterventionConfig":
        """The same config with None filled in; ValueError for a position the run does not have."""
        sizes = {"steps": n_steps, "frames": n_frames, "layers": n_layers, "swap_steps": n_steps}
        out = {}
        for name, size in sizes.items():
            values = getattr(self, name)
            values = tuple(range(size)) if values is None else tuple(sorted({int(v) for v in values}))
            bad = [v for v in values if v >= size]
            if bad:
                raise ValueError(f"{name} {bad} out of range; this run has {size} ({name.rstrip('s')} 0..{size - 1})")
            out[name] = values
        return dataclasses.replace(self, **out)


@dataclass(frozen=True)
class Job:
    """One sample under one intervention. kind "clean" runs it untouched; `position` is the step (noise_step,
    propagation), frame (noise_frame) or layer (layer_swap); layer_swap replaces block `position`'s output at `step`
    with `partner`'s clean one."""

    sample: int
    kind: str = "clean"
    position: int = -1
    strength: float = 0.0
    step: int = -1
    partner: int = -1


def noise_seed(seed_base: int, sample: int, kind: str) -> int:
    """The seed of one (sample, kind)'s noise generator: reruns draw the same ε, and every position of a kind sees
    the same draw for a sample (a paired comparison across positions)."""
    kind_id = KINDS.index(kind) if kind in KINDS else len(KINDS)
    return int(np.random.SeedSequence([int(seed_base), int(sample), kind_id]).generate_state(1)[0])


class NoiseMixer:
    """x <- (1-λ)·x + λ·ε on the latent entering a step: whole latent at one step (noise_step, propagation) or one
    latent frame at every step (noise_frame, fresh ε each step). ε comes from per-row CPU generators (device-free)."""

    def __init__(self, jobs: Sequence[Job], seed_base: int):
        self.jobs = list(jobs)
        self.gens = [torch.Generator().manual_seed(noise_seed(seed_base, j.sample, j.kind)) for j in self.jobs]

    def apply(self, latents: torch.Tensor, step: int) -> None:
        """Mix noise, in place, into `latents` (B, C, F, H, W) about to enter `step`."""
        for row, (job, gen) in enumerate(zip(self.jobs, self.gens)):
            if job.kind in NOISE_KINDS and job.position == step:
                target = latents[row]  # (C, F, H, W)
            elif job.kind == "noise_frame":
                target = latents[row, :, job.position]  # (C, H, W)
            else:
                continue
            eps = torch.randn(tuple(target.shape), generator=gen, dtype=torch.float32).to(latents.device)
            target.mul_(1.0 - job.strength).add_(eps.to(target.dtype), alpha=job.strength)


class BlockHooks:
    """Forward hooks on every transformer block for one batch of jobs, removed in `finally` (`__exit__`).

    means: record the cond branch's token-mean output of every block at every step -> `means` (B, step, layer, d);
    keep: {(layer, step)} whose full outputs are kept per branch -> `kept[(layer, step, branch)]` (B, tokens, d) CPU;
    swaps: {(layer, step): [(row, {branch: (tokens, d) tensor})]} outputs replaced for those rows;
    delta: keep and swap the block's residual update (output − input) instead: a swapped row becomes input + update.
    The step comes from `step()` (the pipeline's callback), the CFG branch from the transformer's cache_context.
    """

    def __init__(self, transformer: Any, step: Callable[[], int], n_steps: int, *, means: bool = False,
                 keep: Iterable[tuple[int, int]] = (), swaps: dict | None = None, delta: bool = False):
        self.transformer, self.step, self.n_steps, self.delta = transformer, step, n_steps, delta
        self.want_means, self.keep, self.swaps = means, set(keep), swaps or {}
        self.means: torch.Tensor | None = None
        self.kept: dict[tuple[int, int, str], torch.Tensor] = {}
        self.branch = BranchTracker(default="cond")
        self._installed = contextlib.ExitStack()

    def __enter__(self) -> "BlockHooks":
        with contextlib.ExitStack() as stack:  # a failure half-way removes what was installed so far
            stack.enter_context(self.branch.track(self.transformer))
            for layer, block in enumerate(self.transformer.blocks):
                stack.enter_context(hooked(block, self._hook(layer)))
            self._installed = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._installed.close()

    def _hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, tokens, d)
            step, branch = self.step(), self.branch.name
            if self.want_means and branch == "cond":
                if self.means is None:
                    n_layers = len(self.transformer.blocks)
                    self.means = torch.zeros(hidden.shape[0], self.n_steps, n_layers, hidden.shape[-1],
                                             device=hidden.device)
                self.means[:, step, layer] = hidden.float().mean(1)
            if (layer, step) in self.keep:  # the residual update, or the whole output
                carried = hidden - args[0] if self.delta else hidden
                self.kept[(layer, step, branch)] = carried.detach().to("cpu", copy=True)
            rows = self.swaps.get((layer, step))
            if not rows:
                return None
            hidden = hidden.clone()
            for row, sources in rows:
                source = sources.get(branch)
                if source is None:
                    raise ValueError(f"layer swap: the partner run has no {branch!r} branch output of layer {layer} "
                                     f"at step {step} (it ran {sorted(sources)})")
                if tuple(source.shape) != tuple(hidden[row].shape):
                    raise ValueError(f"layer swap needs equal token shapes: layer {layer} output "
                                     f"{tuple(hidden[row].shape)} vs the partner's {tuple(source.shape)}")
                source = source.to(device=hidden.device, dtype=hidden.dtype)
                hidden[row] = args[0][row] + source if self.delta else source
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook


@dataclass
class BatchResult:
    finals: np.ndarray  # (job, C, F, H, W)
    means: np.ndarray | None  # (job, step, layer, d) cond-branch token means
    kept: dict[tuple[int, int, str], torch.Tensor]  # (layer, step, branch) -> (job, tokens, d)


def run_batch(replay: Replay, jobs: Sequence[Job], *, seed_base: int = 0, means: bool = False,
              keep: Iterable[tuple[int, int]] = (), sources: dict | None = None, delta: bool = False,
              observe: Callable[[int, torch.Tensor], None] | None = None) -> BatchResult:
    """Run `jobs` as one pipeline call. `sources[(sample, layer, step, branch)]` (tokens, d) feeds layer swaps;
    `observe(step, x0_hat)` sees each step's x̂0 (B, C, F, H, W) before the next step's noise is mixed in."""
    n_steps = replay.n_steps
    latents = replay.noise([replay.items[j.sample].seed for j in jobs])  # (B, C, F, H, W)
    mixer = NoiseMixer(jobs, seed_base)
    mixer.apply(latents, 0)
    swaps: dict[tuple[int, int], list] = {}
    for row, job in enumerate(jobs):
        if job.kind == "layer_swap":
            branches = {b: t for (s, l, st, b), t in (sources or {}).items()
                        if (s, l, st) == (job.partner, job.position, job.step)}
            swaps.setdefault((job.position, job.step), []).append((row, branches))
    state = {"step": 0}

    def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        if observe is not None:
            observe(i, kwargs["x0_hat"])
        state["step"] = i + 1
        if i + 1 < n_steps:  # the latent entering step i + 1; after the last step the model's output is kept
            mixer.apply(latents, i + 1)
        return {"latents": latents}

    with BlockHooks(replay.pipe.transformer, lambda: state["step"], n_steps, means=means, keep=keep,
                    swaps=swaps, delta=delta) as hooks:
        finals = replay.run([replay.items[j.sample] for j in jobs], latents=latents, callback=callback,
                            tensor_inputs=("latents", "x0_hat") if observe else ("latents",))
    acts = hooks.means.cpu().numpy() if hooks.means is not None else None
    return BatchResult(finals, acts, hooks.kept)


def partners(items: Sequence[WorkItem]) -> list[int]:
    """Sample i's layer-swap partner: the next instance's sample (cyclically) with the same seed, else its first."""
    order = list(dict.fromkeys(it.instance for it in items))
    if len(order) < 2:
        raise ValueError(f"layer swap needs >= 2 task instances; this run has {len(order)}")
    by_key = {(it.instance, it.seed): i for i, it in enumerate(items)}
    first = {inst: next(i for i, it in enumerate(items) if it.instance == inst) for inst in order}
    out = []
    for it in items:
        nxt = order[(order.index(it.instance) + 1) % len(order)]
        out.append(by_key.get((nxt, it.seed), first[nxt]))
    return out


def with_instances(replay: Replay, first: int, n: int) -> Replay:
    """The replay on held-out task instances TEST_SEEDS[first:first + n], each with the archive's noise seeds."""
    seeds = list(dict.fromkeys(it.seed for it in replay.items))
    task = replay.task.name
    items = [WorkItem(sample_id=f"{task}-{inst}-s{s}", seed=s, task=task, instance=str(inst))
             for inst in held_out_instances(first, n) for s in seeds]
    return dataclasses.replace(replay, items=items, instances={})


def _jobs(cfg: InterventionConfig, n: int, partner: list[int] | None) -> list[Job]:
    jobs = []
    if "noise_step" in cfg.which:
        jobs += [Job(i, "noise_step", s, cfg.strength) for s in cfg.steps for i in range(n)]
    if "noise_frame" in cfg.which:
        jobs += [Job(i, "noise_frame", f, cfg.strength) for f in cfg.frames for i in range(n)]
    if "propagation" in cfg.which:
        jobs += [Job(i, "propagation", s, cfg.propagation_strength) for s in cfg.steps for i in range(n)]
    if "layer_swap" in cfg.which:
        jobs += [Job(i, "layer_swap", layer, 0.0, st, partner[i])
                 for st in cfg.swap_steps for layer in cfg.layers for i in range(n)]
    return jobs


def run_interventions(replay: Replay, config: InterventionConfig = InterventionConfig(), *,
                      progress: Progress = lambda it: it) -> dict[str, pd.DataFrame]:
    """Run the chosen interventions; returns {"interventions", "interventions_samples"} (when a noise probe or the
    layer swap is chosen) and {"propagation"} (when chosen), each with the resolved config in `attrs["cos_config"]`.
    Nothing is written here."""
    n_frames = int(replay.pipe.config.video_shape[1])
    cfg = config.resolve(replay.n_steps, n_frames, len(replay.pipe.transformer.blocks))
    n = len(replay.items)
    if "propagation" in cfg.which and n < MIN_SAMPLES:
        raise ValueError(f"propagation needs >= {MIN_SAMPLES} samples for CKA; this run has {n} "
                         "(use more --instances, or leave propagation out of --which)")
    partner = partners(replay.items) if "layer_swap" in cfg.which else None
    keep = [(layer, st) for st in cfg.swap_steps for layer in cfg.layers] if partner else []
    want_means = "propagation" in cfg.which
    jobs = [Job(i) for i in range(n)] + _jobs(cfg, n, partner)
    size = cfg.batch_size  # clean jobs get chunks of their own: their outputs feed the swaps that follow
    chunks = [jobs[k:min(k + size, n)] for k in range(0, n, size)]
    chunks += [jobs[k:k + size] for k in range(n, len(jobs), size)]
    finals: list[np.ndarray] = []
    means: dict[int, np.ndarray] = {}  # job index -> (step, layer, d)
    sources: dict[tuple[int, int, int, str], torch.Tensor] = {}  # (sample, layer, step, branch) -> (tokens, d)
    log.info("%s: %d jobs (%d samples) in %d pipeline calls", replay.archive.run_id, len(jobs), n, len(chunks))
    start = 0
    for chunk in progress(chunks):
        clean = chunk[0].kind == "clean"
        record = want_means and any(j.kind in ("clean", "propagation") for j in chunk)
        out = run_batch(replay, chunk, seed_base=cfg.seed_base, means=record, keep=keep if clean else (),
                        sources=sources, delta=cfg.swap == "update")
        for (layer, st, branch), tensor in out.kept.items():
            sources.update({(job.sample, layer, st, branch): tensor[row] for row, job in enumerate(chunk)})
        if out.means is not None:
            means.update({start + r: out.means[r] for r, j in enumerate(chunk) if j.kind in ("clean", "propagation")})
        finals.extend(out.finals)
        start += len(chunk)
    assert start == len(jobs), f"ran {start} of {len(jobs)} jobs"
    tables: dict[str, pd.DataFrame] = {}
    if any(k in cfg.which for k in ("noise_step", "noise_frame", "layer_swap")):
        scored = [(j, f) for j, f in zip(jobs, finals) if j.kind != "propagation"]
        tables["interventions_samples"] = _per_sample(replay, *zip(*scored))
        table = summarise(tables["interventions_samples"], n_boot=cfg.n_boot)
        if not table.empty:
            table["swap"] = np.where(table["kind"] == "layer_swap", cfg.swap, None)
        tables["interventions"] = table
    if want_means:
        clean = np.stack([means[i] for i in range(n)])  # (sample, step, layer, d)
        perturbed = {s: np.stack([means[k] for k, j in enumerate(jobs) if j.kind == "propagation" and j.position == s])
                     for s in cfg.steps}
        tables["propagation"] = propagation_table(clean, perturbed).assign(strength=cfg.propagation_strength)
    for name, table in tables.items():
        table.attrs["cos_config"] = config_record(cfg, replay, table=name)
    return tables


def _per_sample(replay: Replay, jobs: Sequence[Job], finals: Sequence[np.ndarray]) -> pd.DataFrame:
    rows = []
    for job, final in zip(jobs, finals):
        item = replay.items[job.sample]
        rows.append({"kind": job.kind, "position": job.position, "step": job.step, "strength": job.strength,
                     "sample": job.sample, "sample_id": item.sample_id, "instance": item.instance, "seed": item.seed,
                     "partner": job.partner, **replay.score(item, final)})
    return mark_flips(pd.DataFrame(rows))


def mark_flips(table: pd.DataFrame) -> pd.DataFrame:
    """Add `flipped` (the answer differs from the sample's clean answer; unreadable counts as an answer) and
    `adopted` (flipped, to a readable answer equal to the layer-swap partner's clean answer) to a per-sample table
    whose "clean" rows hold each sample's clean answer; noise_step rows get `step` = position."""
    table = table.copy()
    clean = table[table["kind"] == "clean"].set_index("sample")["answer_key"]
    table["flipped"] = table["answer_key"].fillna("∅") != table["sample"].map(clean).fillna("∅")
    partner_key = table["partner"].map(clean)
    table["adopted"] = (table["partner"] >= 0) & table["flipped"] & table["answer_key"].notna() & \
        (table["answer_key"] == partner_key)
    table.loc[table["kind"] == "noise_step", "step"] = table["position"]
    return table


def summarise(samples: pd.DataFrame, n_boot: int = N_BOOT) -> pd.DataFrame:
    """One row per (kind, position, step) from the per-sample table: accuracy (noise kinds) or flip rate (layer swap)
    with its instance-bootstrap interval, the clean baseline, mean_score, flip_rate and adopt_rate."""
    samples = samples.reset_index(drop=True)
    group, n_groups = encode_groups(samples["instance"].to_numpy())
    weights = bootstrap_weights(n_groups, n_boot)
    clean = samples["kind"] == "clean"
    baseline = float(samples.loc[clean, "correct"].mean())
    rows = []
    for (kind, position, step), part in samples[~clean].groupby(["kind", "position", "step"], sort=True):
        metric = "flip_rate" if kind == "layer_swap" else "accuracy"
        values = part["flipped" if metric == "flip_rate" else "correct"].to_numpy(dtype=float)
        value, low, high = group_mean_ci(values, group[part.index], n_groups, weights)
        rows.append({"kind": kind, "position": int(position), "step": int(step), "value": float(value),
                     "ci_low": float(low), "ci_high": float(high), "n": len(part),
                     "n_instances": part["instance"].nunique(), "baseline": baseline, "metric": metric,
                     "mean_score": float(part["score"].mean()), "flip_rate": float(part["flipped"].mean()),
                     "adopt_rate": float(part["adopted"].mean()) if kind == "layer_swap" else np.nan,
                     "strength": float(part["strength"].iloc[0])})
    return pd.DataFrame(rows)


def config_record(config: InterventionConfig, replay: Replay, **extra: Any) -> str:
    """The JSON stored as each table's `cos_config` parquet metadata."""
    from .. import __version__

    return json.dumps({"cos_version": __version__, "run_id": replay.archive.run_id,
                       "config": dataclasses.asdict(config), "n_samples": len(replay.items),
                       "instances": sorted({it.instance for it in replay.items}), "call": replay.call_kwargs,
                       **extra}, sort_keys=True, default=str)
