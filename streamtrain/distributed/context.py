"""Who this process is in a torchrun launch, and the process group it reduces over.

`from_environment` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
initialises the default process group (nccl when the run is on CUDA, gloo on CPU) and pins one
device per local rank. Without those variables it is the single-process context: rank 0 of 1, no
group, no collectives.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None          # the process group (None: single process)

    @property
    def is_main(self) -> bool:
        """The rank that prints, logs metrics and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None


def local_context() -> DistContext:
    return DistContext()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def from_environment(device_type: str) -> DistContext:
    """The context of this process: torchrun's, with the default group initialised (once), or the
    single-process one. `device_type` ('cuda' or 'cpu') picks the backend."""
    if not launched_by_torchrun():
        return local_context()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); launch at most "
                             f"{torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistContext(rank, world, local, dist.group.WORLD)


def device_of(context: DistContext, device_type: str) -> torch.device:
    """The device this rank trains on: its own GPU under torchrun, else the requested type."""
    if device_type == "cuda":
        return torch.device("cuda", context.local_rank)
    return torch.device(device_type)
