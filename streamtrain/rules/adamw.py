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

Backends (optim/backend.py). `reference` runs adam_direction and update_weight on each chunk.
`fused` and `compiled` run PyTorch's fused AdamW kernel on each chunk (optim/fused.py): the
moment chunks of an fp32 state are views, so it updates them in place; bf16 moments and bf16
weights are worked on as fp32 copies and written back (a bf16 weight with stochastic rounding,
drawing the same noise as the reference path). 8-bit moments go through optim/adam8bit.py (one
compiled kernel under `compiled`). Clipping scales the gradient chunk before the kernel. The
norm-growth limiter always takes the reference path: its factor needs the whole update's norm
(the first pass) before the kernel may move any weight.
"""
import torch

from ..optim.adam import adam_direction
from ..optim.adam8bit import adam8bit_update_
from ..optim.backend import update_backend
from ..optim.chunks import block_square_sums, flat_chunks
from ..optim.clip import growth_factor
from ..optim.fused import fused_adamw_, step_tensor
from ..optim.quant8 import BLOCK_SIZE, BlockwiseState8bit, num_blocks
from ..optim.int8_weights import flat_weight
from ..optim.rounding import read_weight, write_weight
from ..optim.state import make_state, working, working_dtype
from .base import (Rule, add_to_buffer, check_step_gradient, clip_scale, common_state, keep_norm, local_part,
                   take_step_gradient, update_weight)


def squared_norm(flat: torch.Tensor) -> torch.Tensor:
    """||flat||^2 in working precision: one dot product for fp32/fp64 (one op per hook counts on
    small tensors), the upcasting norm for bf16."""
    if flat.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(flat, dtype=working_dtype(flat)).square()


class AdamW(Rule):
    name = "adamw"

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, states: str = "fp32"):
        self.betas, self.eps, self.states = tuple(betas), eps, states

    def init_state(self, name, param):
        state = common_state(param)
        shape = local_part(param).shape  # under FSDP2 the moments hold this rank's shard only
        state["exp_avg"] = make_state(shape, self.states, signed=True, device=param.device, param_dtype=param.dtype)
        state["exp_avg_sq"] = make_state(shape, self.states, signed=False, device=param.device, param_dtype=param.dtype)
        state["grad_acc"] = None  # fp32 sum of earlier micro-batches, only while accumulating
        return state

    def accumulate(self, param, grad, state, ctx):
        add_to_buffer(state, "grad_acc", grad, ctx)

    def step_gradient(self, param, grad, state, ctx):
        return take_step_gradient(state, "grad_acc", grad, ctx)  # upcast chunk by chunk in apply

    def apply(self, param, g, state, ctx):
        g, weight = g.reshape(-1), flat_weight(param)
        grad_sq = check_step_gradient(squared_norm(g), ctx)
        clip = clip_scale(g, ctx)
        state["step"] += 1
        if ctx.norm_growth or update_backend() == "reference":
            self.reference_update(weight, g, clip, state, ctx)
            return grad_sq
        step = step_tensor(state["step"], param.device)
        chunks = flat_chunks(g.numel())
        if len(chunks) == 1:  # (most tensors: no slicing)
            self.fused_chunk(weight, g, clip, state, 0, step, ctx, ctx.found_inf)
            return grad_sq
        for start, end in chunks:
            self.fused_chunk(weight[start:end], g[start:end], clip, state, start, step, ctx, ctx.found_inf)
        return grad_sq

    def reference_update(self, weight, g, clip, state, ctx) -> None:
        """adam_direction and update_weight on each chunk (the growth limiter's first pass first)."""
        growth = self.growth_scale(g, clip, state, ctx) if ctx.norm_growth else None
        m, v = state["exp_avg"], state["exp_avg_sq"]
        for start, end in flat_chunks(g.numel()):
            m_chunk, v_chunk = m.read_range(start, end), v.read_range(start, end)
            direction = self.chunk_direction(g[start:end], clip, m_chunk, v_chunk, state["step"], ctx.found_inf)
            m.write_range(start, m_chunk)
            v.write_range(start, v_chunk)
            update_weight(weight[start:end], direction, ctx, growth)

    def fused_chunk(self, weight, grad, clip, state, start, step, ctx, found_inf=None) -> None:
        """One chunk through the fused kernel (dense moments) or the 8-bit update, on an fp32
        (or fp64) weight chunk: a bf16 weight's chunk (or an INT8 WeightRange) is copied up and
        rounded back. `step` is the advanced step as a tensor; with `found_inf` at 1.0 nothing
        changes (fused.py)."""
        m, v = state["exp_avg"], state["exp_avg_sq"]
        work = weight if weight.dtype in (torch.float32, torch.float64) else read_weight(weight)
        hyper = dict(lr=ctx.lr, betas=self.betas, eps=self.eps, weight_decay=ctx.weight_decay,
                     found_inf=found_inf)
        if isinstance(m, BlockwiseState8bit):
            adam8bit_update_(work, grad, m, v, start, step, clip=clip, **hyper)
        else:
            end = start + grad.numel()
            m_chunk, v_chunk = m.read_range(start, end), v.read_range(start, end)
            g = working(grad) if clip is None else working(grad) * clip
            fused_adamw_(work, g, m_chunk, v_chunk, step, **hyper)
            if not m.updates_in_place:  # (fp32 chunks are views of the states: already stored)
                m.write_range(start, m_chunk)
                v.write_range(start, v_chunk)
        if work is not weight:
            write_weight(weight, work, ctx.stochastic_rounding, found_inf=found_inf)

    def chunk_direction(self, grad_chunk, clip, m_chunk, v_chunk, step, found_inf=None):
        """Adam's direction for one chunk; updates the moment chunks in place."""
        g = working(grad_chunk)
        if clip is not None:
            g = g * clip
        return adam_direction(g, m_chunk, v_chunk, step, *self.betas, self.eps, found_inf)

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
        keep_norm(state, norm * scale, ctx)
        return scale

    def config(self):
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps, "states": self.states}
