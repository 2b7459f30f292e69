"""AdaRankGrad: GaLore with a per-matrix adaptive rank (Refael et al., 2024).

Same hook semantics as GaLore (rules/galore.py, which this subclasses): the subspace is fixed for
the whole logical step, every micro-batch is projected at once and the projected gradients are
summed; Adam runs on the sum at the last micro-batch. What changes is when and how a matrix
refreshes its subspace, decided once per logical step, on its first micro-batch:

- Rank. A refresh computes the top-r_max singular vectors (exact SVD or the randomized range
  finder) and keeps the smallest rank r whose subspace holds a fraction `eta` of the gradient's
  energy ||G||_F^2, clamped to [r_min, r_max].
- When. A matrix refreshes when its projected step gradient has converged: its norm, relative to
  the norm at the last refresh, falls below `converge_threshold`; or when `max_interval` steps
  have passed. At most ceil(refresh_share * matrices) matrices refresh in one logical step; a due
  matrix refused for lack of room waits in a first-in-first-out queue that goes before matrices
  that became due later (hook order alone would starve the layers whose hooks fire last). This
  staggers the SVD time and memory spikes, including the first subspaces: a matrix with no
  subspace yet waits untouched (no update, no weight decay) until it gets one. Convergence is
  judged at the step boundary (end_step) for all matrices at once: one device sync per step.
- Moments. On a refresh Adam's moments move into the new basis with R = Q_new^T Q_old (r_new x
  r_old, so a rank change is handled too): m_new = R m_old, and the second moment by the
  non-negative transfer v_new = (R o R) v_old (optim/projector.transfer_moments). Adam's step
  count (bias correction) carries on.
- Memory. Moments and basis are allocated once at capacity r_max; the active rank is
  state['rank'] and the rule works on the first `rank` rows/columns (views), so a rank change
  never reallocates, and the memory planner sees the capacity.

Under FakeTensorMode (the memory planner) data-dependent choices cannot be made: the rank stays at
capacity and refreshes follow the schedule only (first subspace, max_interval, the cap).
"""
import math

import torch
from torch._subclasses.fake_tensor import is_fake

from ..optim.projector import (SVD_METHODS, basis_and_spectrum, basis_rotation, energy_rank,
                               low_rank_view, transfer_moments)
from ..optim.state import working
from .galore import GaLore, active_basis, shared_result, sketch_seed, store_basis


