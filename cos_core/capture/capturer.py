"""Hooks that record a diffusers video pipeline step by step without changing what it generates.

Owns `CaptureSpec` (what to record), `Captured` (one item's tensors and layout) and `Capturer`, a context manager
that wraps `scheduler.step` (x_t as the model saw it, guided v̂, the x̂0 the sampler used, σ, t), follows each
expert's CFG branch, hooks every block (hidden states reduced on the device, split by item and branch) and flags
blocks a diffusers cache skipped, all through `hooks.py`, removed in `finally`. The step index comes from the
pipeline's `callback_on_step_end`; hooks only predict it. Imports torch; diffusers only through the pipeline it is
given; never streamlit, analysis or experiments.
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

from ..archive.schema import BRANCHES, STEP_TENSORS, act_key, skip_key, token_key
from . import batching
from . import families as fam
from .context_parallel import check_tokens, gather_tokens
from .hooks import BranchTracker, SkipTracker, hooked, patched
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


@dataclass(frozen=True)
class Captured:
    """One item of a pipeline call: `tensors` by archive key (numpy) and `layout` (capture's manifest keys);
    `output` is what the pipeline returned for the whole call (set by `Capturer.run`)."""

    tensors: dict[str, np.ndarray]
    layout: dict[str, Any]
    output: Any = None


@dataclass
class _Call:
    """State of one pipeline call over `n_items` work items, reset by `Capturer.begin_batch`."""

    n_items: int = 1
    step: int = 0                                      # predicted index of the step now running
    steps: list[dict] = field(default_factory=list)    # confirmed {step, t, sigma, expert}
    pending: dict | None = None                        # scheduler record of the running step
    expert: str | None = None
    grid: tuple[int, int, int] | None = None
    latent_fhw: tuple[int, int, int] | None = None
    batch: int = 0                                     # rows of the transformer call now running
    item: int = -1                                     # per-item forward: the item whose rows run now (-1: all)
    conditioning: tuple | None = None                  # (condition, mask) of a pipeline that overwrites frames
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)   # key -> (item, *lead, *shape)
    filled: dict[str, np.ndarray] = field(default_factory=dict)      # key -> (item, *lead) bool
    shapes: dict[str, list[int]] = field(default_factory=dict)
    final: torch.Tensor | None = None                  # (item, C, F, H, W) float32 on the CPU
    dim: int | None = None
    token_dtype: str | None = None
    devices: set = field(default_factory=set)           # CUDA devices the host copies were issued from


class Capturer:
    """`with Capturer(pipe, spec) as cap:` then `cap.run(**pipeline_kwargs)` for one item, or per call
    `cap.begin_batch(n)`, the pipeline run with `callback_on_step_end=cap.callback(user_callback)` and
    `callback_on_step_end_tensor_inputs` holding "latents", then `cap.end_batch(output)` (docs/capture.md)."""

    def __init__(self, pipe: Any, spec: CaptureSpec, n_steps: int | None = None, members: int = 1,
                 per_item: bool = False):
        """`members`: videos per item (a latent ensemble runs its n members in one call and the first is
        recorded; see `cos_core.experiments.merge`). `per_item`: inside a batched call run each item's rows through
        the transformer on their own, so each item is bit-identical to an unbatched capture (CPU kernels are not
        batch-invariant); otherwise one joint forward (fast; items agree to the kernels' rounding)."""
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.pipe, self.spec, self.members, self.per_item = pipe, spec, members, per_item
        self.family = fam.family_of(pipe)
        self.rule = fam.x0_rule(pipe.scheduler)
        self.x0_source: str | None = None  # "scheduler" or "rule", fixed by the first step
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
        self._pool: dict[str, torch.Tensor] = {}  # host buffers reused across calls (pinned allocs are slow)
        self._branch = BranchTracker()  # the CFG branch of the transformer call now running (separate-call families)
        self._skips = SkipTracker() if any(SkipTracker.cached(m) for _, m in self.experts) else None
        self._installed = contextlib.ExitStack()
        self.s = _Call()

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
                stack.enter_context(hooked(module, self._post_hook(module)))
                stack.enter_context(self._branch.track(module))
                if self.per_item:
                    stack.enter_context(patched(module, "forward", self._split))
                for layer, block in enumerate(fam.blocks(self.family, module)):
                    if self._skips is not None:
                        stack.enter_context(self._skips.track(block))
                    if layer in self._hooked:
                        stack.enter_context(hooked(block, self._block_hook(layer, module)))
            stack.enter_context(patched(self.pipe.scheduler, "step", self._wrap_step))
            if getattr(getattr(self.pipe, "config", None), "expand_timesteps", False):
                stack.enter_context(patched(self.pipe, "prepare_latents", self._wrap_prepare))
            self._installed = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._installed.close()

    def _split(self, original: Callable) -> Callable:
        def on_item(k: int) -> None:
            self.s.item = k
        return batching.per_item_forward(original, lambda: self.s.n_items, self.family.batched_cfg, self.members,
                                         on_item)

    def _wrap_prepare(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def prepare_latents(*args, **kwargs):
            prepared = original(*args, **kwargs)
            self.s.conditioning = fam.conditioning_of(self.pipe, prepared)
            return prepared
        return prepare_latents

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _pre_hook(self, expert: str) -> Callable:
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._resolve_steps(len(self.pipe.scheduler.timesteps))
            self.s.expert = expert
            self.s.batch = int(hidden.shape[0])
            self.s.grid = fam.token_grid(self.family, module, hidden, kwargs)
            pt, ph, pw = self.family.patch(module.config)
            f, h, w = self.s.grid
            self.s.latent_fhw = (f * pt, h * ph, w * pw)
            check_tokens(module, f * h * w)
        return hook

    def _rows(self, batch: int) -> tuple[int, list[tuple[str, slice]]]:
        """(first item, [(branch, rows)]) of the transformer call now running (one item's call under per_item)."""
        s = self.s
        first, n = (s.item, 1) if s.item >= 0 else (0, s.n_items)
        return first, batching.rows(self.family.batched_cfg, self._branch.name, batch, n, self.members)

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
            skipped = self._skips is not None and self._skips.skipped(module)
            first, parts = self._rows(hidden.shape[0])
            for branch, rows in parts:
                if branch in self.spec.branches:
                    self._record_block(layer, step, branch, hidden[rows], first, skipped)
        return hook

    def _post_hook(self, expert: Any) -> Callable:
        """After a transformer call under a block-skipping cache: the leader block's output carried the skipped
        blocks' cached residual, so its cells of this call are flagged too."""
        def hook(module, args, output):
            step, blocks = self.s.step, fam.blocks(self.family, expert)
            if self._skips is None or step not in self._act_pos or not any(map(self._skips.skipped, blocks)):
                return
            for layer, block in enumerate(blocks):
                if layer in self._layer_pos and self._skips.leads(block):
                    for branch, _ in batching.rows(self.family.batched_cfg, self._branch.name, self.s.batch,
                                                   self.s.n_items, self.members):
                        key = skip_key(SITE, branch)
                        if key in self.s.buffers:
                            self.s.buffers[key][:, self._act_pos[step], self._layer_pos[layer]] = 1
        return hook

    def _record_block(self, layer: int, step: int, branch: str, hidden: torch.Tensor, first: int,
                      skipped: bool) -> None:
        n = hidden.shape[0]
        if step in self._act_pos and layer in self._layer_pos:
            index = (self._act_pos[step], self._layer_pos[layer])
            lead = (len(self.act_steps), len(self.layers))
            for name, value in self.reducer(hidden, self.s.grid).items():
                self._store(act_key(SITE, name, branch), lead, index, value.to(self.store), first)
            self._store(skip_key(SITE, branch), lead, index, torch.full((n,), int(skipped), dtype=torch.uint8),
                        first)
        if (layer, step) in self.token_pairs:
            tokens = hidden.reshape(n, *self.s.grid, -1)  # (item, frame, row, col, d)
            self.s.token_dtype = str(tokens.dtype).removeprefix("torch.")
            self._store(token_key(SITE, layer, step, branch), (), (), tokens, first)

    def _store(self, key: str, lead: tuple, index: tuple, value: torch.Tensor, first: int = 0) -> None:
        """Asynchronous copy of a device tensor (items first..first+len(value)) into a (pinned) host buffer of shape
        (n_items, *lead, *value.shape[1:])."""
        s = self.s
        buf = s.buffers.get(key)
        if buf is None:
            shape = (s.n_items, *lead, *value.shape[1:])
            buf = self._pool.get(key)
            if buf is None or tuple(buf.shape) != shape or buf.dtype != value.dtype:
                buf = torch.empty(shape, dtype=value.dtype, pin_memory=value.is_cuda)
                self._pool[key] = buf
            s.buffers[key] = buf
            s.filled[key] = np.zeros((s.n_items, *lead), dtype=bool)
            s.shapes[key] = list(value.shape[1:])
        items = slice(first, first + value.shape[0])
        buf[(items, *index)].copy_(value, non_blocking=True)
        if value.is_cuda:
            s.devices.add(value.device)
        s.filled[key][(items, *index)] = True

    def _wrap_step(self, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)  # pipelines inspect step's signature to decide whether to pass generator/eta
        def step(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            model_output, t, sample = (bound.arguments[k] for k in ("model_output", "timestep", "sample"))
            result = original(*args, **kwargs)
            self._record_step(model_output, t, sample, fam.own_x0(result, sample))
            return result
        return step

    def _record_step(self, model_output: torch.Tensor, t: Any, sample: torch.Tensor, own: Any) -> None:
        scheduler, step, s = self.pipe.scheduler, self.s.step, self.s
        self._resolve_steps(len(scheduler.timesteps))
        width = s.n_items * self.members
        if sample.shape[0] != width:
            raise ValueError(f"the pipeline call runs a batch of {sample.shape[0]}, capture expected {s.n_items} "
                             f"item(s) x {self.members} video(s); pass the item count to begin_batch")
        s.pending = {"step": step, "t": float(t), "sigma": fam.sigma_of(scheduler, self.rule, step, t),
                     "expert": s.expert}
        source = "scheduler" if own is not None else "rule"
        if self.x0_source not in (None, source):
            raise RuntimeError(f"the scheduler returned its own x̂0 at some steps only (step {step}: {source})")
        self.x0_source = source
        if step in self._tensor_pos:
            seen = fam.blend(s.conditioning, sample)  # x_t as the model saw it (conditioning frames written in)
            values = {"x_t": seen, "v_hat": model_output}
            if "x0_hat" in self.spec.tensors:
                x0 = own if own is not None else fam.x0_hat(scheduler, self.rule, step, t, sample, model_output)
                values["x0_hat"] = fam.blend(s.conditioning, x0)
            for name in self.spec.tensors:
                value = fam.to_cfhw(self.family, self.pipe, values[name], s.latent_fhw)[::self.members]
                self._store(name, (len(self.tensor_steps),), (self._tensor_pos[step],), value.to(self.store))

    # ---- the step clock ------------------------------------------------------------------------------------
    def callback(self, user: Callable | None = None) -> Callable:
        """A `callback_on_step_end` that confirms the step index, then runs the user's callback; at the last step
        it keeps the latents the pipeline will return (after the user's edits and any conditioning overwrite)."""
        def on_step_end(pipe, i, t, callback_kwargs):
            s = self.s
            if i != s.step or s.pending is None:
                raise RuntimeError(f"capture lost the step clock: the pipeline finished step {i} while hooks "
                                   f"recorded step {s.step} (scheduler stepped: {s.pending is not None})")
            s.steps.append(s.pending)
            s.pending = None
            outputs = user(pipe, i, t, callback_kwargs) if user is not None else {}
            if i == self.n_steps - 1:
                latents = (outputs or {}).get("latents", callback_kwargs["latents"])
                s.final = self._final(latents)
            s.step = i + 1
            return outputs if outputs is not None else {}
        return on_step_end

    def _final(self, latents: torch.Tensor) -> torch.Tensor:
        latents = fam.blend(self.s.conditioning, latents)
        return fam.to_cfhw(self.family, self.pipe, latents, self.s.latent_fhw)[::self.members].float().cpu()

    def begin_batch(self, n_items: int = 1) -> None:
        if n_items < 1:
            raise ValueError(f"a pipeline call needs at least one item, got {n_items}")
        self.s = _Call(n_items=n_items)

    def begin_sample(self) -> None:
        self.begin_batch(1)

    def run(self, **kwargs: Any) -> Captured:
        """Run the pipeline once for one item with capture on (your `callback_on_step_end` is chained) and return
        what it recorded; `output` is the pipeline's return value."""
        user = kwargs.pop("callback_on_step_end", None)
        inputs = list(dict.fromkeys(["latents", *kwargs.pop("callback_on_step_end_tensor_inputs", ())]))
        self.begin_batch(1)
        output = self.pipe(**kwargs, callback_on_step_end=self.callback(user),
                           callback_on_step_end_tensor_inputs=inputs)
        latent = output if kwargs.get("output_type") == "latent" else None
        (one,) = self.end_batch(latent)
        return Captured(one.tensors, one.layout, output)

    def end_batch(self, output: Any = None, copy: bool = True) -> list[Captured]:
        """Wait for the host copies and return one `Captured` per item.

        `output`: what the pipeline returned when called with output_type="latent" (it then becomes `final`;
        without it `final` is the latent the last step callback saw, conditioning frames written in). With
        copy=False the arrays share memory with buffers the next call overwrites: consume them first."""
        s = self.s
        if self.n_steps is None or len(s.steps) != self.n_steps or s.final is None:
            raise RuntimeError(f"sample ended after {len(s.steps)} of {self.n_steps} steps; was the pipeline run "
                               "with callback_on_step_end=cap.callback() and tensor inputs ['latents']?")
        for device in s.devices:  # blocks may live on several GPUs (device_map placement); touch no other GPU
            torch.cuda.synchronize(device)
        for key, mask in s.filled.items():
            if not mask.all():
                raise RuntimeError(f"{key}: {int((~mask).sum())} cells never written (hooks missed calls)")
        final = s.final
        if output is not None:
            latents = output[0] if isinstance(output, tuple) else getattr(output, "frames", output)
            final = fam.to_cfhw(self.family, self.pipe, latents, s.latent_fhw)[::self.members].float().cpu()
        out = []
        for k in range(s.n_items):
            tensors = {key: _to_numpy(buf[k].clone() if copy else buf[k]) for key, buf in s.buffers.items()}
            tensors["final"] = final[k].numpy()
            out.append(Captured(tensors, self._layout(tensors)))
        return out

    def end_sample(self, output: Any = None, copy: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """`end_batch` of a one-item call, as (tensors, layout)."""
        (one,) = self.end_batch(output, copy)
        return one.tensors, one.layout

    def _layout(self, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        s = self.s
        c, f, h, w = tensors["final"].shape
        pt, ph, pw = self.family.patch(fam.unwrap(self.pipe.transformer).config)
        branches = [b for b in BRANCHES if any(k.endswith(f"/{b}") for k in tensors)]
        reductions = {r: {"shape": s.shapes[act_key(SITE, r, branches[0])]} for r in self.spec.reductions} \
            if branches else {}
        site = {"n_layers": self.n_layers, "layers": list(self.layers), "steps": list(self.act_steps),
                "branches": branches, "dim": s.dim, "dtype": self.spec.store_dtype, "reductions": reductions,
                "tokens": sorted([list(p) for p in self.token_pairs]), "token_dtype": s.token_dtype}
        return {
            "steps": s.steps, "n_steps": self.n_steps, "x0_rule": self.rule, "x0_source": self.x0_source,
            "family": self.family.name, "conditioning_frames": fam.conditioning_frames(s.conditioning),
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
