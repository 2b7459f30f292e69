"""AdamW on block-wise 8-bit moments, one flat chunk at a time: decode, Adam, encode.

Two implementations of the same update (the backend switch in optim/backend.py picks):
- eager: decode the chunk of both moments (quant8.dequantize_blockwise), run the fused kernel
  (optim/fused.py), encode them (quant8.quantize_blockwise, rounding stochastically from each state's own stream).
  About a dozen passes over memory.
- compiled: `adam8bit_blocks_` below, written once in plain torch ops and compiled by
  torch.compile into one kernel (C++ from inductor on CPU, Triton on CUDA) that, block by
  block, decodes the moments, runs Adam on fp32 values in registers and writes the new bytes
  and the weight (a block's 256 bytes are read twice from cache: for its new absmax, then to
  encode); the same design as torchao's low-bit optimizers. Its encoder finds the nearest code
  by table lookup (quant8.nearest_code_by_lookup) instead of bucketize's binary search, with
  the same codes bit for bit, and rounds stochastically from the nearest code with the same draws
  the eager path takes (quant8.stochastic_from_nearest), computed in the kernel from the state's
  seed and each element's index (optim/noise.py) instead of read from a noise tensor. Its Adam arithmetic rounds
  differently from the eager kernels,
  which use fused multiply-adds (lerp, addcmul) that inductor's CPU code does not: an ulp here
  and there, which can move a moment across a code boundary (a few elements in a million).

The compiled kernel works on whole 256-element blocks, (blocks, 256) views: a tensor's last,
partial block goes the eager way, whatever the chunking (so chunked and whole updates agree bit
for bit). The block count is marked dynamic, so one compilation serves every chunk length;
another is made per dtype of the gradient, and for a chunk of exactly one block (dynamo
specializes a dimension of 1).

`found_inf` (optional 0-d float tensor): at 1.0 weight, codes and scales stay as they were,
selected on the device, and the caller keeps the step count (fused.advance_step_).
"""
import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

from .backend import record_compile_failure, update_backend
from .fused import fused_adamw_
from .noise import element_indices, hashed_uniform
from .quant8 import BLOCK_SIZE, code_lookup_table, nearest_code_by_lookup, stochastic_from_nearest

_compiled_kernel = None


