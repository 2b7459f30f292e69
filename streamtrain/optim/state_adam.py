"""Adam's direction from moments held in state storages, by the selected backend (optim/backend.py).

GaLore (and AdaRankGrad) run Adam on r x n moments read whole and need the direction itself,
not a moved weight: it is projected back before the weight moves. Their moments may be
allocated at a larger capacity than the active rank (AdaRankGrad), so the caller says which part
is active with `active`, a function from the whole tensor to the active view.

- reference: adam_direction on the active views (fp32 working copies for bf16 and 8-bit).
- fused / compiled: the fused kernel on the active views when it can update them in place
  (contiguous: all of them, or the first rows); else adam_direction. 8-bit moments whose active
  part is the whole state go chunk by chunk through optim/adam8bit.py (its compiled kernel under
  `compiled`) without a full-size fp32 copy of either moment.
Both fast paths get the direction from the kernels' weight update: a zero weight moved with
lr = -1 and no decay holds the direction afterwards.
"""
import torch

from .adam import adam_direction
from .adam8bit import adam8bit_update_
from .backend import update_backend
from .chunks import flat_chunks
from .fused import fusable, fused_adam_direction, step_tensor
from .quant8 import BlockwiseState8bit


def state_adam_direction(grad: torch.Tensor, exp_avg, exp_avg_sq, step: int, betas: tuple[float, float],
                         eps: float, active=None, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """Adam's direction for `grad` (the active part's shape) at 1-based `step`; both moment
    storages are updated (not while `found_inf` is set: then the direction is 0)."""
    fast = update_backend() != "reference"
    if fast and isinstance(exp_avg, BlockwiseState8bit) and grad.shape == exp_avg.shape:
        return blockwise_direction(grad, exp_avg, exp_avg_sq, step, betas, eps, found_inf)
    m, v = exp_avg.read(), exp_avg_sq.read()
    m_active, v_active = (m, v) if active is None else (active(m), active(v))
    if fast and fusable(grad, m_active, v_active):
        direction = fused_adam_direction(grad, m_active, v_active, step_tensor(step, grad.device),
                                         betas=betas, eps=eps, found_inf=found_inf)
    else:
        direction = adam_direction(grad, m_active, v_active, step, *betas, eps, found_inf)
    exp_avg.write(m)
    exp_avg_sq.write(v)
    return direction


def blockwise_direction(grad, exp_avg, exp_avg_sq, step: int, betas, eps, found_inf=None) -> torch.Tensor:
    """The direction for whole 8-bit moments, a flat chunk at a time (no fp32 copy of them)."""
    flat = grad.reshape(-1)
    direction = torch.zeros(flat.shape, dtype=torch.float32, device=grad.device)
    step = step_tensor(step, grad.device)
    for start, end in flat_chunks(flat.numel()):
        adam8bit_update_(direction[start:end], flat[start:end], exp_avg, exp_avg_sq, start, step,
                         lr=-1.0, betas=betas, eps=eps, found_inf=found_inf)
    return direction.view(grad.shape)
