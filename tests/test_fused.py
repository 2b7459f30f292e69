"""The fast update paths (optim/fused.py, optim/adam8bit.py) against the reference ops: the same
moments, weights within fp32 rounding, 8-bit codes bit for bit, and a found_inf step that changes
nothing. The compiled kernel is compiled in the tests marked so (a few seconds each, once per
process); the others set the eager backends."""
import logging

import pytest
import torch

from streamtrain.engine import Engine
from streamtrain.memory.tracker import MemoryTracker
from streamtrain.methods import assign_rules
from streamtrain.optim import adam8bit, backend
from streamtrain.optim.adam import adam_direction
from streamtrain.optim.fused import advance_step_, fused_adamw_, step_tensor
from streamtrain.optim.quant8 import (BLOCK_SIZE, BlockwiseState8bit, code_lookup_table, code_map,
                                      nearest_code_boundaries, nearest_code_by_lookup, quantize_blockwise)
from streamtrain.optim.state import make_state
from streamtrain.optim.state_adam import state_adam_direction
from streamtrain.rules.adamw import AdamW
from streamtrain.rules.base import StepContext
from streamtrain.rules.galore import GaLore

from conftest import random_batches, tiny_model
from test_quant8 import fp32_neighbours_of_midpoints, hard_tensor

SHAPE = (67, 64)  # 4288 elements: 16 whole blocks and a partial one


def use(monkeypatch, name):
    monkeypatch.setenv(backend.ENV_VARIABLE, name)


def context(step, clip=None, weight_decay=0.1):
    return StepContext(step=step, lr=1e-2, micro_index=0, accumulate=1, weight_decay=weight_decay,
                       clip_per_tensor=clip)


def train(monkeypatch, name, rule, dtype=torch.float32, steps=4, clip=None):
    """`steps` updates of one weight under backend `name`; (weight, state)."""
    use(monkeypatch, name)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(SHAPE, generator=gen).to(dtype)
    torch.manual_seed(1234)  # seeds the streams stochastic rounding draws from (the states' own, the weight's)
    state = rule.init_state("w", param)
    for step in range(steps):
        grad = (torch.randn(SHAPE, generator=gen) * (step + 1)).to(dtype)
        rule.update(param, grad, state, context(step, clip))
    return param, state


def moments(state):
    return [t for key in ("exp_avg", "exp_avg_sq") for t in state[key].tensors().values()]


# -- the fused kernel (fp32, fp64 and bf16 dense states) ----------------------------------------

@pytest.mark.parametrize("states", ["fp32", "bf16"])
@pytest.mark.parametrize("clip", [None, 30.0])
def test_fused_adamw_keeps_the_reference_moments_and_weights_to_rounding(monkeypatch, states, clip):
    rule = lambda: AdamW(betas=(0.9, 0.95), states=states)  # noqa: E731
    fused, fused_state = train(monkeypatch, "fused", rule(), clip=clip)
    reference, reference_state = train(monkeypatch, "reference", rule(), clip=clip)
    # the moments see the same gradients and do the same arithmetic: the same bits
    assert all(torch.equal(a, b) for a, b in zip(moments(fused_state), moments(reference_state)))
    assert fused_state["step"] == reference_state["step"] == 4
    # the weight's last line rounds differently (lr/bc1 * m/denom): a few fp32 ulps after 4 steps
    torch.testing.assert_close(fused, reference, rtol=4e-7, atol=4e-7)
    assert (fused != reference).any()  # it did take the fused path


def test_fused_adamw_on_fp64_weights_equals_the_reference_to_fp64_rounding(monkeypatch):
    fused, _ = train(monkeypatch, "fused", AdamW(), dtype=torch.float64)
    reference, _ = train(monkeypatch, "reference", AdamW(), dtype=torch.float64)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, reference, rtol=1e-15, atol=1e-15)


def test_bf16_weights_round_with_the_reference_noise(monkeypatch):
    # the same seed draws the same noise; only where the fp32 values before rounding differ by an
    # ulp and the noise falls between them can the bf16 results differ, by one bf16 step
    fused, _ = train(monkeypatch, "fused", AdamW(), dtype=torch.bfloat16)
    reference, _ = train(monkeypatch, "reference", AdamW(), dtype=torch.bfloat16)
    differ = fused != reference
    assert differ.float().mean() < 1e-3
    bf16_step = reference.float().abs() * 2 ** -7
    assert bool(((fused.float() - reference.float()).abs() <= bf16_step).all())