def adam8bit_blocks_(weight, grad, m_codes, m_absmax, v_codes, v_absmax, m_code, v_code, m_table, v_table,
                     scalars, clip, found_inf, first_index, m_seed=None, v_seed=None) -> None:
    """One AdamW update in place of `weight` (fp32) and the 8-bit moments, all (blocks, 256)
    but the (blocks,) scales. `scalars` is kernel_scalars(...); 0-d tensors: `clip` (a gradient
    factor, 1 when not clipping), `found_inf` (1: change nothing). Tensors, not Python floats
    or None, so that one compiled graph serves every value (dynamo compiles anew for each value
    of a float in float arithmetic, and for None): a run needs one graph per gradient dtype.
    `first_index` (0-d int64): the flat index of the first element in its states; `m_seed`,
    `v_seed` (0-d int64): the moments' rounding seeds, whose uniform draws (optim/noise.py, a
    hash of seed and element index) are computed here, in registers; None (a graph of its own)
    rounds to the nearest code."""
    lr, decay, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, bias_correction2_sqrt = (
        scalars.unbind())
    m = m_code[m_codes.int()] * m_absmax[:, None]          # dequantize_blockwise's arithmetic
    v = v_code[v_codes.int()] * v_absmax[:, None]
    g = grad.float() * clip
    m = m.lerp(g, one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    direction = (m / bias_correction1) / (v.sqrt() / bias_correction2_sqrt + eps)
    new_weight = weight * decay - lr * direction
    new_m_codes, new_m_absmax = encode_blocks(m, m_table, m_code, draws(m_seed, first_index, weight))
    new_v_codes, new_v_absmax = encode_blocks(v, v_table, v_code, draws(v_seed, first_index, weight))
    keep = found_inf > 0
    # codes are selected as int32 (inductor's CPU code blends uint8 vectors slowly), then narrowed
    for target, value in ((weight, new_weight), (m_codes, new_m_codes), (m_absmax, new_m_absmax),
                          (v_codes, new_v_codes), (v_absmax, new_v_absmax)):
        old = target.int() if target.dtype == torch.uint8 else target
        target.copy_(torch.where(keep, old, value).to(target.dtype))


def draws(seed, first_index, like):
    """The uniform draws of a moment with rounding seed `seed` (None: round to nearest) for the
    elements of `like`, the first at flat index `first_index`."""
    return None if seed is None else hashed_uniform(seed, element_indices(first_index, like.shape, like.device))


def kernel_scalars(step: torch.Tensor, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float) -> torch.Tensor:
    """The kernel's scalars on the step's device: lr, 1 - lr wd, 1 - beta1, beta2, 1 - beta2, eps
    and the bias corrections 1 - beta1^t and sqrt(1 - beta2^t), in fp64 rounded to fp32 as
    adam_direction's Python floats are. A few 0-d ops per chunk, read by the step tensor on
    its device (no host sync), instead of a power per element in the kernel."""
    beta1, beta2 = betas
    constants = torch.tensor([lr, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps],
                             dtype=torch.float64, device=step.device)
    t = step.double()
    corrections = torch.stack([1 - beta1 ** t, (1 - beta2 ** t).sqrt()])
    return torch.cat([constants, corrections]).float()


def encode_blocks(blocks: torch.Tensor, table: torch.Tensor, code: torch.Tensor,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quant8.quantize_blockwise of whole (blocks, 256) fp32 blocks, by table lookup: (int32
    code indices, fp32 absmax per block); with `noise`, rounded stochastically."""
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = blocks / scale[:, None]
    nearest = nearest_code_by_lookup(normalized, table)
    if noise is None:
        return nearest, absmax
    return stochastic_from_nearest(normalized, nearest, code, noise), absmax


def adam8bit_update_(weight, grad, exp_avg, exp_avg_sq, start: int, step: torch.Tensor, *, lr: float,
                     betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                     clip: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """AdamW on elements [start, start + grad.numel()) of two BlockwiseState8bit moments, and on
    the matching flat fp32 chunk `weight` (in place). `start` is a multiple of 256."""
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip, found_inf=found_inf)
    whole = grad.numel() // BLOCK_SIZE * BLOCK_SIZE
    if whole and update_backend() == "compiled" and compiled_update_(weight[:whole], grad[:whole], exp_avg,
                                                                      exp_avg_sq, start, step, **hyper):
        if whole == grad.numel():
            return
        weight, grad, start = weight[whole:], grad[whole:], start + whole
    eager_update_(weight, grad, exp_avg, exp_avg_sq, start, step, **hyper)


def eager_update_(weight, grad, exp_avg, exp_avg_sq, start, step, *, lr, betas, eps, weight_decay, clip,
                  found_inf) -> None:
    """Decode, the fused kernel, encode: op by op."""
    end = start + grad.numel()
    m, v = exp_avg.read_range(start, end), exp_avg_sq.read_range(start, end)
    g = grad.float() if clip is None else grad.float() * clip
    fused_adamw_(weight, g, m, v, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 found_inf=found_inf)
    exp_avg.write_range(start, m, found_inf)
    exp_avg_sq.write_range(start, v, found_inf)


def compiled_update_(weight, grad, exp_avg, exp_avg_sq, start, step, **hyper) -> bool:
    """The compiled kernel on whole blocks; False (nothing changed) when torch.compile fails.

    Tracked or not, a run computes the same bits: under a dispatch mode (the memory tracker) the
    kernel runs with the mode set aside. That hides nothing the tracker counts, since the kernel
    updates its inputs in place and allocates no scratch beyond per-block sums. On fake tensors
    (the planner) there is nothing to compute, and nothing allocated to show."""
    # the rounding seeds are drawn first, from each state's own stream
    streams = [s.generator.get_state() if s.generator is not None else None for s in (exp_avg, exp_avg_sq)]
    seeds = [state.noise_seed(start) for state in (exp_avg, exp_avg_sq)]
    if any(is_fake(t) for t in (weight, grad, exp_avg.codes)):
        return True
    with _disable_current_modes():
        done = run_compiled_kernel(weight, grad, exp_avg, exp_avg_sq, start, step, seeds=seeds, **hyper)
    if not done:  # the eager path draws the same noise again
        for state, stream in zip((exp_avg, exp_avg_sq), streams):
            if stream is not None:
                state.generator.set_state(stream)
    return done


def run_compiled_kernel(weight, grad, exp_avg, exp_avg_sq, start, step, *, lr, betas, eps, weight_decay, clip,
                        found_inf, seeds) -> bool:
    blocks = slice(start // BLOCK_SIZE, (start + grad.numel()) // BLOCK_SIZE)
    codes = slice(start, start + grad.numel())
    device = weight.device
    args = [weight.view(-1, BLOCK_SIZE), grad.view(-1, BLOCK_SIZE),
            exp_avg.codes[codes].view(-1, BLOCK_SIZE), exp_avg.absmax[blocks],
            exp_avg_sq.codes[codes].view(-1, BLOCK_SIZE), exp_avg_sq.absmax[blocks]]
    for t in args:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    clip = torch.ones((), device=device) if clip is None else clip
    found_inf = torch.zeros((), device=device) if found_inf is None else found_inf
    args += [exp_avg.code, exp_avg_sq.code, code_lookup_table(exp_avg.signed, device),
             code_lookup_table(exp_avg_sq.signed, device), kernel_scalars(step, lr, weight_decay, betas, eps),
             clip, found_inf, torch.tensor(start, dtype=torch.int64, device=device)] + seeds
    try:
        compiled_kernel()(*args)
    except Exception as error:  # noqa: BLE001 - a compiler missing or failing: the eager path still works
        record_compile_failure(error)
        return False
    return True


def compiled_kernel():
    """adam8bit_blocks_ under torch.compile, made once per process (dynamo caches the graphs)."""
    global _compiled_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(adam8bit_blocks_, dynamic=False)
    return _compiled_kernel
