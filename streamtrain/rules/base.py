"""What every update rule shares: the step context the engine hands to hooks, the rule
interface, and the last stage of every update (growth limit, weight decay, rounding)."""
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from ..optim.adam import decoupled_weight_decay
from ..optim.clip import clip_factor, clip_to_norm, limit_norm_growth
from ..optim.rounding import read_weight, write_weight
from ..optim.state import working


@dataclass
class StepContext:
    """The engine's view of the current micro-batch, read by every hook. Built by the engine
    once per micro-batch; rules never keep their own clock."""
    step: int                 # logical step being taken (0-based)
    lr: float                 # the schedule's value at `step`
    micro_index: int          # 0 .. accumulate-1
    accumulate: int
    weight_decay: float = 0.0
    clip_per_tensor: float | None = None   # max L2 norm of each tensor's step gradient
    norm_growth: float | None = None       # gamma of the norm-growth limiter
    stochastic_rounding: bool = True       # for bf16 weights
    buffer_device: torch.device | None = None  # where accumulation buffers live (None: beside the gradient)
    # the step's running non-finite flag, a 0-d float tensor on the device (1: a gradient of this
    # step was NaN or Inf): updates made while it is set are no-ops, selected on the device
    found_inf: torch.Tensor | None = None
    collective: object = None              # distributed.reducer.BucketReducer under data parallelism
    extras: dict = field(default_factory=dict)

    @property
    def is_first(self) -> bool:
        return self.micro_index == 0

    @property
    def is_last(self) -> bool:
        return self.micro_index == self.accumulate - 1