class AdaRankGrad(GaLore):
    name = "adarankgrad"

    def __init__(self, eta: float = 0.9, r_min: int = 8, r_max: int = 128, svd: str = "randomized",
                 oversample: int = 8, power_iters: int = 2, converge_threshold: float = 0.5,
                 max_interval: int = 200, refresh_share: float = 0.25, scale: float = 0.25,
                 betas=(0.9, 0.999), eps: float = 1e-8, states: str = "fp32", seed: int = 0,
                 projector: str = "dense", projector_group: int = 256):
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"AdaRankGrad eta (energy fraction kept) must be in (0, 1], got {eta}")
        if not 1 <= r_min <= r_max:
            raise ValueError(f"AdaRankGrad needs 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
        if svd not in SVD_METHODS:
            raise ValueError(f"unknown svd method {svd!r}; choose one of {SVD_METHODS}")
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        if converge_threshold < 0:
            raise ValueError(f"converge_threshold must be >= 0 (0 disables it), got {converge_threshold}")
        if not 0.0 < refresh_share <= 1.0:
            raise ValueError(f"refresh_share must be in (0, 1], got {refresh_share}")
        super().__init__(rank=r_max, gap=max_interval, scale=scale, betas=betas, eps=eps, states=states, svd=svd,
                         refresh_share=refresh_share, seed=seed, oversample=oversample, power_iters=power_iters,
                         projector=projector, projector_group=projector_group)
        self.eta, self.r_min, self.r_max = eta, r_min, r_max
        self.converge_threshold, self.max_interval = converge_threshold, max_interval
        self.queue = RefreshQueue()  # (self.matrices, counted by GaLore.init_state, is the cap's base)

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, name, param):
        state = super().init_state(name, param)  # moments and basis at capacity min(r_max, m, n), its index
        state.update(capacity=state["rank"], converged=False,
                     refresh_norm=torch.zeros((), device=param.device),  # ||projected grad|| at refresh
                     last_norm=torch.zeros((), device=param.device))     # ... at the latest step
        return state

    # -- refresh policy ------------------------------------------------------------------------
    def refresh_cap(self) -> int:
        return math.ceil(self.refresh_share * self.matrices)

    def refresh_due(self, state, ctx) -> bool:
        """Whether this matrix refreshes now. Called once per logical step, on its first
        micro-batch (GaLore's hooks); asks the queue for one of the step's refresh slots."""
        last = state["refresh_step"]
        if last == ctx.step:
            return False
        due = last < 0 or ctx.step - last >= self.max_interval or state["converged"]
        return self.queue.grant(state["index"], ctx.step, due, self.refresh_cap())

    def end_step(self, engine) -> None:
        """Judge convergence for the next step: ||projected step gradient|| fell below
        converge_threshold * its norm at the last refresh. All matrices in one comparison."""
        states = [engine.states[n] for n, rule in engine.rules.items() if rule is self and n in engine.states]
        if not states or is_fake(states[0]["last_norm"]):  # the planner: refresh on the schedule only
            return
        last = torch.stack([s["last_norm"] for s in states])
        at_refresh = torch.stack([s["refresh_norm"] for s in states])
        for state, converged in zip(states, (last < self.converge_threshold * at_refresh).tolist()):
            state["converged"] = converged

    def refresh(self, state, grad, ctx) -> None:
        grad = self.refresh_gradient(grad, ctx)  # averaged over ranks; None when not finite
        if grad is None:
            return
        capacity = state["capacity"]
        buffer = torch.empty(state["basis"].shape[0], capacity + 1, dtype=torch.float32, device=grad.device)
        # the basis and, in an extra column, the chosen rank: one broadcast under data parallelism
        packed = shared_result(ctx, state, lambda: self.packed_subspace(state, grad), buffer)
        rank = capacity if is_fake(packed) else int(packed[0, capacity])
        self.install_basis(state, packed[:, :capacity].to(state["basis"].dtype), rank)
        state["refresh_step"] = ctx.step
        state["refreshes"] += 1
        state["converged"] = False

    def packed_subspace(self, state, grad) -> torch.Tensor:
        """The top-capacity basis, and the rank keeping `eta` of the energy in an extra column."""
        capacity, side = state["capacity"], state["side"]
        fake = is_fake(grad)
        generator = None
        if self.svd == "randomized" and not fake:
            generator = torch.Generator(device=grad.device).manual_seed(sketch_seed(self.seed, state))
        basis, singular = basis_and_spectrum(grad, capacity, side, self.svd, self.oversample,
                                             self.power_iters, generator)
        rank = capacity
        if not fake:
            total = torch.linalg.vector_norm(working(grad)).square()
            rank = energy_rank(singular, self.eta, min(self.r_min, capacity), capacity, total)
        column = torch.full((basis.shape[0], 1), float(rank), dtype=torch.float32, device=basis.device)
        return torch.cat([working(basis).float(), column], dim=1)

    def install_basis(self, state, basis: torch.Tensor, rank: int) -> None:
        """Make the first `rank` columns of `basis` the active subspace, carrying Adam's moments
        into it (see the module docstring). Writes into the capacity-sized tensors in place."""
        side = state["side"]
        if state["refresh_step"] >= 0 and state["step"] > 0:
            rotation = basis_rotation(basis[:, :rank], active_basis(state))
            for key, moment in zip(("exp_avg", "exp_avg_sq"), self.moved_moments(state, rotation)):
                stored = state[key].read()
                stored.zero_()  # rows/columns beyond the new rank start from zero if it grows later
                low_rank_view(stored, rank, side).copy_(moment)
                state[key].write(stored)
        store_basis(state, basis)
        state["rank"] = rank

    def moved_moments(self, state, rotation):
        side, rank = state["side"], state["rank"]
        m = low_rank_view(state["exp_avg"].read(), rank, side)
        v = low_rank_view(state["exp_avg_sq"].read(), rank, side)
        return transfer_moments(m, v, rotation.to(m.dtype), side)

    # -- hook operations -----------------------------------------------------------------------
    def low_rank_apply(self, param, low, state, ctx) -> None:
        if state["refresh_step"] < 0:  # no subspace yet (over the refresh cap): wait untouched
            return
        norm = torch.linalg.vector_norm(low)
        if ctx.found_inf is not None:  # a step found bad must not look converged or diverged
            norm = torch.where(ctx.found_inf > 0, state["last_norm"], norm)
        state["last_norm"].copy_(norm)
        if state["refresh_step"] == ctx.step:
            state["refresh_norm"].copy_(norm)
        self.low_rank_step(param, low, state, ctx)

    # -- checkpoints (the rule-level hooks of streamtrain/checkpoint.py) --------------------------
    def state_extra(self, engine) -> dict:
        return self.queue.state()

    def load_state_extra(self, engine, extra) -> None:
        self.queue.load_state(extra)

    # -- inspection ----------------------------------------------------------------------------
    def ranks(self, engine) -> dict[str, int]:
        """{parameter name: active rank} of the matrices this rule governs in `engine`."""
        return {name: engine.states[name]["rank"] for name, rule in engine.rules.items()
                if rule is self and name in engine.states}

    def config(self):
        return {"name": self.name, "eta": self.eta, "r_min": self.r_min, "r_max": self.r_max,
                "svd": self.svd, "oversample": self.oversample, "power_iters": self.power_iters,
                "converge_threshold": self.converge_threshold, "max_interval": self.max_interval,
                "refresh_share": self.refresh_share, "scale": self.scale, "betas": list(self.betas),
                "eps": self.eps, "states": self.states, "seed": self.seed, **self.projector_config()}


