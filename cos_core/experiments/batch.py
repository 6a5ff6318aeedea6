"""One pipeline call for many (sample, intervention) jobs. Owns `Job`, `plan_batches` (every job runs beside the
clean rows it reads: a patch's donor, a perturbed run's clean twin), `BlockHooks` (forward hooks on every block,
removed in `finally`: token means, per-token and per-frame distances to the clean twin on the device, and patches
that add a donor's block update, a random update of the same per-token norm, or copy the donor's output) and
`run_batch`. Imports torch and capture.hooks; never streamlit, diffusers or analysis.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..capture.hooks import BranchTracker, hooked
from .noise import Mixer, NoiseJob, counter_normal, noise_key

PATCH_KINDS = ("layer_swap", "patch")  # rows that take a donor row's block contribution at (position, step)
CARRY = ("update", "output", "random")  # donor's update (output - input), its whole output, a random update
NOISE_OF = {"propagation": "renoise_step"}  # a propagation run is the renoise_step run of its λ, on the same ε


@dataclass(frozen=True)
class Job:
    """One sample under one intervention; kind "clean" runs it untouched. `position` is the step (noise_step,
    renoise_step, propagation), latent frame (noise_frame, renoise_frame) or layer (layer_swap, patch); patches act
    at `step` and read the donor sample `partner`'s clean row; `carry` says what they carry (see `CARRY`);
    `frames` restricts a patch to the tokens of those latent frames (empty: every token); `tag` names the
    comparison a job belongs to (a patch's null, a donor's role)."""

    sample: int
    kind: str = "clean"
    position: int = -1
    strength: float = 0.0
    step: int = -1
    partner: int = -1
    carry: str = "update"
    frames: tuple[int, ...] = ()
    tag: str = ""

    def needs(self) -> tuple[int, ...]:
        """Samples whose clean rows must run in the same call."""
        if self.kind in PATCH_KINDS:
            return (self.partner,)
        if self.kind == "propagation":
            return (self.sample,)
        return ()


def plan_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Pack `jobs` (clean ones included) into calls of at most `batch_size` rows, each call holding the clean rows its
    jobs need (repeated in another call when needed there too). Jobs keep their order; every sample that has a clean
    job in `jobs` keeps one clean row (the first call it is in gives its clean answer)."""
    if batch_size < 2 and any(j.needs() for j in jobs):
        raise ValueError(f"batch_size {batch_size} cannot hold a job beside the clean row it reads; use >= 2")
    batches: list[list[Job]] = []
    rows: list[Job] = []
    clean_in: set[int] = set()
    for job in jobs:
        if job.kind == "clean":
            if job.sample in clean_in:
                continue
            extra = [job]
        else:
            extra = [Job(s) for s in dict.fromkeys(job.needs()) if s not in clean_in] + [job]
        if rows and len(rows) + len(extra) > batch_size:
            batches.append(rows)
            rows, clean_in = [], set()
            extra = ([job] if job.kind == "clean" else [Job(s) for s in dict.fromkeys(job.needs())] + [job])
        rows += extra
        clean_in |= {j.sample for j in extra if j.kind == "clean"}
    if rows:
        batches.append(rows)
    return batches


