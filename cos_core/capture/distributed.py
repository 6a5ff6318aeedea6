"""Data-parallel capture under `torchrun` / `accelerate launch`: which work items this process owns, and the barriers
around creating and publishing a run. Ranks only coordinate (gloo over TCP, no tensors), so the same code runs on
CPUs, one shared GPU, many GPUs or nodes; each rank writes its own shards, rank 0 the manifest once all finished.
With context parallelism (`cp` > 1, `context_parallel.py`) `cp` consecutive ranks are one data-parallel rank running
the same items, its first rank writes, and its tensors travel over NCCL on GPUs (a "cpu:gloo,cuda:nccl" group).
Owns nothing else; imports torch.distributed lazily and nothing else from cos_core.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)
TIMEOUT_ENV = "COS_DIST_TIMEOUT_HOURS"  # how long a finished rank waits for the slowest one (default 24 h)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    cp: int = 1  # ranks per context-parallel group (1: plain data parallelism)

    def __post_init__(self):
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"rank {self.rank} of world size {self.world} is not valid")
        if self.cp < 1 or self.world % self.cp:
            raise ValueError(f"context-parallel groups of {self.cp} ranks do not divide world size {self.world}")

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def dp_world(self) -> int:
        return self.world // self.cp

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's shards (the first rank of each context-parallel group)."""
        return self.rank % self.cp == 0

    def share(self, n_items: int) -> list[int]:
        """Item indices this rank captures: round-robin over data-parallel ranks, so uneven counts differ by at most
        one per rank; all ranks of a context-parallel group get the same items."""
        return list(range(self.dp_rank, n_items, self.dp_world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def from_env(cp: int = 1, *, cuda: bool = False) -> Ranks:
    """Ranks from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process without them.
    `cp`: ranks per context-parallel group; `cuda`: their tensors live on GPUs (adds an NCCL backend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(cp=cp)  # raises for cp > 1: there is no group to share a video with
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), cp=cp)
    if not dist.is_initialized():
        hours = float(os.environ.get(TIMEOUT_ENV, "24"))
        backend = "cpu:gloo,cuda:nccl" if cp > 1 and cuda else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(hours=hours))
        log.info("rank %d of %d joined (%s)", ranks.rank, world, backend)
    return ranks
