"""The memory planner's view of one FSDP2 rank (--parallel fsdp): the ranks it plans for, the
fake process group it shards the model in, and the engine on the shards.

A sharded plan is rank 0 of --world-size ranks: the real model, sharded by the real shard_model
in a fake process group (distributed/fsdp.simulated_world: collectives do nothing, their output
buffers are allocated as in a run), with the real engine on its shards, all on fake tensors. The
tracker follows FSDP2's gathered blocks (fsdp_storage.py), so the plan holds this rank's shards of
weights, states and gradients, the gathered block(s) of the moment, and the reduce-scatter
buffers; FSDP2's own buffers need no analytic line. Rank 0 holds the larger chunk of an uneven
dimension, and it gathers every GaLore matrix it refreshes (PlannedRank): the plan is the worst
rank's. Tested against the tracked peaks of 2 real gloo ranks (tests/test_fsdp.py).

With a budget the configuration as given does not meet, `world_size_search` doubles the ranks
until it fits (or MAX_WORLD_SIZE): what the search suggests beside its knobs.
"""
import contextlib
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..distributed.fsdp import ShardGroup, device_mesh, shard_model, simulated_world
from ..recipe import DTYPES, build_engine, build_rules

# FSDP2 at 2 layers is not yet a deep model (LLaMA-7B, 4 ranks: the top block's backward holds 0.40 GB
# less scratch at 2 layers than at 3, 4 or 5, which agree); from 3 layers on every phase is linear
SHARDED_SHALLOW_LAYERS = (3, 4)
MAX_WORLD_SIZE = 64


def planned_world_size(config: TrainConfig) -> int:
    """The data-parallel ranks a plan is for: --world-size, else torchrun's WORLD_SIZE, else 1.
    A plan is per rank: each holds the whole model (replicated data parallelism)."""
    return config.world_size or int(os.environ.get("WORLD_SIZE", "1"))


def sharded_world(config: TrainConfig, fake: bool):
    """--parallel fsdp: rank 0 of a fake process group of the planned ranks (collectives do
    nothing), yielding its device mesh; else nothing. On real tensors (what the plan is tested
    against) each rank of the caller's own process group runs the steps on its real shards."""
    if config.parallel != "fsdp":
        return contextlib.nullcontext()
    if not fake:
        if not dist.is_initialized() or dist.get_world_size() != planned_world_size(config):
            raise ValueError("a sharded run on real tensors needs a process group of --world-size ranks")
        return contextlib.nullcontext(device_mesh(torch.device("cpu"), dist.get_world_size()))
    return simulated_world(planned_world_size(config))


def simulated_engine(model, config: TrainConfig, mesh, fake: bool = True):
    """The run's engine, attached: on rank 0's shards when `mesh` is given (FSDP2, as
    distributed/fsdp.build_sharded_engine does), else on the whole model."""
    if mesh is None:
        return build_engine(model, config, skip_nonfinite=False).attach()
    shard_model(model, build_rules(model, config), mesh, DTYPES[config.dtype])
    shards = (PlannedRank if fake else ShardGroup)(refresh="gather")
    return build_engine(model, config, skip_nonfinite=False, shards=shards).attach()


class PlannedRank(ShardGroup):
    """The simulated rank gathers every GaLore matrix it refreshes (the run spreads them round robin):
    its plan is the worst rank's at each hook, and a block's bytes do not depend on which index its
    matrices have, so the plan stays linear in depth (extrapolate_summary)."""

    def owner(self, index: int) -> int:
        return self.rank


def bucket_ranks(config: TrainConfig) -> int:
    """The ranks whose all-reduce buckets a plan adds: replicated data parallelism only (a sharded
    plan simulates FSDP2's own gathers and reduce-scatters)."""
    return 1 if config.parallel == "fsdp" else planned_world_size(config)


def world_size_search(config: TrainConfig, target: str, budget: int) -> list[dict]:
    """[{world_size, total}] for 2x, 4x, ... the planned ranks, up to the first at which the
    configuration as given fits `budget` (or MAX_WORLD_SIZE)."""
    from .planner import plan_config
    tried, ranks = [], planned_world_size(config)
    while ranks < MAX_WORLD_SIZE:
        ranks *= 2
        total = plan_config(replace(config, world_size=ranks), target, budget)["total"]
        tried.append({"world_size": ranks, "total": total, "fits": total <= budget})
        if total <= budget:
            break
    return tried
