"""Data-parallel training under torchrun: process group setup and small collectives.

The model and the loop are written for one process; this module is all that changes with
`torchrun --nproc_per_node N`: each rank reads its own slice of every batch, DDP all-reduces
gradients, and only rank 0 writes files.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scratchlm.devices import parse_device, process_group_backend
from scratchlm.train.config import ParallelConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device))
    return info


def is_main_process() -> bool:
    """Whether this process reports: rank 0 of a torchrun job, or a process without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def mean_across_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world


def shutdown(info: DistInfo) -> None:
    """Leave the process group: torchrun's, or the one-process group FSDP2 needs on its own."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device_name: str, parallel: ParallelConfig | None = None) -> Iterator[DistInfo]:
    """The body of a run inside the process group torchrun describes (one process without
    torchrun: `DistInfo()`), and the group left at the end, on errors too. Every kind of training
    runs in it: every rank trains (the loop gives each its own micro-batches and DDP averages the
    gradients) and evaluates the unwrapped model, which needs no collective; only rank 0 writes
    files and samples. With `parallel`, a layout that does not fit the processes is refused at
    once, before any model or data loads."""
    info = init_distributed(parse_device(device_name))  # "cuda:0" too is a GPU: NCCL, not gloo
    try:
        if parallel is not None:
            parallel.degrees(info.world)
        yield info
    finally:
        shutdown(info)
