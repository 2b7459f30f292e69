"""Sharded data parallelism on FSDP2 (torch.distributed.fsdp.fully_shard), updated in the hooks.

Each rank keeps 1/N of every weight, of every optimizer state and of every gradient:

    shard_model(model, rules, mesh, dtype)   fully_shard every block, then the root. A parameter is
                                             sharded on dim 0, except a GaLore matrix that projects
                                             from the left (m < n, R = P^T G), sharded on dim 1:
                                             each rank then projects, runs Adam and projects back
                                             its own rows (right: R_i = G_i P) or columns
                                             (left: R_j = P^T G_j) with no collective at all.
    ShardGroup                               what the engine and the rules need from the other
                                             ranks (the engine's `shards=`): the non-finite flag,
                                             the step's loss and norm, GaLore's refreshes.

The step. FSDP2 all-gathers a block before its forward (and again before its backward), and after
the block's backward reduce-scatters its gradients (the mean over ranks, in fp32 for bf16 weights)
and then runs the post-accumulate-grad hooks of the sharded parameters itself, each hook finding
the reduced local shard of its gradient in `.grad` as a DTensor. The engine's hooks hand the rules
plain local tensors (`local_part`): the shard of the weight, a view that writes through to the
storage FSDP2 gathers from, and the shard of the gradient. So a rule creates its states from the
shard's shape and updates the shard; nothing else changes for AdamW or 8-bit states.

Accumulation. Gradient sync stays on for every micro-batch: FSDP2 reduce-scatters each backward
and the hooks fold the reduced shards into shard-sized buffers (the engine's exact accumulation,
one update per logical step). With sync off on the first k-1 micro-batches FSDP2 would keep every
parameter's unsharded gradient sum until the last one (a whole model of fp32 gradients per rank)
and would not run the hooks until then; the reduced traffic is not worth that memory.

Non-finite values. A NaN in one rank's shard of a gradient is seen by that rank only, so the
engine agrees the flag (a MAX all-reduce of one number) in every hook: every rank masks the same
updates, as one process would. The step's loss, squared norm and flag are reduced together in the
engine's one read per step.

Randomness. Stochastic rounding (bf16 weights, bf16 and 8-bit states) draws rank-specific streams:
`seed_rank` seeds the global generator with (seed, rank) after the model is built and before the
states are, so every rank's shard gets its own noise, the same on every run with the same seed.

A dimension that does not divide by the number of ranks: rows (dim 0) are split as torch.chunk
splits them (FSDP2 pads internally): the first ranks hold ceil(d / N) rows, the last ones fewer
(none when d < N); rules are shape-agnostic, and both GaLore refreshes handle uneven shards (tests:
intermediate size 255 on 2 ranks). Columns (dim 1: a GaLore matrix projected from the left) FSDP2
splits only evenly (torch 2.13 raises NotImplementedError), so shard_model refuses such a matrix in
one line before sharding anything; sharding it by rows instead would make its projection a sum
over ranks every step, which is what this placement exists to avoid.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from ..rules.base import local_part  # noqa: F401 (re-exported for the engine)
from ..rules.galore import GaLore
from ..optim.projector import projection_side


class ShardingError(ValueError):
    pass


def shard_dim(rule, param) -> int:
    """The dimension a parameter is sharded on: 1 for a GaLore matrix projected from the left (its
    projection keeps columns apart), else 0."""
    if isinstance(rule, GaLore) and param.dim() == 2 and projection_side(param.shape) == "left":
        return 1
    return 0


def placement_fn(model, rules: dict):
    """FSDP2's shard_placement_fn from the rules of the unsharded model (keyed by parameter object)."""
    dims = {id(p): shard_dim(rules.get(name), p) for name, p in model.named_parameters()}
    return lambda param: Shard(dims.get(id(param), 0))


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Weights are gathered in their own dtype (no fp32 master copy: the rules round bf16 updates
    stochastically); bf16 gradients are reduce-scattered in fp32, as the data-parallel reducer does."""
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype == torch.bfloat16 else None)


def shard_model(model: torch.nn.Module, rules: dict, mesh, dtype: torch.dtype) -> torch.nn.Module:
    """fully_shard each block of `model.blocks`, then the root (embeddings, final norm, head); the
    parameters become DTensors holding this rank's shard. Build the engine after this."""
    blocks = list(getattr(model, "blocks", None) or [])
    if not blocks:
        raise ShardingError(f"{type(model).__name__} exposes no `blocks` list to shard; --parallel fsdp needs one")
    check_even_columns(model, rules, mesh.size())
    options = dict(mesh=mesh, mp_policy=mixed_precision(dtype), shard_placement_fn=placement_fn(model, rules))
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def check_even_columns(model: torch.nn.Module, rules: dict, world_size: int) -> None:
    """Refuse a matrix sharded on columns that do not divide by the ranks (FSDP2 cannot split them)."""
    for name, param in model.named_parameters():
        if shard_dim(rules.get(name), param) == 1 and param.shape[1] % world_size:
            m, n = param.shape
            raise ShardingError(f"{name} ({m} x {n}) projects from the left, so each rank holds a slice of its "
                                f"{n} columns, and FSDP2 splits columns only evenly: {n} does not divide by "
                                f"{world_size} ranks; launch a number of ranks that divides {n}")