class RefreshQueue:
    """The per-step refresh cap. Each logical step grants at most `cap` refreshes; a due matrix
    refused for lack of room is queued with the step it was first refused, and queued matrices
    are served oldest first, before any matrix that became due later, so every wait is bounded.
    Lives in the rule object; checkpoints save it through AdaRankGrad.state_extra, so a resumed
    run grants the same refreshes as an uninterrupted one."""

    def __init__(self):
        self.step = None       # the logical step being counted
        self.granted = 0       # refreshes granted in it
        self.seen = set()      # matrices that asked in it
        self.waiting = {}      # matrix index -> step it was first refused

    def state(self) -> dict:
        """What carries over a step boundary: who asked last step and who is waiting since when."""
        return {"seen": sorted(self.seen), "waiting": sorted([i, since] for i, since in self.waiting.items())}

    def load_state(self, state: dict) -> None:
        self.step, self.granted = None, 0
        self.seen = set(state["seen"])
        self.waiting = {i: since for i, since in state["waiting"]}

    def grant(self, index: int, step: int, due: bool, cap: int) -> bool:
        if step != self.step:
            # a queued matrix that did not ask last step gets no gradient: it must not hold a slot
            self.waiting = {i: since for i, since in self.waiting.items() if i in self.seen}
            self.step, self.granted, self.seen = step, 0, set()
        self.seen.add(index)
        if not due:
            self.waiting.pop(index, None)
            return False
        mine = (self.waiting.get(index, step), index)
        ahead = sum(1 for i, since in self.waiting.items() if i not in self.seen and (since, i) < mine)
        if self.granted + ahead < cap:
            self.granted += 1
            self.waiting.pop(index, None)
            return True
        self.waiting.setdefault(index, step)
        return False
