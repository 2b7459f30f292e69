"""GaLore-AdamW: Adam in a low-rank subspace of the gradient (Zhao et al., 2024).

Every `gap` logical steps the basis P is recomputed from the gradient; in between, the gradient
is projected (R = G P or P^T G), Adam runs on R, and the weight moves by P * Adam(R) * scale.
Adam's moments are m x r (or r x n) instead of m x n. The move is made a chunk of rows at a time
(optim/chunks.py), so no m x n fp32 temporary exists.

Refreshes. The basis comes from the randomized range finder (default; at 4096 x 11008, rank 1024
it takes 0.17x the time of an exact SVD and keeps the same share of the energy to 1e-5) or an
exact fp32 SVD (`svd="exact"`, galore-torch's). All matrices get their first subspace at step 0;
after that each refreshes every `gap` steps at its own phase, matrices dealt into
ceil(1 / refresh_share) groups spread over the gap, so at most that share refresh on one step
instead of all of them (224 SVDs at 7B) stalling the same step.

Accumulation: the subspace is fixed for the whole logical step. With `subspace_from` =
"first_micro_batch" (default) a refresh step takes its basis from the first micro-batch's
gradient and every micro-batch is projected at once, so no full gradient outlives its hook.
With "full_step" a refresh step instead sums the full gradients and takes the basis from the
sum (exactly what one big batch would give, at the cost of holding m x n fp32 per parameter
on refresh steps).
"""
import math

import torch
from torch._subclasses.fake_tensor import is_fake

from ..optim.chunks import row_chunks
from ..optim.int8_weights import weight_rows, weight_storage
from ..optim.lowbit_basis import PROJECTOR_PRECISIONS, make_basis
from ..optim.clip import growth_factor
from ..optim.adam import decoupled_weight_decay
from ..optim.backend import update_backend
from ..optim.projector import (SVD_METHODS, add_projected_back_rows_, low_rank_view, project, project_back_rows,
                                projected_shape, projection_side, randomized_basis, svd_basis)
from ..optim.state import make_state, working
from ..optim.state_adam import state_adam_direction
from ..projected_backward import full_gradient
from .base import (Rule, add_to_buffer, check_step_gradient, common_state, keep_norm, local_part, maybe_clip,
                   take_buffer, update_weight)

SUBSPACE_SOURCES = ("first_micro_batch", "full_step")