def test_engine_adamw_with_accumulation_and_clipping_equals_the_reference_backend(monkeypatch):
    runs = []
    for name in ("fused", "reference"):
        use(monkeypatch, name)
        model = tiny_model()
        engine = Engine(model, assign_rules(model, "adamw"), lr=3e-3, weight_decay=0.1, accumulate=2,
                        clip_per_tensor=0.05).attach()
        for x, y in random_batches(6):
            engine.backward(model(x, y))
        runs.append(model)
    initial = tiny_model()
    assert max((a - b).abs().max() for a, b in zip(runs[0].parameters(), initial.parameters())) > 1e-3
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_update_keeps_no_temporaries(monkeypatch):
    # the reference ops hold several weight-sized fp32 temporaries; the kernel works in place
    scratch = {}
    for name in ("fused", "reference"):
        use(monkeypatch, name)
        rule, param, grad = AdamW(), torch.randn(2 ** 16), torch.randn(2 ** 16)
        state = rule.init_state("w", param)
        with MemoryTracker() as tracker:
            tracker.label(param, "weights")
            tracker.label(grad, "gradients")
            tracker.label_state(state)
            rule.update(param, grad, state, context(0))
        scratch[name] = tracker.max_by_category["temporaries"]
    assert scratch["reference"] > 3 * 2 ** 16 * 4
    assert scratch["fused"] < 64  # a few 0-d tensors (the step, the norm)


# -- found_inf: a bad step changes nothing, on the device ---------------------------------------

def one_chunk_update(rule, param, state, grad, found_inf):
    """AdamW.fused_chunk over the whole tensor, the step advanced as the engine will advance it."""
    step = step_tensor(state["step"], param.device).clone()  # (the shared one is read-only)
    advance_step_(step, found_inf)
    rule.fused_chunk(param.view(-1), grad.view(-1), None, state, 0, step, context(0), found_inf=found_inf)
    return step


def snapshot(param, state):
    return [param.clone()] + [t.clone() for t in moments(state)]


@pytest.mark.parametrize("states, dtype", [("fp32", torch.float32), ("bf16", torch.float32),
                                           ("8bit", torch.float32), ("8bit", torch.bfloat16)])
def test_found_inf_one_leaves_weight_moments_and_step_unchanged(monkeypatch, states, dtype):
    use(monkeypatch, "fused")
    param, state = train(monkeypatch, "fused", AdamW(states=states), dtype=dtype, steps=2)
    before = snapshot(param, state)
    step = one_chunk_update(AdamW(states=states), param, state, torch.randn(SHAPE).to(dtype), torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(param, state), before))
    assert step.item() == state["step"] == 2


@pytest.mark.parametrize("states", ["fp32", "8bit"])
def test_found_inf_zero_is_the_plain_update(monkeypatch, states):
    results = []
    for found_inf in (None, torch.zeros(())):
        param, state = train(monkeypatch, "fused", AdamW(states=states), steps=2)
        step = one_chunk_update(AdamW(states=states), param, state, torch.ones(SHAPE), found_inf)
        assert step.item() == 3
        results.append(snapshot(param, state))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fused_kernel_skips_on_found_inf_and_the_step_is_kept():
    weight, grad, m, v = torch.randn(1000), torch.randn(1000), torch.randn(1000), torch.rand(1000)
    before = [t.clone() for t in (weight, m, v)]
    step = torch.tensor(5.0)
    found_inf = torch.ones(())
    fused_adamw_(weight, grad, m, v, advance_step_(step, found_inf), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.1, found_inf=found_inf)
    assert step.item() == 5.0
    assert all(torch.equal(a, b) for a, b in zip((weight, m, v), before))


# -- 8-bit states -------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_lookup_encoder_equals_bucketize_on_every_boundary_and_special_value(signed):
    boundaries = nearest_code_boundaries(code_map(signed))
    x = torch.cat([fp32_neighbours_of_midpoints(code_map(signed)), boundaries, -boundaries, hard_tensor(signed),
                   torch.randn(100_000) * torch.logspace(-45, 1, 100_000),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, torch.inf, -torch.inf, torch.nan, 1e-45, -3e38]),
                   torch.tensor([-1], dtype=torch.int32).view(torch.float32)])  # a NaN with the sign bit set
    assert torch.equal(nearest_code_by_lookup(x, code_lookup_table(signed)),
                       torch.bucketize(x, boundaries, out_int32=True))


def test_eager_8bit_path_keeps_the_reference_codes(monkeypatch):
    # dequantize, the fused kernel, quantize: the fp32 moments equal the reference ones, so the codes do
    fused, fused_state = train(monkeypatch, "fused", AdamW(states="8bit"), clip=30.0)
    reference, reference_state = train(monkeypatch, "reference", AdamW(states="8bit"), clip=30.0)
    assert all(torch.equal(a, b) for a, b in zip(moments(fused_state), moments(reference_state)))
    torch.testing.assert_close(fused, reference, rtol=4e-7, atol=4e-7)