@contextlib.contextmanager
def simulated_world(world_size: int):
    """This process as rank 0 of `world_size` ranks whose collectives do nothing, and the device
    mesh over them: what the memory planner shards a model on (one process, fake tensors, no
    launch). torch's own FSDP memory tools use the same fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the 'fake' backend
    if dist.is_initialized():
        raise ShardingError("a sharded plan simulates its ranks in a process group of its own; plan before "
                            "the run's process group is initialised")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def device_mesh(device: torch.device, world_size: int):
    """The 1-D mesh of all ranks on this rank's device type (the default process group)."""
    return init_device_mesh(device.type, (world_size,))


def seed_rank(seed: int, rank: int) -> None:
    """Rank-specific, reproducible streams for stochastic rounding (see the module docstring)."""
    torch.manual_seed(seed * 1_000_003 + rank + 1)


class ShardGroup:
    """The engine's link to the other ranks when FSDP2 has reduced every gradient already.

    `refresh` picks how GaLore computes a new basis from a sharded gradient (sharded_refresh.py):
    'gather' (the owner rank gathers the matrix, computes, broadcasts) or 'sketch' (the randomized
    range finder with its products split over the ranks)."""

    sharded = True

    def __init__(self, group=None, refresh: str = "gather"):
        from .sharded_refresh import REFRESH_METHODS
        if refresh not in REFRESH_METHODS:
            raise ShardingError(f"unknown sharded refresh {refresh!r}; choose one of {REFRESH_METHODS}")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.refresh = refresh
        self.bytes_sent = 0   # refresh traffic since the counter was reset

    def agree(self, flag: torch.Tensor) -> None:
        """found_inf, the maximum over ranks, in place (every rank then masks the same updates)."""
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)

    def step_values(self, values: torch.Tensor) -> torch.Tensor:
        """[flag, loss sum, squared grad norm] of this rank -> [max flag, mean loss, total squared
        norm] over ranks (each rank's norm covers its shards only)."""
        flag, rest = values[:1].clone(), values[1:].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(rest, group=self.group)
        rest[0] /= self.world_size
        return torch.cat([flag, rest])

    def all_true(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (a 0-d bool) holds on every rank; a host read, for refreshes only."""
        value = flag.to(torch.float32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def owner(self, index: int) -> int:
        """The rank that computes matrix `index`'s subspace in the gather method (round robin)."""
        return index % self.world_size

    def basis(self, rule, state: dict, local_grad: torch.Tensor, dim: int) -> torch.Tensor:
        """GaLore's new basis from this rank's shard of the (reduced) gradient, identical on every
        rank, sharded on `dim`."""
        from .sharded_refresh import sharded_basis
        return sharded_basis(self, rule, state, local_grad, dim)

    def reset_counters(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


# -- what the Trainer calls under --parallel fsdp ---------------------------------------------------
def build_sharded_engine(model, config, schedule_history: dict, device: torch.device, context):
    """Shard `model` over the ranks (placements from the run's rules), seed this rank's rounding
    streams, then build and attach the engine on the shards."""
    from ..recipe import DTYPES, build_engine, build_rules
    shard_model(model, build_rules(model, config), device_mesh(device, context.world_size), DTYPES[config.dtype])
    seed_rank(config.seed, context.rank)
    return build_engine(model, config, schedule_history, shards=ShardGroup(context.group)).attach()


def full_weights(model: torch.nn.Module) -> dict | None:
    """The whole model's weights (HF names, CPU) on rank 0, gathered from the shards; None on the
    other ranks. Every rank must call it (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if dist.get_rank() == 0 else None


def shared_from_rank0(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of a 0-d value over the ranks (fp32, on the value's device)."""
    total = value.detach().float().clone()
    dist.all_reduce(total, group=group)
    return total / dist.get_world_size(group)
