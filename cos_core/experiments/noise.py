"""The noise interventions mix into a batch, drawn per sample in one tensor per batch on the device. Owns
`counter_normal` (N(0, 1) from a keyed integer hash of (key, step, element): a job's numbers whatever batch it runs
in), `noise_key`, and `Mixer`: off-distribution replacement (`noise_step`, `noise_frame`: x <- (1-λ)x + λε, the
paper's probe at λ = 1) and on-distribution re-noising (`renoise_step`, `renoise_frame`: keep x̂0 of the previous
step, redraw a fraction λ of the noise at the step's σ). Imports torch and numpy; never pipelines.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
CHUNK = 1 << 24  # elements hashed per pass
REPLACE = ("noise_step", "noise_frame")  # x <- (1-λ)·x + λ·ε: leaves the data distribution for 0 < λ and late steps
RENOISE = ("renoise_step", "renoise_frame")  # x_s = (1-σ_s)·x̂0 + σ_s·(√(1-λ)·ε̂ + √λ·ε′): stays on it
ON_DISTRIBUTION = RENOISE + ("propagation",)  # the propagation map's perturbation is a renoise_step
AT_STEP = ("noise_step", "renoise_step", "propagation")  # kinds that act on one step, all frames
AT_FRAME = ("noise_frame", "renoise_frame")  # kinds that act on one latent frame, every step
NOISE_KINDS = REPLACE + RENOISE + ("propagation",)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) as int64, without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with full avalanche (Wellons' "lowbias32"), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_normal(keys: torch.Tensor, step: int, shape: Sequence[int], device: torch.device | str
                   ) -> torch.Tensor:
    """(B, *shape) float32 standard normals: row b is a fixed function of (keys[b], step) alone.

    keys: (B,) int64 in [0, 2**32), one per job (see `noise_key`). Each element hashes (element index, step) with
    the row's key in two keyed rounds, twice (two uniforms), then Box-Muller. Batching, order and device do not
    change a row's numbers (up to the last bit of log/cos on another device)."""
    keys = torch.as_tensor(keys, dtype=torch.int64, device=device).reshape(-1, 1)  # (B, 1)
    n = int(np.prod(shape))
    index = torch.arange(n, dtype=torch.int64, device=device)[None]  # (1, n)
    streams = [_hash32(index ^ stream) for stream in (0x9E3779B9, 0x85EBCA6B)]  # (1, n) each
    row = _hash32(keys ^ _hash32(torch.full_like(keys, int(step) & MASK32)))  # (B, 1)
    out = torch.empty(len(keys), n, dtype=torch.float32, device=device)
    chunk = max(1, CHUNK // max(n, 1))  # rows per pass: the int64 intermediates stay ~CHUNK elements
    for lo in range(0, len(keys), chunk):
        u1, u2 = ((((_hash32(s ^ row[lo:lo + chunk]) >> 8).float() + 0.5) / float(1 << 24)) for s in streams)
        out[lo:lo + chunk] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * np.pi * u2)  # Box-Muller
    return out.reshape(len(keys), *shape)


def noise_key(seed_base: int, sample: int, kind: str) -> int:
    """The 32-bit key of one (sample, kind)'s noise: reruns draw the same ε, and every position (and strength) of a
    kind sees the same draw for a sample, so positions are compared on paired noise."""
    kind_id = zlib.crc32(kind.encode("utf-8"))
    return int(np.random.SeedSequence([int(seed_base), int(sample), kind_id]).generate_state(1)[0])


@dataclass(frozen=True)
class NoiseJob:
    """What the mixer needs of one batch row: its kind, position (step or frame), strength λ and key."""

    kind: str
    position: int
    strength: float
    key: int


class Mixer:
    """Applies a batch's noise, in place, to the latent entering each step (see the module docstring).

    `apply(latents, step, x0_hat, sigma)`: latents (B, C, F, H, W) about to enter `step`; x0_hat (B, C, F, H, W) the
    previous step's x̂0 (None before step 0, where σ = 1 and x = ε); sigma the σ of `step`. The renoise kinds
    recover the implied noise ε̂ = (x − (1−σ)·x̂0)/σ, which is exact after a flow-matching Euler step."""

    def __init__(self, rows: Sequence[NoiseJob]):
        self.rows = list(rows)
        self.kinds = np.array([r.kind for r in self.rows], dtype=object)
        self.position = np.array([r.position for r in self.rows], dtype=np.int64)
        self.strength = np.array([r.strength for r in self.rows], dtype=np.float64)
        self.keys = np.array([r.key for r in self.rows], dtype=np.int64)

    @property
    def active(self) -> bool:
        return bool(np.isin(self.kinds, NOISE_KINDS).any())

    def apply(self, latents: torch.Tensor, step: int, x0_hat: torch.Tensor | None, sigma: float) -> None:
        if not self.active:
            return
        at_step = np.isin(self.kinds, AT_STEP) & (self.position == step)
        at_frame = np.isin(self.kinds, AT_FRAME)
        for rows in (np.flatnonzero(at_step), np.flatnonzero(at_frame)):
            if len(rows) == 0:
                continue
            frame = at_frame[rows[0]]
            target = latents[rows]  # (R, C, F, H, W)
            if frame:
                index = torch.as_tensor(self.position[rows], device=latents.device)
                target = target[torch.arange(len(rows), device=latents.device), :, index]  # (R, C, H, W)
            eps = counter_normal(torch.as_tensor(self.keys[rows]), step, target.shape[1:], latents.device)
            lam = torch.as_tensor(self.strength[rows], dtype=torch.float32, device=latents.device)
            lam = lam.reshape(-1, *[1] * (target.ndim - 1))
            renoise = torch.as_tensor(np.isin(self.kinds[rows], ON_DISTRIBUTION), device=latents.device)
            renoise = renoise.reshape(lam.shape)
            mixed = self._mix(target.float(), eps, lam, renoise, step, x0_hat, rows, frame, sigma)
            self._write(latents, rows, frame, mixed.to(latents.dtype))

    def _mix(self, x: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor, renoise: torch.Tensor, step: int,
             x0_hat: torch.Tensor | None, rows: np.ndarray, frame: bool, sigma: float) -> torch.Tensor:
        replaced = (1.0 - lam) * x + lam * eps
        if not bool(renoise.any()):
            return replaced
        if x0_hat is None:  # before step 0: the latent is pure noise
            assert abs(sigma - 1.0) < 1e-6, f"step {step} has no previous x0_hat but sigma {sigma} != 1"
            clean = torch.zeros_like(x)
        else:
            clean = x0_hat[rows].float()
            if frame:
                index = torch.as_tensor(self.position[rows], device=x.device)
                clean = clean[torch.arange(len(rows), device=x.device), :, index]
        implied = (x - (1.0 - sigma) * clean) / sigma  # ε̂
        fresh = (1.0 - sigma) * clean + sigma * (torch.sqrt(1.0 - lam) * implied + torch.sqrt(lam) * eps)
        return torch.where(renoise, fresh, replaced)

    def _write(self, latents: torch.Tensor, rows: np.ndarray, frame: bool, mixed: torch.Tensor) -> None:
        index = torch.as_tensor(rows, device=latents.device)
        if frame:
            frames = torch.as_tensor(self.position[rows], device=latents.device)
            latents[index, :, frames] = mixed
        else:
            latents[index] = mixed
