"""GaLore-AdamW: Adam in a low-rank subspace of the gradient (Zhao et al., 2024).

Every `gap` logical steps the basis P is recomputed from an fp32 SVD of the gradient; in between,
the gradient is projected (R = P^T G or G P), Adam runs on R, and the weight moves by
P * Adam(R) * scale. Adam's moments are r x n (or m x r) instead of m x n. The move is made a
chunk of rows at a time (optim/chunks.py), so no m x n fp32 temporary exists.

Accumulation: the subspace is fixed for the whole logical step. With `subspace_from` =
"first_micro_batch" (default) a refresh step takes its basis from the first micro-batch's
gradient and every micro-batch is projected at once, so no full gradient outlives its hook.
With "full_step" a refresh step instead sums the full gradients and takes the basis from the
sum (exactly what one big batch would give, at the cost of holding m x n fp32 per parameter
on refresh steps).
"""
import torch

from ..optim.chunks import row_chunks
from ..optim.clip import growth_factor
from ..optim.projector import (low_rank_view, project, project_back_rows, projected_shape, projection_side,
                                svd_basis)
from ..optim.state import make_state, working
from ..optim.state_adam import state_adam_direction
from .base import Rule, add_to_buffer, common_state, maybe_clip, take_buffer, update_weight

SUBSPACE_SOURCES = ("first_micro_batch", "full_step")


class GaLore(Rule):
    name = "galore"

    def __init__(self, rank: int = 128, gap: int = 200, scale: float = 0.25, betas=(0.9, 0.999),
                 eps=1e-8, states: str = "fp32", subspace_from: str = "first_micro_batch"):
        if rank < 1:
            raise ValueError(f"GaLore rank must be >= 1, got {rank}")
        if gap < 1:
            raise ValueError(f"GaLore refresh gap must be >= 1, got {gap}")
        if subspace_from not in SUBSPACE_SOURCES:
            raise ValueError(f"subspace_from must be one of {SUBSPACE_SOURCES}, got {subspace_from!r}")
        self.rank, self.gap, self.scale = rank, gap, scale
        self.betas, self.eps, self.states, self.subspace_from = tuple(betas), eps, states, subspace_from

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, name, param):
        if param.dim() != 2:
            raise ValueError(f"GaLore needs a matrix; {name} has shape {tuple(param.shape)}")
        side = projection_side(param.shape)
        rank = min(self.rank, *param.shape)
        low = projected_shape(param.shape, rank, side)
        basis_rows = param.shape[0] if side == "left" else param.shape[1]
        state = common_state(param)
        state.update(
            side=side, rank=rank, refresh_step=-1, refreshes=0,
            basis=torch.zeros(basis_rows, rank, dtype=param.dtype, device=param.device),
            exp_avg=make_state(low, self.states, signed=True, device=param.device, param_dtype=param.dtype),
            exp_avg_sq=make_state(low, self.states, signed=False, device=param.device, param_dtype=param.dtype),
            grad_acc=None,       # fp32 projected sum of earlier micro-batches
            full_grad_acc=None,  # fp32 full sum, only on refresh steps with subspace_from=full_step
        )
        return state

    def refresh_due(self, state, ctx) -> bool:
        return state["refresh_step"] < 0 or ctx.step - state["refresh_step"] >= self.gap

    def refresh(self, state, grad, ctx) -> None:
        active_basis(state).copy_(svd_basis(grad, state["rank"], state["side"]))
        state["refresh_step"] = ctx.step
        state["refreshes"] += 1

    def _sums_full_gradient(self, state, ctx) -> bool:
        return self.subspace_from == "full_step" and ctx.accumulate > 1 and self.refresh_due(state, ctx)

    # -- hook operations -----------------------------------------------------------------------
    def accumulate(self, param, grad, state, ctx):
        if self._sums_full_gradient(state, ctx):
            add_to_buffer(state, "full_grad_acc", grad, ctx)
            return
        if ctx.is_first and self.refresh_due(state, ctx):
            self.refresh(state, grad, ctx)
        add_to_buffer(state, "grad_acc", project(grad, active_basis(state), state["side"]), ctx)

    def update(self, param, grad, state, ctx):
        low, grad_sq = self.step_gradient(grad, state, ctx)
        self.low_rank_step(param, low, state, ctx)
        return grad_sq

    def step_gradient(self, grad, state, ctx):
        """The step's projected gradient (buffered micro-batches plus `grad`, in working precision,
        the basis refreshed first when due) and its squared norm for the global grad-norm report."""
        full = None
        if self._sums_full_gradient(state, ctx):
            full = take_buffer(state, "full_grad_acc", grad, ctx)
            self.refresh(state, full, ctx)
            low = working(project(full, active_basis(state), state["side"]))
        else:
            if ctx.is_first and self.refresh_due(state, ctx):
                self.refresh(state, grad, ctx)
            if ctx.accumulate == 1:
                full = grad
            low = take_buffer(state, "grad_acc", project(grad, active_basis(state), state["side"]), ctx)
        # the true norm when the full step gradient is at hand, else the projected one (a lower bound)
        consumed = full if full is not None else low
        grad_sq = torch.linalg.vector_norm(consumed, dtype=working(consumed[:0]).dtype).square()
        return low, grad_sq

    def low_rank_step(self, param, low, state, ctx) -> None:
        """Adam on the projected step gradient `low` (the first `rank` rows or columns of the
        moments), mapped back to the weight's shape and applied."""
        low = maybe_clip(low, ctx)
        state["step"] += 1
        rank, side = state["rank"], state["side"]
        low_direction = state_adam_direction(low, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                             self.betas, self.eps, lambda t: low_rank_view(t, rank, side))
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
            state["prev_update_norm"] = norm * growth
        basis, side = active_basis(state), state["side"]
        for first, end in row_chunks(*param.shape):
            rows = project_back_rows(low_direction, basis, side, first, end).mul_(self.scale)
            update_weight(param[first:end], rows, ctx, growth)

    def config(self):
        return {"name": self.name, "rank": self.rank, "gap": self.gap, "scale": self.scale,
                "betas": list(self.betas), "eps": self.eps, "states": self.states,
                "subspace_from": self.subspace_from}


def active_basis(state: dict) -> torch.Tensor:
    """The basis columns in use: all of them for GaLore; the first `rank` of the capacity-sized
    basis for rules whose rank changes (AdaRankGrad)."""
    return state["basis"][:, :state["rank"]]
