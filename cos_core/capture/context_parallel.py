"""Context parallelism under capture: diffusers splits each video's tokens over a group of ranks (Ulysses and/or
ring attention); ranks g*cp .. g*cp+cp-1 form group g (one node), one data-parallel rank whose first rank writes.

Owns the device mesh, turning diffusers' context parallelism on for every expert, and `gather_tokens`, which rebuilds
a block's full token sequence from the group's shards so capture records what one process would (token -> (frame,
row, col) unchanged). Imports torch and diffusers; never streamlit, archive or experiments.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import patched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextParallel:
    """Degrees of diffusers' `ContextParallelConfig`; `size` = ring × ulysses ranks share one video."""

    ring: int = 1
    ulysses: int = 1

    def __post_init__(self):
        if self.ring < 1 or self.ulysses < 1:
            raise ValueError(f"--ring-degree and --ulysses-degree must be ≥ 1, got {self.ring} and {self.ulysses}")

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def check_world(self, world: int) -> None:
        if self.enabled and (world < self.size or world % self.size):
            raise ValueError(f"context parallelism over {self.size} ranks (ring {self.ring} × ulysses "
                             f"{self.ulysses}) needs a world size that is a multiple of {self.size}, got {world}: "
                             f"launch with torchrun --nproc_per_node={self.size} (or a multiple)")


def _cpu_device_count() -> contextlib.AbstractContextManager:
    """diffusers picks the mesh device as `rank % torch.accelerator.device_count()`, which divides by zero on a
    machine without an accelerator; on such a machine count the CPU as one device while it builds the mesh."""
    if torch.accelerator.device_count() > 0:
        return contextlib.nullcontext()
    return patched(torch.accelerator, "device_count", lambda original: lambda: 1)


def enable(pipe: Any, cp: ContextParallel, world: int, *, attention_backend: str | None = None) -> None:
    """Turn on diffusers' context parallelism for every expert of `pipe` (transformer, transformer_2).

    Needs an initialised process group of `world` ranks. One device mesh ("dp", "ring", "ulysses") is built and
    its ("ring", "ulysses") part is handed to each expert, so all experts split tokens the same way."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from . import families as fam

    cp.check_world(world)
    experts = fam.experts(pipe)
    if not all(hasattr(module, "_cp_plan") and module._cp_plan for _, module in experts):
        names = sorted({type(m).__name__ for _, m in experts})
        raise ValueError(f"{', '.join(names)} has no context-parallel plan in diffusers: run it without "
                         "--ring-degree/--ulysses-degree")
    heads = {getattr(module.config, "num_attention_heads", None) for _, module in experts} - {None}
    if cp.ulysses > 1 and any(h % cp.ulysses for h in heads):
        raise ValueError(f"Ulysses attention splits attention heads over ranks: {sorted(heads)} heads do not divide "
                         f"by --ulysses-degree {cp.ulysses}")
    if cp.ring > 1 and _backend(attention_backend) == "native":
        raise ValueError("ring attention (--ring-degree) needs an attention backend that returns the log-sum-exp, "
                         "which diffusers' native backend does not: pass --attention-backend _native_cudnn or "
                         "flash (GPUs), or use --ulysses-degree instead")
    device = next(experts[0][1].parameters()).device
    mesh = init_device_mesh(device.type, (world // cp.size, cp.ring, cp.ulysses),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    for _, module in experts:
        if attention_backend:
            module.set_attention_backend(attention_backend)
        config = ContextParallelConfig(ring_degree=cp.ring, ulysses_degree=cp.ulysses, mesh=mesh["ring", "ulysses"])
        with _cpu_device_count():
            module.enable_parallelism(config=config)
    log.info("context parallelism on: ring %d × ulysses %d, %d data-parallel groups", cp.ring, cp.ulysses,
             world // cp.size)


def _config(expert: Any) -> Any:
    """The expert's diffusers `ContextParallelConfig` once `enable` ran, else None."""
    return getattr(getattr(expert, "_parallel_config", None), "context_parallel_config", None)


def check_tokens(expert: Any, n_tokens: int) -> None:
    """ValueError when context parallelism cannot split `n_tokens` video tokens evenly over its group (diffusers
    would stop at the first block with a bare assertion)."""
    cp = _config(expert)
    if cp is None or cp.ulysses_anything or cp.ring_anything:
        return
    size = cp.ring_degree * cp.ulysses_degree
    if n_tokens % size:
        raise ValueError(f"context parallelism splits each video's {n_tokens} tokens over {size} ranks, which does "
                         f"not divide them: choose a degree that divides {n_tokens} (or another height, width or "
                         "frame count)")


def _backend(requested: str | None) -> str:
    if requested:
        return requested
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return str(_AttentionBackendRegistry.get_active_backend()[0].value)


def gather_tokens(expert: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The full (B, tokens, d) sequence of a block output that context parallelism left sharded along tokens.

    Uses the inverse of the sharder diffusers split the sequence with; every rank of the group must call it (it is
    a collective). Outside context parallelism the tensor is returned unchanged."""
    cp = _config(expert)
    if cp is None:
        return hidden
    from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder

    if cp.ulysses_anything or cp.ring_anything:
        return PartitionAnythingSharder.unshard_anything(hidden, 1, cp._flattened_mesh)
    return EquipartitionSharder.unshard(hidden, 1, cp._flattened_mesh)