def test_compiled_8bit_kernel(monkeypatch):
    """One test compiles: the encoder's codes equal the eager quantizer's bit for bit; the whole
    update tracks the eager one; found_inf = 1 is a no-op."""
    encode = torch.compile(adam8bit.encode_blocks, dynamic=False)
    for signed in (True, False):
        x = hard_tensor(signed)  # zero block, outlier, tiny, ties, a partial last block of 77
        padded = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
        noise = torch.rand(padded.shape, generator=torch.Generator().manual_seed(5))
        for draws in (None, noise):  # nearest, and stochastic rounding with the same draws as eager
            codes, absmax = encode(padded, code_lookup_table(signed), code_map(signed), draws)
            eager_codes, eager_absmax = quantize_blockwise(
                x, code_map(signed), None if draws is None else draws.view(-1)[:x.numel()])
            assert torch.equal(codes.view(-1)[:x.numel()].to(torch.uint8), eager_codes)
            assert torch.equal(absmax, eager_absmax)

    compiled, compiled_state = train(monkeypatch, "compiled", AdamW(states="8bit"))
    eager, eager_state = train(monkeypatch, "fused", AdamW(states="8bit"))
    assert backend.update_backend() == "fused" and backend.requested_backend() == "fused"
    use(monkeypatch, "compiled")
    assert backend.update_backend() == "compiled"  # no compile failure fell back
    # Adam's arithmetic may round differently (an ulp), which can move a value across a code boundary
    for a, b in zip(moments(compiled_state), moments(eager_state)):
        if a.dtype == torch.uint8:
            assert (a != b).float().mean() < 1e-3
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)

    before = snapshot(compiled, compiled_state)
    step = one_chunk_update(AdamW(states="8bit"), compiled, compiled_state, torch.randn(SHAPE), torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(compiled, compiled_state), before))
    assert step.item() == 4

    # GaLore's direction from whole 8-bit moments: the same kernel moving a zero weight with lr = -1
    directions = []
    for name in ("compiled", "fused"):
        use(monkeypatch, name)
        torch.manual_seed(0)  # the states' rounding streams
        m, v = make_state((32, 256), "8bit", signed=True), make_state((32, 256), "8bit", signed=False)
        gen = torch.Generator().manual_seed(0)
        for step in (1, 2):
            direction = state_adam_direction(torch.randn(32, 256, generator=gen), m, v, step, (0.9, 0.999), 1e-8)
        directions.append(direction)
    torch.testing.assert_close(directions[0], directions[1], rtol=1e-5, atol=1e-6)


def test_a_failing_compiler_falls_back_to_the_eager_path_once_and_says_so(monkeypatch, caplog):
    def broken():
        def kernel(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return kernel
    monkeypatch.setattr(adam8bit, "compiled_kernel", broken)
    monkeypatch.setattr(backend, "_compile_failure", None)
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        fallback, fallback_state = train(monkeypatch, "compiled", AdamW(states="8bit"))
    assert backend.update_backend() == "fused"
    assert backend.describe_backend() == "fused (torch.compile failed: RuntimeError: no C++ compiler found)"
    assert len(caplog.records) == 1
    eager, eager_state = train(monkeypatch, "fused", AdamW(states="8bit"))
    assert torch.equal(fallback, eager)
    assert all(torch.equal(a, b) for a, b in zip(moments(fallback_state), moments(eager_state)))


# -- GaLore's low-rank moments, and the switch ---------------------------------------------------

@pytest.mark.parametrize("states", ["fp32", "8bit"])
def test_galore_low_rank_adam_equals_the_reference_backend(monkeypatch, states):
    def run(name):
        use(monkeypatch, name)
        rule = GaLore(rank=32, gap=1000, states=states)
        gen = torch.Generator().manual_seed(0)
        param = torch.randn(64, 256, generator=gen)
        torch.manual_seed(0)  # the states' rounding streams
        state = rule.init_state("w", param)  # 32 x 256 moments: 8-bit storage
        for step in range(3):
            rule.update(param, torch.randn(64, 256, generator=gen), state, context(step))
        return param, state
    fused, fused_state = run("fused")
    reference, reference_state = run("reference")
    assert fused_state["exp_avg"].precision == states
    assert all(torch.equal(a, b) for a, b in zip(moments(fused_state), moments(reference_state)))
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)


