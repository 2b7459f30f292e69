"""Writing fp32 results into low-precision weights.

Stochastic rounding to bf16: add uniform random bits below bf16's 16 kept bits of the fp32
pattern, then truncate. The result is unbiased (E[round(x)] = x), so updates smaller than half a
bf16 step still move the weight on average instead of vanishing. Its scratch is a few temporaries
of the size of what it is given, so the update rules hand it one chunk of a weight at a time
(rules/base.py). On CPU the noise of consecutive chunks, drawn in order from one generator, is
the same stream as one draw over the whole tensor, so chunking changes no bit; on CUDA (Philox
offsets advance per call) the draws differ but have the same distribution.
"""
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    x = x.float()
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # adding to the low 16 bits carries into the kept bits with probability (low bits / 2^16)
    rounded = noise.add_(bits).bitwise_and_(-65536)  # clear the low 16 bits (0xFFFF0000 as int32)
    out = rounded.view(torch.float32)
    # inf/nan stay as they are: truncating a NaN whose payload sits only in the low 16 bits would
    # give inf, and a carry can wrap the largest NaN patterns to 0. (A finite value above the
    # largest bf16 may still round up to inf, as it does with round-to-nearest.)
    out = torch.where(torch.isfinite(x), out, x)
    return out.to(torch.bfloat16)


def read_weight(weight) -> torch.Tensor:
    """An fp32 copy of a low-precision weight: a bf16 view, or an INT8 weight's range (not a tensor:
    an optim.int8_weights.WeightRange, which reads and writes its storage)."""
    return weight.float() if isinstance(weight, torch.Tensor) else weight.read()


def write_weight(weight, new_value_fp32: torch.Tensor, stochastic: bool,
                 generator: torch.Generator | None = None, found_inf: torch.Tensor | None = None) -> None:
    """Copy an fp32 result into `weight`, rounding stochastically when it is bf16 or INT8 (an
    INT8 WeightRange rounds from its own stream and keeps its codes while `found_inf` is set; a bf16
    weight needs no mask: an unchanged value rounds to itself)."""
    if not isinstance(weight, torch.Tensor):
        weight.write(new_value_fp32, stochastic, found_inf)
    elif weight.dtype == torch.bfloat16 and stochastic:
        weight.copy_(stochastic_round_to_bf16(new_value_fp32, generator))
    else:
        weight.copy_(new_value_fp32)


def rounding_generator(device=None) -> torch.Generator:
    """A generator of its own for one stored tensor's stochastic rounding, seeded by a draw from
    the global RNG (so two runs seeded alike get the same streams, and a checkpoint restores it).
    Draws from a tensor's own stream do not depend on what else is rounded in between, so an update
    done chunk by chunk draws exactly the noise of the whole-tensor update (on CPU)."""
    with unset_fake_temporarily():  # the planner runs rules on fake tensors; a seed must be real
        seed = int(torch.randint(0, 2 ** 62, (1,)))
    return torch.Generator(device=device or "cpu").manual_seed(seed)