@dataclass
class Patch:
    """Rows patched at one (layer, step): row i takes from donor row donors[i] per `carry`, on `tokens` (None: all)."""

    rows: list[int] = field(default_factory=list)
    donors: list[int] = field(default_factory=list)
    carry: list[str] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    tokens: list[np.ndarray | None] = field(default_factory=list)

    def mask(self, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        """(row, token, 1) bool: the tokens each row patches; None when every row patches every token."""
        if all(t is None for t in self.tokens):
            return None
        mask = torch.zeros(len(self.rows), n_tokens, 1, dtype=torch.bool, device=device)
        for i, tokens in enumerate(self.tokens):
            mask[i, slice(None) if tokens is None else torch.as_tensor(tokens, device=device)] = True
        return mask


class BlockHooks:
    """Forward hooks on every transformer block for one batch, removed in `finally` (`__exit__`).

    means: the cond branch's token-mean output of every block at every step -> `means` (B, step, layer, d);
    twins: {row: clean row} -> `token_dist` and `frame_dist` (B, step, layer): mean over tokens (frames) of
    |h_row − h_clean|₂ divided by the mean of |h_clean|₂, cond branch, on the device;
    patches: {(layer, step): Patch}. The step comes from `step()` (the pipeline's callback), the CFG branch from the
    transformer's cache_context."""

    def __init__(self, transformer: Any, step: Callable[[], int], n_steps: int, n_frames: int, *,
                 means: bool = False, twins: dict[int, int] | None = None, patches: dict | None = None):
        self.transformer, self.step, self.n_steps, self.n_frames = transformer, step, n_steps, n_frames
        self.want_means, self.twins, self.patches = means, twins or {}, patches or {}
        self.means: torch.Tensor | None = None
        self.token_dist: torch.Tensor | None = None
        self.frame_dist: torch.Tensor | None = None
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

    def _zeros(self, hidden: torch.Tensor, *tail: int) -> torch.Tensor:
        n_layers = len(self.transformer.blocks)
        return torch.zeros(hidden.shape[0], self.n_steps, n_layers, *tail, device=hidden.device)

    def _record(self, layer: int, step: int, hidden: torch.Tensor) -> None:
        if self.want_means:
            if self.means is None:
                self.means = self._zeros(hidden, hidden.shape[-1])
            self.means[:, step, layer] = hidden.float().mean(1)
        if self.twins:
            if self.token_dist is None:
                self.token_dist, self.frame_dist = self._zeros(hidden), self._zeros(hidden)
                self._rows = torch.as_tensor(list(self.twins), device=hidden.device)
                self._clean = torch.as_tensor(list(self.twins.values()), device=hidden.device)
                assert hidden.shape[1] % self.n_frames == 0, f"{hidden.shape[1]} tokens in {self.n_frames} frames"
            rows = self._rows
            clean = hidden[self._clean].float()  # (R, T, d)
            moved = hidden[rows].float() - clean
            scale = clean.norm(dim=-1).mean(-1).clamp_min(1e-12)  # (R,)
            self.token_dist[rows, step, layer] = moved.norm(dim=-1).mean(-1) / scale
            per_frame = hidden.shape[1] // self.n_frames
            frame_moved = moved.reshape(len(rows), self.n_frames, per_frame, -1).mean(2)  # (R, F, d)
            frame_clean = clean.reshape(len(rows), self.n_frames, per_frame, -1).mean(2)
            self.frame_dist[rows, step, layer] = (frame_moved.norm(dim=-1).mean(-1)
                                                  / frame_clean.norm(dim=-1).mean(-1).clamp_min(1e-12))

    def _patch(self, patch: Patch, layer: int, step: int, inputs: torch.Tensor, hidden: torch.Tensor
               ) -> torch.Tensor:
        device = hidden.device
        rows, donors = (torch.as_tensor(v, device=device) for v in (patch.rows, patch.donors))
        carry = np.array(patch.carry)
        own = hidden[rows].float()  # (R, T, d)
        delta = (hidden[donors].float() - inputs[donors].float()) - (own - inputs[rows].float())  # update change
        random = torch.as_tensor(np.flatnonzero(carry == "random"), device=device)
        if len(random):  # the same per-token norm in a random direction
            keys = torch.as_tensor(patch.keys)[random.cpu()]
            noise = counter_normal(keys, step * 4096 + layer, tuple(delta.shape[1:]), device)  # (R', T, d)
            size = delta[random].norm(dim=-1, keepdim=True)
            delta[random] = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * size
        new = own + delta
        whole = torch.as_tensor(carry == "output", device=device)[:, None, None]
        new = torch.where(whole, hidden[donors].float(), new)
        mask = patch.mask(hidden.shape[1], device)
        if mask is not None:
            new = torch.where(mask, new, own)
        out = hidden.clone()
        out[rows] = new.to(hidden.dtype)
        return out

    def _hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, tokens, d)
            step, branch = self.step(), self.branch.name
            patch = self.patches.get((layer, step))
            if patch is not None:
                hidden = self._patch(patch, layer, step, args[0], hidden)
            if branch == "cond":
                self._record(layer, step, hidden)
            if patch is None:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook


