"""Many processes on torch.distributed: gloo on CPU, nccl on GPU.

Launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK::

    torchrun --standalone --nproc_per_node=2 -m idcscope train DATA --out RUN
    torchrun --standalone --nproc_per_node=2 -m idcscope predict CKPT PATCHES --out p.csv

Training splits each batch between the processes (DistributedDataParallel); scoring
shares out whole patients or slides (``shard``). Without those variables everything runs
in one process and nothing here does anything (torch is not even imported).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .cpus import usable_cpus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def threads(self) -> int | None:
        """Threads each process may use: the cores shared by the processes on this machine
        (None in a single process: every core)."""
        if not self.enabled:
            return None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        return max(1, usable_cpus() // local)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float) -> float:
        """The average of ``value`` over all processes."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world


def resolve_device(preference: str = "auto", local_rank: int = 0) -> str:
    if preference == "auto":
        import torch

        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        return f"cuda:{local_rank}"
    return preference


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (or return the single-process context)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1:
        _join_group(dev, rank, world, local_rank)
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev)


def _join_group(dev: str, rank: int, world: int, local_rank: int) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    if not dev.startswith("cuda"):
        # Processes on one machine share its cores; oversubscribing them is much slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, usable_cpus() // local_world))
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)


def shard(items: list, ctx: DistContext) -> list:
    """This process's share of ``items``: every ``world``-th one, from its rank on."""
    return items[ctx.rank :: ctx.world]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """The context of :func:`init_distributed` for a job's whole run. A job that ends
    well waits for every process before the group is torn down (one process destroying
    gloo's group while another still uses it aborts the process); one that fails leaves
    at once."""
    ctx = init_distributed(device)
    try:
        yield ctx
        ctx.barrier()
    finally:
        shutdown(ctx)
