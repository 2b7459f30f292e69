"""Full-rank AdamW: bias-corrected Adam with decoupled weight decay (torch.optim.AdamW's math)."""
import torch

from ..optim.adam import adam_direction
from ..optim.state import make_state
from .base import Rule, add_to_buffer, apply_update, common_state, maybe_clip, take_buffer


class AdamW(Rule):
    name = "adamw"

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, states: str = "fp32"):
        self.betas, self.eps, self.states = tuple(betas), eps, states

    def init_state(self, name, param):
        state = common_state(param)
        state["exp_avg"] = make_state(param.shape, self.states, signed=True, device=param.device, param_dtype=param.dtype)
        state["exp_avg_sq"] = make_state(param.shape, self.states, signed=False, device=param.device, param_dtype=param.dtype)
        state["grad_acc"] = None  # fp32 sum of earlier micro-batches, only while accumulating
        return state

    def accumulate(self, param, grad, state, ctx):
        add_to_buffer(state, "grad_acc", grad)

    def update(self, param, grad, state, ctx):
        g = take_buffer(state, "grad_acc", grad)
        grad_sq = torch.linalg.vector_norm(g).square()
        g = maybe_clip(g, ctx)
        state["step"] += 1
        m, v = state["exp_avg"].read(), state["exp_avg_sq"].read()
        direction = adam_direction(g, m, v, state["step"], *self.betas, self.eps)
        state["exp_avg"].write(m)
        state["exp_avg_sq"].write(v)
        apply_update(param, direction, state, ctx)
        return grad_sq

    def config(self):
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps, "states": self.states}
