"""Full-rank AdamW: bias-corrected Adam with decoupled weight decay (torch.optim.AdamW's math).

The update walks the flattened tensor in chunks (optim/chunks.py): read a chunk of both moments,
run Adam on the matching chunk of the gradient, store the moments, move the matching chunk of the
weight. Every operation is elementwise, so this is the whole-tensor update bit for bit, with
scratch bounded by the chunk length instead of growing with the tensor (the embedding and the
lm_head of a 7B model have 131M elements each).

Global factors need the whole tensor first. Clipping's factor comes from the gradient's norm,
computed before the chunks without a copy. The norm-growth limiter needs the norm of the whole
update before any chunk may move: when it is on, a first pass runs Adam on copies of the moment
chunks only to sum the update's norm, and the second pass commits. That doubles Adam's compute
for this rule (not the memory); it is the price of a bounded peak with the limiter on.
"""
import torch

from ..optim.adam import adam_direction
from ..optim.chunks import block_square_sums, flat_chunks, flat_view
from ..optim.clip import growth_factor
from ..optim.quant8 import BLOCK_SIZE, num_blocks
from ..optim.state import make_state, working, working_dtype
from .base import Rule, add_to_buffer, clip_scale, common_state, take_step_gradient, update_weight


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
        add_to_buffer(state, "grad_acc", grad, ctx)

    def update(self, param, grad, state, ctx):
        g = take_step_gradient(state, "grad_acc", grad, ctx)  # upcast chunk by chunk below
        grad_sq = torch.linalg.vector_norm(g, dtype=working_dtype(g)).square()
        clip = clip_scale(g, ctx)
        state["step"] += 1
        g = g.reshape(-1)
        growth = self.growth_scale(g, clip, state, ctx) if ctx.norm_growth else None
        weight = flat_view(param)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        for start, end in flat_chunks(g.numel()):
            m_chunk, v_chunk = m.read_range(start, end), v.read_range(start, end)
            direction = self.chunk_direction(g[start:end], clip, m_chunk, v_chunk, state["step"])
            m.write_range(start, m_chunk)
            v.write_range(start, v_chunk)
            update_weight(weight[start:end], direction, ctx, growth)
        return grad_sq

    def chunk_direction(self, grad_chunk, clip, m_chunk, v_chunk, step):
        """Adam's direction for one chunk; updates the moment chunks in place."""
        g = working(grad_chunk)
        if clip is not None:
            g = g * clip
        return adam_direction(g, m_chunk, v_chunk, step, *self.betas, self.eps)

    def growth_scale(self, g, clip, state, ctx) -> torch.Tensor:
        """The norm-growth factor of this step's update (first pass: Adam on copies of the
        moment chunks, nothing stored), and the limited norm kept for the next step."""
        square_sums = torch.empty(num_blocks(g.numel()), dtype=working_dtype(g), device=g.device)
        for start, end in flat_chunks(g.numel()):
            m_chunk = state["exp_avg"].read_range(start, end).clone()
            v_chunk = state["exp_avg_sq"].read_range(start, end).clone()
            direction = self.chunk_direction(g[start:end], clip, m_chunk, v_chunk, state["step"])
            square_sums[start // BLOCK_SIZE:num_blocks(end)] = block_square_sums(direction)
        norm = square_sums.sum().sqrt()
        scale = growth_factor(norm, state["prev_update_norm"], ctx.norm_growth)
        state["prev_update_norm"] = norm * scale
        return scale

    def config(self):
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps, "states": self.states}