def test_a_strided_active_view_takes_the_reference_path(monkeypatch):
    # the kernel walks raw memory: on the first 3 of 8 columns it would write the wrong elements
    use(monkeypatch, "fused")
    grad = torch.randn(64, 3)
    m, v = make_state((64, 8)), make_state((64, 8))
    m.write(torch.randn(64, 8))
    v.write(torch.rand(64, 8))
    expected_m, expected_v = m.read().clone(), v.read().clone()
    expected = adam_direction(grad, expected_m[:, :3], expected_v[:, :3], 2)
    direction = state_adam_direction(grad, m, v, 2, (0.9, 0.999), 1e-8, lambda t: t[:, :3])
    assert torch.equal(direction, expected)
    assert torch.equal(m.read(), expected_m) and torch.equal(v.read(), expected_v)


def test_an_unknown_backend_is_refused_in_one_line(monkeypatch):
    use(monkeypatch, "fast")
    expected = "STREAMTRAIN_UPDATE_BACKEND='fast' is not an update backend; set it to one of reference, fused, compiled"
    with pytest.raises(backend.UpdateBackendError, match=expected):
        backend.update_backend()
    monkeypatch.delenv(backend.ENV_VARIABLE)
    assert backend.requested_backend() == "compiled"


@pytest.mark.parametrize("backend_name", ["reference", "fused"])
@pytest.mark.parametrize("rule_name", ["adamw", "galore", "adamw-growth"])
def test_every_update_path_is_a_device_side_no_op_while_found_inf_is_set(monkeypatch, backend_name, rule_name):
    """The engine's found_inf reaches every path (reference ops, fused kernels, GaLore's low-rank
    Adam and back-projection, the growth limiter): at 1 nothing changes, bit for bit; at 0 the
    result is the unmasked one, bit for bit."""
    use(monkeypatch, backend_name)
    growth = 1.5 if rule_name.endswith("growth") else None

    def run(found_inf):
        torch.manual_seed(0)
        rule = GaLore(rank=8, gap=100, svd="exact") if rule_name == "galore" else AdamW()
        gen = torch.Generator().manual_seed(0)
        param = torch.randn(SHAPE, generator=gen)
        state = rule.init_state("w", param)
        for step in range(3):
            ctx = StepContext(step=step, lr=1e-2, micro_index=0, accumulate=1, weight_decay=0.1,
                              norm_growth=growth, found_inf=None if step < 2 else found_inf)
            rule.update(param, torch.randn(SHAPE, generator=gen), state, ctx)
        return param, state

    clean, clean_state = run(None)
    zero, zero_state = run(torch.zeros(()))
    masked, masked_state = run(torch.ones(()))
    assert torch.equal(zero, clean) and all(torch.equal(a, b) for a, b in zip(moments(zero_state), moments(clean_state)))
    before = [t.clone() for t in moments(masked_state)]
    assert not torch.equal(masked, clean)  # the third step was masked
    # run again for two steps only: the masked third step must equal not taking it
    torch.manual_seed(0)
    rule = GaLore(rank=8, gap=100, svd="exact") if rule_name == "galore" else AdamW()
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(SHAPE, generator=gen)
    state = rule.init_state("w", param)
    for step in range(2):
        ctx = StepContext(step=step, lr=1e-2, micro_index=0, accumulate=1, weight_decay=0.1, norm_growth=growth)
        rule.update(param, torch.randn(SHAPE, generator=gen), state, ctx)
    assert torch.equal(masked, param)
    assert all(torch.equal(a, b) for a, b in zip(before, moments(state)))
    assert torch.equal(masked_state["prev_update_norm"], state["prev_update_norm"])


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])  # left and right projection
def test_galore_weight_move_in_one_gemm_equals_the_reference_ops_and_a_bad_step_moves_nothing(monkeypatch, shape):
    # fused backend: W (1 - lr wd) - lr scale P N as one addmm_ per row chunk; reference: op by op
    def run(name):
        use(monkeypatch, name)
        rule = GaLore(rank=16, gap=2, svd="exact")
        gen = torch.Generator().manual_seed(0)
        param = torch.randn(shape, generator=gen)
        state = rule.init_state("w", param)
        weights = []
        for step in range(4):
            ctx = context(step)
            ctx.found_inf = torch.tensor(1.0 if step == 3 else 0.0)  # step 3 is found bad elsewhere
            grad = torch.randn(shape, generator=gen)
            rule.update(param, grad, state, ctx)
            weights.append(param.clone())
        return weights
    fused, reference = run("fused"), run("reference")
    assert (fused[2] - fused[1]).abs().max() > 1e-3  # the steps move the weight (decay included)
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[3], fused[2]) and torch.equal(reference[3], reference[2])
