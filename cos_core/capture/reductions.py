"""Reductions of block hidden states, computed on the model's device before any host copy.

Owns the reduction names (also archive keys and CLI choices) and their shapes: frame_mean, pool<k>, token_norm,
proj<d'> (fixed-seed random projection). A Wan-1.3B block output at 480x832x81 is 100 MB, so only these small
summaries leave the GPU by default. Every reduction is computed in float32 whatever the model's dtype (proj<d'> casts
the hidden states and the projection up: a bfloat16 matmul would be off by ~0.4 %). Imports torch; nothing from
diffusers.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

_POOL = re.compile(r"^pool(\d+)$")
_PROJ = re.compile(r"^proj(\d+)$")
BASIC = ("frame_mean", "token_norm")
DEFAULT = ("frame_mean", "token_norm")
HELP = "frame_mean (frame, d) | token_norm (frame, row, col) | pool<k> (frame, k, k, d) | proj<d'> (frame, row, col, d')"


def check_reduction(name: str) -> str:
    if name in BASIC:
        return name
    for pattern, what in ((_POOL, "pool size"), (_PROJ, "projection dim")):
        m = pattern.match(name)
        if m:
            if not 1 <= int(m.group(1)) <= 4096:
                raise ValueError(f"reduction {name!r}: {what} must be 1..4096")
            return name
    raise ValueError(f"unknown reduction {name!r}; allowed: {HELP}")


def reduced_shape(name: str, grid: tuple[int, int, int], dim: int) -> list[int]:
    f, h, w = grid
    if name == "frame_mean":
        return [f, dim]
    if name == "token_norm":
        return [f, h, w]
    m = _POOL.match(name)
    if m:
        k = int(m.group(1))
        return [f, k, k, dim]
    return [f, h, w, int(_PROJ.match(name).group(1))]


class Reducer:
    """Applies a fixed list of reductions to (B, tokens, d) hidden states laid out frame-major on `grid`."""

    def __init__(self, names: tuple[str, ...], proj_seed: int = 0):
        self.names = tuple(check_reduction(n) for n in names)
        self.proj_seed = proj_seed
        self._proj: dict[tuple, torch.Tensor] = {}

    def projection(self, dim: int, out: int, device: torch.device) -> torch.Tensor:
        """The float32 (dim, out) Gaussian matrix / sqrt(out), identical on every device for a seed (made on the
        CPU)."""
        key = (dim, out, device)
        if key not in self._proj:
            gen = torch.Generator(device="cpu").manual_seed(self.proj_seed)
            mat = torch.randn(dim, out, generator=gen, dtype=torch.float32) / out ** 0.5
            self._proj[key] = mat.to(device=device)
        return self._proj[key]

    def __call__(self, hidden: torch.Tensor, grid: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        f, h, w = grid
        b, n, d = hidden.shape
        assert n == f * h * w, f"hidden states have {n} tokens, the grid {grid} has {f * h * w}"
        x = hidden.view(b, f, h, w, d)  # (B, frame, row, col, d)
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name == "frame_mean":
                out[name] = x.mean(dim=(2, 3), dtype=torch.float32)  # (B, frame, d)
            elif name == "token_norm":
                out[name] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (B, frame, row, col)
            elif name.startswith("pool"):
                k = int(name[4:])
                grid2d = x.permute(0, 1, 4, 2, 3).reshape(b * f, d, h, w)
                pooled = F.adaptive_avg_pool2d(grid2d.float(), k)  # (B*frame, d, k, k)
                out[name] = pooled.view(b, f, d, k, k).permute(0, 1, 3, 4, 2)  # (B, frame, k, k, d)
            else:
                mat = self.projection(d, int(name[4:]), hidden.device)
                out[name] = x.float() @ mat  # (B, frame, row, col, d')
        return out
