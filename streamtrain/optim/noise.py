"""Counter-based uniform noise for the stochastic rounding of 8-bit states.

Each draw is a function of (seed, element index) alone: a 32-bit integer hash of the two
(multiply-xorshift rounds, the mixer of Wellons' "lowbias32" with multipliers below 2^31, so
every product of a 32-bit value fits in int64 without overflow), whose top 24 bits make a
fraction in [0, 1), the resolution of torch.rand's fp32 draws. A state draws one seed per write
from its own generator; the draws for its elements are then computed where they are used. The
compiled 8-bit kernel computes them in registers (no noise tensor is generated, stored or read:
at 1 thread those were two thirds of the 8-bit update's time), and the eager quantizer gets the
same values from the same function, so compiled, eager, chunked and whole writes agree bit for bit.
"""
import torch

MASK_32 = 0xFFFFFFFF
SEED_BOUND = 2 ** 31


def hashed_uniform(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """fp32 uniform [0, 1) draws, one per int64 `index` (0 <= index < 2^32), for a 0-d int64
    `seed` in [0, 2^31). `index` is overwritten (the hash runs in place: besides it, one int64
    temporary at a time, so an eager chunk's scratch stays small)."""
    x = index.mul_(0x2545F491).add_(seed).bitwise_and_(MASK_32)
    x = x.bitwise_xor_(x >> 16).mul_(0x7FEB352D).bitwise_and_(MASK_32)
    x = x.bitwise_xor_(x >> 15).mul_(0x5BD1E995).bitwise_and_(MASK_32)
    x = x.bitwise_xor_(x >> 16).bitwise_right_shift_(8)
    return x.float().mul_(1.0 / 2 ** 24)


def new_seed(generator: torch.Generator, device) -> torch.Tensor:
    """One seed from `generator` (a state's own stream), as a 0-d int64 tensor on `device`."""
    return torch.randint(0, SEED_BOUND, (), generator=generator, device=device, dtype=torch.int64)


def element_indices(first: torch.Tensor | int, shape, device) -> torch.Tensor:
    """first, first + 1, ... (int64) in `shape`: the flat indices of a range of a state."""
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(first, int):
        return torch.arange(first, first + numel, device=device, dtype=torch.int64).view(shape)
    return (torch.arange(numel, device=device, dtype=torch.int64) + first).view(shape)