class Rule:
    """Interface of an update rule (subclass it).

    init_state(name, param)            -> dict of state (tensors, storages, python scalars)
    accumulate(param, grad, state, ctx)   fold a non-final micro-batch gradient
    update(param, grad, state, ctx)    -> 0-d tensor: squared norm of the step gradient consumed
        = apply(param, step_gradient(param, grad, state, ctx), state, ctx), split so that data
          parallelism can average the step gradient across ranks in between:
    step_gradient(param, grad, state, ctx) -> the local step gradient (buffered sum + grad; GaLore:
                                          its projection, what ranks all-reduce)
    apply(param, step_grad, state, ctx) -> squared norm; the update from the averaged step gradient,
                                          after check_step_gradient (the step's non-finite flag)
    end_step, sync, state_extra, load_state_extra, ranks: optional hooks, no-ops by default

    Updates honour ctx.found_inf: while it is set they change nothing (weights, moments, norms),
    selected on the device; the engine takes back the step count of such updates.

    Each rule object is a parameter group: `lr_scale` multiplies the engine's learning rate for
    the parameters it governs, and `weight_decay` (None: the engine's) is their decay, so norms,
    biases and embeddings can go undecayed under a rule object of their own.
    """
    name = "rule"
    projects_gradient = False  # takes a projected_backward.LinearGradient in place of the m x n gradient
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def init_state(self, name: str, param: torch.Tensor) -> dict:
        raise NotImplementedError

    def accumulate(self, param, grad, state: dict, ctx: StepContext) -> None:
        raise NotImplementedError

    def update(self, param, grad, state: dict, ctx: StepContext) -> torch.Tensor:
        return self.apply(param, self.step_gradient(param, grad, state, ctx), state, ctx)

    def step_gradient(self, param, grad, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, param, step_grad, state: dict, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def end_step(self, engine) -> None:
        """Work at the logical step boundary, after every hook (ReLoRA merges)."""

    def sync(self, engine) -> None:
        """Bring the model's structure in line with the engine's clock (ReLoRA wraps its matrices
        once past its warm start): at the start, and on load before weights and states go in."""

    def state_extra(self, engine):
        """Rule-level state beyond the per-parameter dicts (JSON-serialisable), for state_dict."""
        return None

    def load_state_extra(self, engine, extra) -> None:
        """Restore state_extra's output; called after the clock is restored, before sync."""

    def ranks(self, engine) -> dict[str, int]:
        """{parameter name: active rank} for rules whose rank changes (AdaRankGrad), else {}."""
        return {}

    def config(self) -> dict:
        """Hyperparameters, saved with checkpoints so a resume can refuse a different method."""
        return {"name": self.name}


def add_to_buffer(state: dict, key: str, value: torch.Tensor, ctx: StepContext) -> None:
    """Accumulate `value` into state[key] in working precision, taking ownership on the first call.
    With ctx.buffer_device (host RAM, --offload-accumulation) the buffer lives there: each
    micro-batch's value is copied over, then added."""
    buffered = state.get(key)
    if buffered is None:
        state[key] = working(value if ctx.buffer_device is None else value.to(ctx.buffer_device))
    else:
        buffered.add_(value.to(buffered.device))


def take_buffer(state: dict, key: str, value: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The working-precision sum of the buffered micro-batches and `value`; empties the buffer."""
    buffered = take_buffered(state, key, value, ctx)
    return working(value) if buffered is None else buffered.add_(value)


def take_step_gradient(state: dict, key: str, value: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Like take_buffer, but without an upcast copy of `value` when nothing is buffered: the
    result may be in the gradient's dtype, for updates that upcast it chunk by chunk."""
    buffered = take_buffered(state, key, value, ctx)
    return value if buffered is None else buffered.add_(value)


def take_buffered(state: dict, key: str, value: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    """state[key] (emptied) on `value`'s device: an offloaded buffer comes back as a copy, also
    when host and device are the same memory (the planner's CPU simulation of a GPU run), so the
    device-side copy is counted where a GPU would hold it."""
    buffered, state[key] = state.get(key), None
    if buffered is not None and ctx.buffer_device is not None:
        buffered = buffered.to(value.device, copy=True)
    return buffered


def check_step_gradient(grad_sq: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Fold the step gradient's squared norm into the step's non-finite flag, on the device,
    before the update moves anything (a NaN or Inf anywhere makes the norm non-finite, and so
    does a norm past fp32's range, no usable gradient either). Every rule's apply calls it: the
    norm it reports is the one pass over the gradient the check needs. Returns `grad_sq`."""
    if ctx.found_inf is not None:
        ctx.found_inf.masked_fill_(torch.isfinite(grad_sq).logical_not_(), 1.0)
        if getattr(ctx.collective, "sharded", False):  # FSDP2: a NaN in one rank's shard masks every rank's
            ctx.collective.agree(ctx.found_inf)
    return grad_sq


def maybe_clip(grad: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    return clip_to_norm(grad, ctx.clip_per_tensor) if ctx.clip_per_tensor else grad


def clip_scale(grad: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    """maybe_clip's factor (None when not clipping), for updates that scale chunk by chunk."""
    return clip_factor(grad, ctx.clip_per_tensor) if ctx.clip_per_tensor else None


def apply_update(param: torch.Tensor, direction: torch.Tensor, state: dict, ctx: StepContext) -> None:
    """W <- W (1 - lr wd) - lr * direction, with the optional norm-growth limit on `direction`
    and stochastic rounding when the weight is bf16."""
    if ctx.norm_growth:
        direction, norm = limit_norm_growth(direction, state["prev_update_norm"], ctx.norm_growth)
        keep_norm(state, norm, ctx)
    update_weight(param, direction, ctx)


def keep_norm(state: dict, norm: torch.Tensor, ctx: StepContext) -> None:
    """The growth limiter's memory of the last update norm (unchanged by a step found bad)."""
    if ctx.found_inf is not None:
        norm = torch.where(ctx.found_inf > 0, state["prev_update_norm"], norm)
    state["prev_update_norm"] = norm


def update_weight(weight: torch.Tensor, direction: torch.Tensor, ctx: StepContext,
                  scale: torch.Tensor | None = None) -> None:
    """apply_update's last stage, W <- W (1 - lr wd) - lr * (direction * scale), on any part
    of a weight (a view: chunked updates pass one chunk at a time, so the fp32 copy and the
    rounding scratch of a bf16 weight stay chunk-sized). `scale` is the norm-growth factor,
    computed by the caller from the whole update's norm. An INT8 weight's part is a WeightRange
    (optim/int8_weights.py): read in fp32 and written back with its own rounding."""
    if scale is not None:
        direction = direction * scale
    if ctx.found_inf is not None:  # a step found bad moves nothing (NaN * 0 would still be NaN)
        direction = torch.where(ctx.found_inf > 0, 0.0, direction)
    with torch.no_grad():
        if weight.dtype in (torch.float32, torch.float64):
            decoupled_weight_decay(weight, ctx.lr, ctx.weight_decay, ctx.found_inf)
            weight.add_(direction, alpha=-ctx.lr)
        else:
            w = read_weight(weight)
            decoupled_weight_decay(w, ctx.lr, ctx.weight_decay, ctx.found_inf)
            w.add_(direction, alpha=-ctx.lr)
            write_weight(weight, w, ctx.stochastic_rounding, found_inf=ctx.found_inf)


def local_part(t):
    """This rank's shard of a DTensor (an FSDP2 parameter or gradient; a view, so in-place updates
    reach the sharded storage), anything else as it is. Rules size their states by it."""
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def common_state(param: torch.Tensor) -> dict:
    """State every rule keeps: its update count and the last update norm (growth limiter)."""
    return {"step": 0, "prev_update_norm": torch.zeros((), device=param.device)}
