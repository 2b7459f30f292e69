"""bf16 stochastic rounding: small updates survive, the rounding is unbiased, inf/nan pass."""
import math

import torch

from streamtrain.optim.rounding import stochastic_round_to_bf16, write_weight
from streamtrain.rules.base import StepContext, apply_update

BF16_MAX = torch.finfo(torch.bfloat16).max


def bf16_neighbours(x: torch.Tensor):
    """The two bf16 values around fp32 `x`: truncated toward zero, and one bf16 step further out."""
    toward_zero = x.view(torch.int32) & -65536
    away = toward_zero + 65536
    return toward_zero.view(torch.float32), away.view(torch.float32)


def test_small_updates_follow_fp32_with_stochastic_rounding_and_stall_without():
    # 1000 updates of -1e-4 from 1.0: each is 1/39 of a bf16 step below 1.0 (2^-8), far under half
    # of it, so round-to-nearest never moves. 4096 weights are 4096 independent runs.
    g = torch.Generator().manual_seed(0)
    stochastic = torch.ones(4096, dtype=torch.bfloat16)
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    reference = torch.ones(4096, dtype=torch.float32)
    for _ in range(1000):
        write_weight(stochastic, stochastic.float() - 1e-4, stochastic=True, generator=g)
        write_weight(nearest, nearest.float() - 1e-4, stochastic=False)
        reference -= 1e-4
    target = reference[0].item()
    assert abs(target - 0.9) < 1e-4  # fp32 summation error only
    assert bool((nearest == 1.0).all())
    mean = stochastic.float().mean().item()
    # one run's spread is about sqrt(1000 p (1 - p)) steps, p = 1e-4 / 2^-8: 0.019
    spread = stochastic.float().std().item()
    within_7_percent = ((stochastic.float() - target).abs() < 0.07 * target).float().mean().item()
    print(f"\nafter 1000 x -1e-4: fp32 {target:.5f}, stochastic mean {mean:.5f} spread {spread:.4f} "
          f"({within_7_percent:.1%} of runs within 7%), round-to-nearest {nearest[0].item()}")
    assert abs(mean - target) < 0.002 * target
    assert 0.015 < spread < 0.025
    assert within_7_percent > 0.99


def test_apply_update_uses_the_contexts_rounding_mode():
    torch.manual_seed(0)
    for stochastic, expect_moved in ((True, True), (False, False)):
        weight = torch.ones(4096, dtype=torch.bfloat16)
        ctx = StepContext(step=0, lr=1e-4, micro_index=0, accumulate=1, stochastic_rounding=stochastic)
        for _ in range(200):
            apply_update(weight, torch.ones(4096), {}, ctx)
        moved = abs(weight.float().mean().item() - 0.98) < 0.002
        assert moved == expect_moved and (stochastic or bool((weight == 1.0).all()))


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    n, draws = 1024, 4000
    magnitudes = 10 ** (torch.rand(n, generator=g) * 12 - 6)
    x = torch.randn(n, generator=g).sign() * magnitudes           # both signs, 1e-6 .. 1e6
    x[:64] = x[:64].bfloat16().float()                            # exactly representable: never move
    x[64:128] = bf16_neighbours(x[64:128])[0] * (1 + 2 ** -9)     # 1/4 to 1/2 of the way to the next step
    low, high = bf16_neighbours(x)
    rounded = stochastic_round_to_bf16(x.expand(draws, n).contiguous(), generator=g).float()
    # every draw is one of the two neighbours ...
    assert bool(((rounded == low) | (rounded == high)).all())
    assert bool((rounded[:, :64] == x[:64]).all())
    # ... and the mean lands on x: Hoeffding gives P(|mean - x| >= t step) <= 2 exp(-2 draws t^2)
    step = high - low  # negative for negative x: positive errors below point away from zero
    bias_in_steps = (rounded.mean(dim=0) - x).abs() / step.abs()
    t = math.sqrt(math.log(2 * n / 1e-6) / (2 * draws))          # all n within t, failure odds 1e-6
    worst = bias_in_steps.max().item()
    # round-to-nearest, for contrast: those inputs stay at least a quarter step off
    nearest_bias = ((x.bfloat16().float() - x).abs() / step.abs())[64:128].min().item()
    print(f"\nworst |mean - x| = {worst:.4f} bf16 steps (bound {t:.4f}); round-to-nearest: {nearest_bias:.4f}")
    assert worst < t < nearest_bias
    # the signed average error over all elements is far tighter than the per-element bound
    signed_bias = ((rounded.mean(dim=0) - x) / step).mean().item()
    assert abs(signed_bias) < 5 * 0.5 / math.sqrt(n * draws)


def test_inf_nan_and_exact_values_pass_through():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([math.inf, -math.inf, math.nan, BF16_MAX, -BF16_MAX, 0.0, -0.0, 1.0, -2.0])
    rounded = stochastic_round_to_bf16(special.expand(1000, -1).contiguous(), generator=g)
    assert rounded.dtype == torch.bfloat16
    assert bool((rounded[:, 0] == math.inf).all()) and bool((rounded[:, 1] == -math.inf).all())
    assert bool(rounded[:, 2].isnan().all())
    assert bool((rounded[:, 3:].float() == special[3:]).all())  # bf16 values round to themselves
    assert bool(rounded[:, 6].float().signbit().all())        # -0.0 keeps its sign
    # NaNs (both signs) whose payload is only in the low 16 bits (truncation alone makes them inf) or
    # whose pattern is all ones (a carry would wrap it to 0)
    nans = torch.tensor([0x7F800001, -0x7FFFFF, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    assert bool(nans.isnan().all())
    assert bool(stochastic_round_to_bf16(nans.expand(1000, -1).contiguous(), generator=g).isnan().all())
