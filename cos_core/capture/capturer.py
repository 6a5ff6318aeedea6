"""Hooks that record a diffusers video pipeline step by step without changing what it generates.

Owns `CaptureSpec` (what to record) and `Capturer`, a context manager that wraps `scheduler.step` (x_t, guided v̂,
x̂0, σ, t), follows each expert's CFG branch and hooks every block (hidden states reduced on the device), all through
`hooks.py`, removed in `finally`. The step index comes from the pipeline's `callback_on_step_end`; hooks only predict
it. Imports torch; diffusers only through the pipeline it is given; never streamlit, analysis or experiments.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..archive.schema import BRANCHES, STEP_TENSORS, act_key, token_key
from . import families as fam
from .context_parallel import check_tokens, gather_tokens
from .hooks import BranchTracker, hooked, patched
from .reductions import DEFAULT, Reducer, check_reduction
from .selection import select

log = logging.getLogger(__name__)
SITE = "block_out"
STORE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class CaptureSpec:
    """What to record. `layers`, `steps`, `tensor_steps`: None (all), an index, "a:b[:c]", "1,5,9", a list, or a
    predicate; resolved once against the model (`select`). `tokens`: (layer, step) pairs kept in full."""

    layers: Any = None
    steps: Any = None
    branches: tuple[str, ...] = BRANCHES
    reductions: tuple[str, ...] = DEFAULT
    tokens: tuple[tuple[int, int], ...] = ()
    tensors: tuple[str, ...] = STEP_TENSORS
    tensor_steps: Any = None
    proj_seed: int = 0
    store_dtype: str = "float32"  # reductions and x_t/v_hat/x0_hat as stored: float32, or float16 (half the bytes)

    def __post_init__(self):
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype {self.store_dtype!r} is not allowed; allowed: {STORE_DTYPES}")
        for b in self.branches:
            if b not in BRANCHES:
                raise ValueError(f"branch {b!r} is not allowed; allowed: {BRANCHES}")
        for name in self.tensors:
            if name not in STEP_TENSORS:
                raise ValueError(f"step tensor {name!r} is not allowed; allowed: {STEP_TENSORS}")
        for r in self.reductions:
            check_reduction(r)
        for pair in self.tokens:
            if len(pair) != 2:
                raise ValueError(f"tokens entry {pair!r} must be a (layer, step) pair")


@dataclass
class _Sample:
    """Per-sample state, reset by `Capturer.begin_sample`."""

    step: int = 0                                      # predicted index of the step now running
    steps: list[dict] = field(default_factory=list)    # confirmed {step, t, sigma, expert}
    pending: dict | None = None                        # scheduler record of the running step
    expert: str | None = None
    grid: tuple[int, int, int] | None = None
    latent_fhw: tuple[int, int, int] | None = None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    filled: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    final: torch.Tensor | None = None
    dim: int | None = None
    token_dtype: str | None = None
    devices: set = field(default_factory=set)           # CUDA devices the host copies were issued from


class Capturer:
    """`with Capturer(pipe, spec) as cap:` then per sample `cap.begin_sample()`, run the pipeline with
    `callback_on_step_end=cap.callback()` and `callback_on_step_end_tensor_inputs=["latents"]`, then
    `tensors, layout = cap.end_sample()`."""

    def __init__(self, pipe: Any, spec: CaptureSpec, n_steps: int | None = None, members: int = 1):
        """`members`: videos per pipeline call, of which the first is recorded (a latent ensemble runs its n
        members in one call; see `cos_core.experiments.merge`)."""
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.pipe, self.spec, self.members = pipe, spec, members
        self.family = fam.family_of(pipe)
        self.rule = fam.x0_rule(pipe.scheduler)
        self.experts = fam.experts(pipe)
        counts = {name: len(fam.blocks(self.family, m)) for name, m in self.experts}
        if len(set(counts.values())) != 1:
            raise ValueError(f"experts have different block counts {counts}; cannot index layers jointly")
        self.n_layers = next(iter(counts.values()))
        self.layers = select(spec.layers, self.n_layers, "layer")
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        token_layers = {select(layer, self.n_layers, "token layer")[0] for layer, _ in spec.tokens}
        self._hooked = set(self.layers) | token_layers  # full tokens may come from layers that are not reduced
        self.reducer = Reducer(spec.reductions, spec.proj_seed)
        self.store = getattr(torch, spec.store_dtype)
        self.n_steps: int | None = None
        if n_steps is not None:
            self._resolve_steps(n_steps)
        self._pool: dict[str, torch.Tensor] = {}  # host buffers reused across samples (pinned allocs are slow)
        self._branch = BranchTracker()  # the CFG branch of the transformer call now running (separate-call families)
        self._installed = contextlib.ExitStack()
        self.s = _Sample()

    # ---- selection -----------------------------------------------------------------------------------------
    def _resolve_steps(self, n_steps: int) -> None:
        if self.n_steps == n_steps:
            return
        self.n_steps = n_steps
        self.act_steps = select(self.spec.steps, n_steps, "step")
        self.tensor_steps = select(self.spec.tensor_steps, n_steps, "tensor step")
        self._act_pos = {s: i for i, s in enumerate(self.act_steps)}
        self._tensor_pos = {s: i for i, s in enumerate(self.tensor_steps)}
        self.token_pairs = {(int(l), int(select(s, n_steps, "token step")[0])) for l, s in self.spec.tokens}

    # ---- install / remove --------------------------------------------------------------------------------
    def __enter__(self) -> "Capturer":
        with contextlib.ExitStack() as stack:  # a failure half-way removes what was installed so far
            for name, module in self.experts:
                stack.enter_context(hooked(module, self._pre_hook(name), pre=True, with_kwargs=True))
                stack.enter_context(self._branch.track(module))
                for layer, block in enumerate(fam.blocks(self.family, module)):
                    if layer in self._hooked:
                        stack.enter_context(hooked(block, self._block_hook(layer, module)))
            stack.enter_context(patched(self.pipe.scheduler, "step", self._wrap_step))
            self._installed = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._installed.close()

    @property
    def _videos(self) -> str:
        return "one video" if self.members == 1 else f"{self.members} videos (an ensemble's members)"

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _pre_hook(self, expert: str) -> Callable:
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._resolve_steps(len(self.pipe.scheduler.timesteps))
            self.s.expert = expert
            self.s.grid = fam.token_grid(self.family, module, hidden, kwargs)
            pt, ph, pw = self.family.patch(module.config)
            f, h, w = self.s.grid
            self.s.latent_fhw = (f * pt, h * ph, w * pw)
            check_tokens(module, f * h * w)
        return hook

    def _branches(self, batch: int) -> list[tuple[str, int]]:
        """[(branch, batch index)] for one transformer call, from the family's CFG layout."""
        name, m = self._branch.name, self.members
        if self.family.batched_cfg:
            if batch == 2 * m:
                return [("uncond", 0), ("cond", m)]
            if batch == m:
                return [("cond", 0)]
        elif batch == m and name in ("cond", "uncond"):
            return [(name, 0)]
        raise ValueError(f"cannot label CFG branches: a transformer call with batch {batch} in context {name!r} "
                         f"({self.family.name}); cos capture runs {self._videos} per pipeline call")

    def _block_hook(self, layer: int, expert: Any) -> Callable:
        def hook(module, args, output):
            step = self.s.step
            if (step not in self._act_pos or layer not in self._layer_pos) and (layer, step) not in self.token_pairs:
                return
            hidden = output[0] if isinstance(output, tuple) else output  # (B, tokens, d)
            hidden = gather_tokens(expert, hidden)  # context parallelism: this rank's shard → all tokens
            f, h, w = self.s.grid
            if hidden.shape[1] != f * h * w:
                raise ValueError(f"block {layer} returned {hidden.shape[1]} tokens, expected {f * h * w} video "
                                 f"tokens for grid {self.s.grid} ({self.family.name})")
            self.s.dim = int(hidden.shape[-1])
            for branch, i in self._branches(hidden.shape[0]):
                if branch in self.spec.branches:
                    self._record_block(layer, step, branch, hidden[i:i + 1])
        return hook

    def _record_block(self, layer: int, step: int, branch: str, hidden: torch.Tensor) -> None:
        if step in self._act_pos and layer in self._layer_pos:
            index = (self._act_pos[step], self._layer_pos[layer])
            lead = (len(self.act_steps), len(self.layers))
            for name, value in self.reducer(hidden, self.s.grid).items():
                self._store(act_key(SITE, name, branch), lead, index, value[0].to(self.store))
        if (layer, step) in self.token_pairs:
            tokens = hidden[0].view(*self.s.grid, -1)  # (frame, row, col, d)
            self.s.token_dtype = str(tokens.dtype).removeprefix("torch.")
            self._store(token_key(SITE, layer, step, branch), (), (), tokens)

    def _store(self, key: str, lead: tuple, index: tuple, value: torch.Tensor) -> None:
        """Asynchronous copy of a device tensor into a (pinned) host buffer of shape lead + value.shape."""
        buf = self.s.buffers.get(key)
        if buf is None:
            shape = (*lead, *value.shape)
            buf = self._pool.get(key)
            if buf is None or tuple(buf.shape) != shape or buf.dtype != value.dtype:
                buf = torch.empty(shape, dtype=value.dtype, pin_memory=value.is_cuda)
                self._pool[key] = buf
            self.s.buffers[key] = buf
            self.s.filled[key] = np.zeros(lead or (1,), dtype=bool)
            self.s.shapes[key] = list(value.shape)
        buf[index].copy_(value, non_blocking=True)
        if value.is_cuda:
            self.s.devices.add(value.device)
        self.s.filled[key][index or (0,)] = True

    def _wrap_step(self, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)  # pipelines inspect step's signature to decide whether to pass generator/eta
        def step(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            model_output, t, sample = (bound.arguments[k] for k in ("model_output", "timestep", "sample"))
            self._record_step(model_output, t, sample)
            return original(*args, **kwargs)
        return step

    def _record_step(self, model_output: torch.Tensor, t: Any, sample: torch.Tensor) -> None:
        scheduler, step = self.pipe.scheduler, self.s.step
        self._resolve_steps(len(scheduler.timesteps))
        if sample.shape[0] != self.members:
            raise ValueError(f"cos capture runs {self._videos} per pipeline call; got a batch of {sample.shape[0]}")
        self.s.pending = {"step": step, "t": float(t), "sigma": fam.sigma_of(scheduler, self.rule, step, t),
                          "expert": self.s.expert}
        if step in self._tensor_pos:
            values = {"x_t": sample, "v_hat": model_output}
            if "x0_hat" in self.spec.tensors:
                values["x0_hat"] = fam.x0_hat(scheduler, self.rule, step, t, sample, model_output)
            for name in self.spec.tensors:
                value = fam.to_cfhw(self.family, self.pipe, values[name], self.s.latent_fhw)[0].to(self.store)
                self._store(name, (len(self.tensor_steps),), (self._tensor_pos[step],), value)

    # ---- the step clock ------------------------------------------------------------------------------------
    def callback(self, user: Callable | None = None) -> Callable:
        """A `callback_on_step_end` that confirms the step index and chains the user's callback."""
        def on_step_end(pipe, i, t, callback_kwargs):
            if i != self.s.step or self.s.pending is None:
                raise RuntimeError(f"capture lost the step clock: the pipeline finished step {i} while hooks "
                                   f"recorded step {self.s.step} (scheduler stepped: {self.s.pending is not None})")
            self.s.steps.append(self.s.pending)
            self.s.pending = None
            if i == self.n_steps - 1:
                latents = callback_kwargs["latents"]
                self.s.final = fam.to_cfhw(self.family, pipe, latents, self.s.latent_fhw)[0].float().cpu()
            self.s.step = i + 1
            return user(pipe, i, t, callback_kwargs) if user is not None else {}
        return on_step_end

    def begin_sample(self) -> None:
        self.s = _Sample()

    def end_sample(self, copy: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Wait for the host copies and return (tensors by archive key, layout for the manifest).

        With copy=False the arrays share memory with buffers that the next sample overwrites: consume them
        (write the shard) before the next `begin_sample`."""
        s = self.s
        if self.n_steps is None or len(s.steps) != self.n_steps or s.final is None:
            raise RuntimeError(f"sample ended after {len(s.steps)} of {self.n_steps} steps; was the pipeline run "
                               "with callback_on_step_end=cap.callback() and tensor inputs ['latents']?")
        for device in s.devices:  # blocks may live on several GPUs (device_map placement); touch no other GPU
            torch.cuda.synchronize(device)
        for key, mask in s.filled.items():
            if not mask.all():
                raise RuntimeError(f"{key}: {int((~mask).sum())} cells never written (hooks missed calls)")
        tensors = {key: _to_numpy(buf.clone() if copy else buf) for key, buf in s.buffers.items()}
        tensors["final"] = s.final.numpy()
        return tensors, self._layout(tensors)

    def _layout(self, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        s = self.s
        c, f, h, w = tensors["final"].shape
        pt, ph, pw = self.family.patch(self.pipe.transformer.config)
        branches = [b for b in BRANCHES if any(k.endswith(f"/{b}") for k in tensors)]
        reductions = {r: {"shape": s.shapes[act_key(SITE, r, branches[0])]} for r in self.spec.reductions} \
            if branches else {}
        site = {"n_layers": self.n_layers, "layers": list(self.layers), "steps": list(self.act_steps),
                "branches": branches, "dim": s.dim, "dtype": self.spec.store_dtype, "reductions": reductions,
                "tokens": sorted([list(p) for p in self.token_pairs]), "token_dtype": s.token_dtype}
        return {
            "steps": s.steps, "n_steps": self.n_steps, "x0_rule": self.rule, "family": self.family.name,
            "latent": {"channels": c, "frames": f, "height": h, "width": w},
            "token_grid": {"frames": s.grid[0], "rows": s.grid[1], "cols": s.grid[2], "patch": [pt, ph, pw]},
            "tensors": {n: {"steps": list(self.tensor_steps), "dtype": self.spec.store_dtype, "shape": [c, f, h, w]}
                        for n in self.spec.tensors},
            "sites": {SITE: site},
        }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the exact bits as uint16 (archive token_dtype)
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()