class GaLore(Rule):
    name = "galore"
    projects_gradient = True  # the hooks may hand it a LinearGradient (projected_backward.py)

    def __init__(self, rank: int = 128, gap: int = 200, scale: float = 0.25, betas=(0.9, 0.999),
                 eps=1e-8, states: str = "fp32", subspace_from: str = "first_micro_batch",
                 svd: str = "randomized", refresh_share: float = 1.0, seed: int = 0,
                 oversample: int = 8, power_iters: int = 2, projector: str = "dense", projector_group: int = 256):
        if rank < 1:
            raise ValueError(f"GaLore rank must be >= 1, got {rank}")
        if gap < 1:
            raise ValueError(f"GaLore refresh gap must be >= 1, got {gap}")
        if subspace_from not in SUBSPACE_SOURCES:
            raise ValueError(f"subspace_from must be one of {SUBSPACE_SOURCES}, got {subspace_from!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"unknown svd method {svd!r}; choose one of {SVD_METHODS}")
        if not 0.0 < refresh_share <= 1.0:
            raise ValueError(f"refresh_share must be in (0, 1], got {refresh_share}")
        if projector not in PROJECTOR_PRECISIONS:
            raise ValueError(f"unknown projector precision {projector!r}; choose one of {PROJECTOR_PRECISIONS}")
        self.rank, self.gap, self.scale = rank, gap, scale
        self.betas, self.eps, self.states, self.subspace_from = tuple(betas), eps, states, subspace_from
        self.svd, self.refresh_share, self.seed = svd, refresh_share, seed
        self.oversample, self.power_iters = oversample, power_iters
        self.projector, self.projector_group = projector, projector_group  # basis storage (optim/lowbit_basis.py)
        self.matrices = 0  # init_state calls: each matrix's index, which sets its refresh phase

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, name, param):
        if param.dim() != 2:
            raise ValueError(f"GaLore needs a matrix; {name} has shape {tuple(param.shape)}")
        side = projection_side(param.shape)  # (a DTensor's shape is the whole matrix's)
        check_shard_dim(name, param, side)
        rank = min(self.rank, *param.shape)
        low = projected_shape(local_part(param).shape, rank, side)  # moments: this rank's shard only
        basis_rows = param.shape[0] if side == "left" else param.shape[1]
        state = common_state(param)
        state.update(
            side=side, rank=rank, refresh_step=-1, refreshes=0, index=self.matrices,
            basis=make_basis(basis_rows, rank, self.projector, self.projector_group, param.dtype, param.device),
            exp_avg=make_state(low, self.states, signed=True, device=param.device, param_dtype=param.dtype),
            exp_avg_sq=make_state(low, self.states, signed=False, device=param.device, param_dtype=param.dtype),
            grad_acc=None,       # fp32 projected sum of earlier micro-batches
            full_grad_acc=None,  # fp32 full sum, only on refresh steps with subspace_from=full_step
        )
        self.matrices += 1
        return state

    # -- when and how the subspace is refreshed ------------------------------------------------
    def phase(self, state) -> int:
        """The step within each `gap` at which this matrix refreshes. Matrices are dealt round-robin
        into ceil(1 / refresh_share) groups whose phases are spread over the gap, so at most that
        share of the matrices refresh on any step (after the first subspaces, all at step 0)."""
        groups = max(1, min(self.gap, math.ceil(1 / self.refresh_share)))
        return (state["index"] % groups) * (self.gap // groups)

    def refresh_due(self, state, ctx) -> bool:
        if state["refresh_step"] < 0:
            return True
        return ctx.step != state["refresh_step"] and ctx.step % self.gap == self.phase(state)

    def refresh(self, state, grad, ctx) -> None:
        """A new subspace from `grad` (under data parallelism: from the gradient averaged over the
        ranks, computed on one rank and broadcast, so every replica holds the same bits). A
        non-finite gradient keeps the old subspace and marks the step bad (a host read, at
        refresh steps only: the SVD reads its own status anyway)."""
        grad = self.refresh_gradient(grad, ctx)
        if grad is None:
            return
        if is_sharded(ctx):  # FSDP2: `grad` is this rank's shard (distributed/sharded_refresh.py)
            store_basis(state, ctx.collective.basis(self, state, grad, 0 if state["side"] == "right" else 1))
        else:
            basis = state["basis"]  # (the broadcast's buffer, under data parallelism)
            buffer = torch.empty(basis.shape[0], state["rank"], dtype=basis.dtype, device=grad.device)
            store_basis(state, shared_result(ctx, state, lambda: self.new_basis(state, grad), buffer))
        state["refresh_step"] = ctx.step
        state["refreshes"] += 1

    def refresh_gradient(self, grad, ctx):
        """The gradient a refresh uses (averaged over ranks), or None when it is not finite or the
        step is already known bad (a skipped step keeps its subspaces)."""
        if ctx.collective is not None and not is_sharded(ctx):  # (FSDP2 has averaged it already)
            grad = ctx.collective.mean(grad)
        if is_fake(grad):
            return grad
        finite = torch.isfinite(grad.sum())
        if ctx.found_inf is not None:
            finite = finite & (ctx.found_inf.to(finite.device) == 0)
        if not (ctx.collective.all_true(finite) if is_sharded(ctx) else bool(finite)):  # shards: every rank agrees
            if ctx.found_inf is not None:
                ctx.found_inf.fill_(1.0)
            return None
        return grad

    def new_basis(self, state, grad) -> torch.Tensor:
        """The top-rank singular vectors on the matrix's side: exact fp32 SVD, or the randomized
        range finder with a sketch seeded by (seed, matrix, refresh count), so a resumed run draws
        the same sketch without RNG state."""
        if self.svd == "exact" or is_fake(grad):
            return svd_basis(grad, state["rank"], state["side"])
        generator = torch.Generator(device=grad.device).manual_seed(sketch_seed(self.seed, state))
        return randomized_basis(grad, state["rank"], state["side"], self.oversample, self.power_iters, generator)

    def _sums_full_gradient(self, state, ctx) -> bool:
        return self.subspace_from == "full_step" and ctx.accumulate > 1 and self.refresh_due(state, ctx)

    # -- hook operations -----------------------------------------------------------------------
    def accumulate(self, param, grad, state, ctx):
        if self._sums_full_gradient(state, ctx):
            add_to_buffer(state, "full_grad_acc", full_gradient(grad), ctx)
            return
        if ctx.is_first and self.refresh_due(state, ctx):
            grad = full_gradient(grad)
            self.refresh(state, grad, ctx)
        add_to_buffer(state, "grad_acc", project(grad, active_basis(state), state["side"]), ctx)

    def update(self, param, grad, state, ctx):
        low, grad_sq = self.projected_step(grad, state, ctx)
        check_step_gradient(grad_sq, ctx)
        self.low_rank_apply(param, low, state, ctx)
        return grad_sq

    def step_gradient(self, param, grad, state, ctx):
        return self.projected_step(grad, state, ctx)[0]

    def apply(self, param, low, state, ctx):
        """The update from a projected step gradient averaged over ranks; the projected norm (a
        lower bound of the full one) for the report."""
        grad_sq = check_step_gradient(torch.linalg.vector_norm(low).square(), ctx)
        self.low_rank_apply(param, low, state, ctx)
        return grad_sq

    def projected_step(self, grad, state, ctx):
        """The step's projected gradient (buffered micro-batches plus `grad`, in working precision,
        the basis refreshed first when due) and its squared norm for the global grad-norm report."""
        full = None
        if self._sums_full_gradient(state, ctx):
            full = take_buffer(state, "full_grad_acc", full_gradient(grad), ctx)
            self.refresh(state, full, ctx)
            low = working(project(full, active_basis(state), state["side"]))
        else:
            if ctx.is_first and self.refresh_due(state, ctx):
                grad = full_gradient(grad)  # (the refresh's SVD needs it whole; then it is projected as it is)
                self.refresh(state, grad, ctx)
            if ctx.accumulate == 1 and isinstance(grad, torch.Tensor):
                full = grad
            low = take_buffer(state, "grad_acc", project(grad, active_basis(state), state["side"]), ctx)
        # the true norm when the full step gradient is at hand, else the projected one (a lower bound;
        # also in projected backward, whose gradient is never m x n)
        consumed = full if full is not None else low
        grad_sq = torch.linalg.vector_norm(consumed, dtype=working(consumed[:0]).dtype).square()
        return low, grad_sq

    def low_rank_apply(self, param, low, state, ctx) -> None:
        self.low_rank_step(param, low, state, ctx)

    def low_rank_step(self, param, low, state, ctx) -> None:
        """Adam on the projected step gradient `low` (the first `rank` rows or columns of the
        moments), mapped back to the weight's shape and applied."""
        low = maybe_clip(low, ctx)
        state["step"] += 1
        rank, side = state["rank"], state["side"]
        low_direction = state_adam_direction(low, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                             self.betas, self.eps, lambda t: low_rank_view(t, rank, side),
                                             ctx.found_inf)
        self.apply_low_rank(param, low_direction, state, ctx)

    def apply_low_rank(self, param, low_direction, state, ctx) -> None:
        """W <- W - lr * scale * P N (with decay and the growth limit), a chunk of rows at a time:
        the m x n direction and the fp32 copy of a bf16 weight never exist whole."""
        growth = None
        if ctx.norm_growth:
            # ||P N||_F = ||N||_F because P has orthonormal columns (an SVD or QR basis; stored in
            # bf16 for bf16 weights, orthonormal to that rounding), so the update's norm needs no
            # m x n product.
            norm = torch.linalg.vector_norm(low_direction) * self.scale
            growth = growth_factor(norm, state["prev_update_norm"], ctx.norm_growth)
            keep_norm(state, norm * growth, ctx)
        basis, side = active_basis(state), state["side"]
        if (growth is None and param.dtype == low_direction.dtype and weight_storage(param) is None
                and update_backend() != "reference"):  # a dense weight the GEMM can write in place
            move_weight_by_gemm(param, low_direction, basis, side, self.scale, ctx)
            return
        for first, end in row_chunks(*param.shape):
            rows = project_back_rows(low_direction, basis, side, first, end).mul_(self.scale)
            update_weight(weight_rows(param, first, end), rows, ctx, growth)

    def config(self):
        return {"name": self.name, "rank": self.rank, "gap": self.gap, "scale": self.scale,
                "betas": list(self.betas), "eps": self.eps, "states": self.states,
                "subspace_from": self.subspace_from, "svd": self.svd, "refresh_share": self.refresh_share,
                "seed": self.seed, "oversample": self.oversample, "power_iters": self.power_iters,
                **self.projector_config()}

    def projector_config(self) -> dict:
        """The basis storage, when not dense (so configs of dense runs stay as they were)."""
        if self.projector == "dense":
            return {}
        return {"projector": self.projector, "projector_group": self.projector_group}


@torch.no_grad()
def move_weight_by_gemm(param, low_direction, basis, side: str, scale: float, ctx) -> None:
    """update_weight's W <- W (1 - lr wd) - lr * scale * P N for an fp32 (fp64) weight, as one
    addmm_ per row chunk (projector.add_projected_back_rows_). A step found bad zeroes N (r x n,
    not m x n) and keeps the weight from decaying (the factor selected on the device)."""
    beta = 1 - ctx.lr * ctx.weight_decay
    if ctx.found_inf is not None:
        low_direction = torch.where(ctx.found_inf > 0, 0.0, low_direction)
        decoupled_weight_decay(param, ctx.lr, ctx.weight_decay, ctx.found_inf)
        beta = 1.0
    for first, end in row_chunks(*param.shape):
        add_projected_back_rows_(param[first:end], low_direction, basis, side, first, end,
                                 alpha=-ctx.lr * scale, beta=beta)


def shared_result(ctx, state: dict, compute, buffer: torch.Tensor) -> torch.Tensor:
    """compute() on this process; under data parallelism on the matrix's owner rank only, then
    broadcast into `buffer` on every rank (SVDs of the same matrix on two ranks need not agree
    to the bit, signs included)."""
    if ctx.collective is None:
        return compute()
    owner = ctx.collective.owner(state["index"])
    if ctx.collective.rank == owner:
        buffer.copy_(compute())
    return ctx.collective.broadcast(buffer, owner)


def is_sharded(ctx) -> bool:
    """Whether the parameter is an FSDP2 shard (ctx.collective is a distributed.fsdp.ShardGroup)."""
    return getattr(ctx.collective, "sharded", False)


def check_shard_dim(name: str, param, side: str) -> None:
    """A sharded GaLore matrix must be split on the dimension it does not project (rows for a
    right projection, columns for a left one), or its projection would need every shard."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return
    wanted = 0 if side == "right" else 1
    if [getattr(p, "dim", None) for p in placements] != [wanted]:
        raise ValueError(f"GaLore matrix {name} ({side} projection) is sharded as {placements}; shard it on dim "
                         f"{wanted} (distributed.fsdp.shard_model does)")


def sketch_seed(seed: int, state: dict) -> int:
    """A function of (seed, matrix, refresh count): reproducible and resumable without RNG state."""
    return ((seed * 1_000_003 + state["index"]) * 1_000_003 + state["refreshes"]) % 2**63


def active_basis(state: dict) -> torch.Tensor:
    """The basis columns in use: all of them for GaLore; the first `rank` of the capacity-sized
    basis for rules whose rank changes (AdaRankGrad). A low-bit basis is dequantized (a copy)."""
    basis = state["basis"]
    dense = basis if isinstance(basis, torch.Tensor) else basis.read()
    return dense[:, :state["rank"]]


def store_basis(state: dict, value: torch.Tensor) -> None:
    """Make `value` the first value.shape[1] columns of the basis: copied into a dense basis,
    encoded into a low-bit one (whose writes are whole: GaLore's rank is its capacity, and
    AdaRankGrad installs a full-capacity basis)."""
    basis = state["basis"]
    if isinstance(basis, torch.Tensor):
        basis[:, :value.shape[1]].copy_(value)
    else:
        basis.write(value)
