"""Sweeps over several processes with torch.distributed (launched by torchrun).

Every rank memory-maps the same feature cache and trains its share of the grid (round-robin by
config index); the rows are all-gathered, so every rank can plan the next weight-decay search
round, and rank 0 writes the files. gloo on CPU, NCCL on GPU (one device per local rank).

    torchrun --nproc_per_node 2 -m fastfuse sweep --features DIR ... --out OUT
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    owns_group: bool = False     # this module initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device: Optional[str] = None) -> Context:
    """The process's place in the sweep: joins torchrun's group, or the caller's, or runs alone.

    ``device``: None picks the local GPU when there is one, else the CPU.
    """
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    owns = False
    if not dist.is_initialized() and launched_by_torchrun():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    if not dist.is_initialized():
        return Context(device=device or ("cuda" if cuda else "cpu"))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if cuda and (device is None or str(device) == "cuda"):  # one GPU per local rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    elif device is None:
        device = "cpu"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return Context(rank, world_size, str(device), owns)


def teardown(context: Context) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence, context: Context) -> list:
    """This rank's items: every world_size-th, starting at its rank."""
    return list(items[context.rank::context.world_size])


def all_gather(obj: Any, context: Context) -> list:
    """Every rank's ``obj``, in rank order (pickled; small objects such as result rows)."""
    if not context.distributed:
        return [obj]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj: Any, context: Context) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (None elsewhere); for large objects such as a checkpoint."""
    if not context.distributed:
        return [obj]
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