@dataclass
class BatchResult:
    finals: np.ndarray  # (row, C, F, H, W)
    means: np.ndarray | None  # (row, step, layer, d) cond-branch token means
    token_dist: np.ndarray | None  # (row, step, layer), NaN for rows without a clean twin
    frame_dist: np.ndarray | None


def token_frames(frames: Iterable[int], n_tokens: int, n_frames: int) -> np.ndarray:
    """Token indices of latent frames `frames` (tokens are frame-major after patchify)."""
    per = n_tokens // n_frames
    return np.concatenate([np.arange(f * per, (f + 1) * per) for f in sorted(frames)])


def _patches(jobs: Sequence[Job], seed_base: int, n_tokens: int | None, n_frames: int) -> dict:
    clean_row = {j.sample: r for r, j in enumerate(jobs) if j.kind == "clean"}
    patches: dict[tuple[int, int], Patch] = {}
    for row, job in enumerate(jobs):
        if job.kind not in PATCH_KINDS:
            continue
        if job.partner not in clean_row:
            raise ValueError(f"patch job {job} runs without its donor's clean row (plan it with plan_batches)")
        if job.carry not in CARRY:
            raise ValueError(f"carry {job.carry!r} is not allowed; allowed: {', '.join(CARRY)}")
        p = patches.setdefault((job.position, job.step), Patch())
        p.rows.append(row)
        p.donors.append(clean_row[job.partner])
        p.carry.append(job.carry)
        p.keys.append(noise_key(seed_base, job.sample, f"patch-{job.tag}"))
        p.tokens.append(token_frames(job.frames, n_tokens, n_frames) if job.frames and n_tokens else None)
    return patches


def run_batch(replay: Any, jobs: Sequence[Job], *, seed_base: int = 0, means: bool = False,
              observe: Callable[[int, torch.Tensor], None] | None = None) -> BatchResult:
    """Run `jobs` as one pipeline call (a batch from `plan_batches`). `observe(step, x0_hat)` sees each step's x̂0
    (B, C, F, H, W) before the next step's noise is mixed in. Distances are measured for every job whose clean
    twin is in the batch and that is not clean itself."""
    n_steps = replay.n_steps
    n_frames = int(replay.pipe.config.video_shape[1]) // int(replay.pipe.transformer.config.patch_size[0])
    _, _, h, w = replay.pipe.config.video_shape
    p_t, p_h, p_w = replay.pipe.transformer.config.patch_size
    n_tokens = n_frames * (h // p_h) * (w // p_w)
    latents = replay.noise([replay.items[j.sample].seed for j in jobs])  # (B, C, F, H, W)
    keys = [noise_key(seed_base, j.sample, NOISE_OF.get(j.kind, j.kind)) for j in jobs]
    mixer = Mixer([NoiseJob(j.kind, j.position, j.strength, key) for j, key in zip(jobs, keys)])
    sigmas = replay.sigmas()
    mixer.apply(latents, 0, None, sigmas[0])
    clean_row = {j.sample: r for r, j in enumerate(jobs) if j.kind == "clean"}
    twins = {r: clean_row[j.sample] for r, j in enumerate(jobs) if j.kind != "clean" and j.sample in clean_row}
    state = {"step": 0}

    def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        if observe is not None:
            observe(i, kwargs["x0_hat"])
        state["step"] = i + 1
        if i + 1 < n_steps:  # the latent entering step i + 1; after the last step the model's output is kept
            mixer.apply(latents, i + 1, kwargs["x0_hat"], sigmas[i + 1])
        return {"latents": latents}

    hooks = BlockHooks(replay.pipe.transformer, lambda: state["step"], n_steps, n_frames, means=means, twins=twins,
                       patches=_patches(jobs, seed_base, n_tokens, n_frames))
    with hooks:
        finals = replay.run([replay.items[j.sample] for j in jobs], latents=latents, callback=callback,
                            tensor_inputs=("latents", "x0_hat"))
    def host(x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else x.cpu().numpy()

    token, frame = host(hooks.token_dist), host(hooks.frame_dist)
    if token is not None:
        missing = np.array([r not in twins for r in range(len(jobs))])
        token[missing], frame[missing] = np.nan, np.nan
    return BatchResult(finals, host(hooks.means), token, frame)
