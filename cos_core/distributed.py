"""Data-parallel capture under `torchrun` / `accelerate launch`: which work items this process owns, and the
barriers around creating and publishing a run. Owns nothing else.

Ranks only coordinate (no tensors are exchanged), so the process group always uses the gloo backend over TCP:
the same code runs on CPUs, one GPU shared by several processes, many GPUs, or many nodes. Each rank writes its
own shards into the shared run directory; rank 0 writes the manifest once every rank has finished.
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

    def __post_init__(self):
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"rank {self.rank} of world size {self.world} is not valid")

    def share(self, n_items: int) -> list[int]:
        """Item indices this rank captures: round-robin, so uneven counts differ by at most one per rank."""
        return list(range(self.rank, n_items, self.world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def from_env() -> Ranks:
    """Ranks from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        hours = float(os.environ.get(TIMEOUT_ENV, "24"))
        dist.init_process_group("gloo", timeout=dt.timedelta(hours=hours))
        log.info("rank %d of %d joined (gloo)", ranks.rank, world)
    return ranks
