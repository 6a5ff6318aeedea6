"""The latent ensemble's merge operators: n consecutive batch members share their latent during the first k steps
(mean of x_t, of v̂, or of x̂0 re-noised), and a capture of such an ensemble's member 0 (`cos capture --ensemble`).

Owns `merged_steps` (a wrapper around a deterministic flow-matching scheduler's `step`, installed through
`capture.hooks.patched`), the group mean, the noise-mean start, `MergeSpec` and `merged_capture`. Imports torch and
capture; never streamlit, diffusers (the scheduler is recognised by its class name) or analysis.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch

from ..capture.hooks import patched
from ..capture.sources import Source

MERGES = ("mean_x_t", "mean_v_hat", "mean_x0_hat")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


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
    ε̂ = x_t + (1 − σ) v̂. σ, σ_next are read from the scheduler's `sigmas` at its `step_index`, as it does.
    The wrapper goes on through `capture.hooks.patched`, so someone else's wrapper stays in place after ours."""
    check_flow_matching(scheduler)
    if method not in MERGES:
        raise ValueError(f"merge method {method!r} unknown; allowed: {', '.join(MERGES)}")

    def wrap(original: Callable) -> Callable:
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
        return step

    with patched(scheduler, "step", wrap):
        yield


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
