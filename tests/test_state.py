"""State storage precision over a long horizon: every precision keeps Adam's moments close to an
fp64 reference long after a gradient spike (bf16 with round-to-nearest froze the second moment)."""
import pytest
import torch

from streamtrain.optim.state import make_state

NUMEL = 8192   # above SMALL_TENSOR_NUMEL, so the requested precision is used
STEPS = 1500


def moments_after_a_spike(precision: str, seed: int = 0):
    """Adam's moments (beta 0.9 / 0.999) through one large gradient, then STEPS small ones,
    stored at `precision` between steps; returns (m, v) as read back, and the fp64 reference."""
    gen = torch.Generator().manual_seed(seed)
    m_state = make_state((NUMEL,), precision, signed=True)
    v_state = make_state((NUMEL,), precision, signed=False)
    m_ref = torch.zeros(NUMEL, dtype=torch.float64)
    v_ref = torch.zeros(NUMEL, dtype=torch.float64)
    for step in range(STEPS + 1):
        scale = 1.0 if step == 0 else 1e-2
        g = torch.randn(NUMEL, generator=gen) * scale
        m, v = m_state.read(), v_state.read()
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        m_state.write(m)
        v_state.write(v)
        m_ref.lerp_(g.double(), 0.1)
        v_ref.mul_(0.999).addcmul_(g.double(), g.double(), value=0.001)
    return m_state.read().double(), v_state.read().double(), m_ref, v_ref


@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_second_moment_decays_after_a_spike_at_every_precision(precision):
    m, v, m_ref, v_ref = moments_after_a_spike(precision)
    # exact: v ~ 1e-3 * 0.999^1500 (the spike, 2.2e-4) + 1e-4 (the small gradients' level)
    assert abs(v.mean() / v_ref.mean() - 1) < 0.02, (v.mean().item(), v_ref.mean().item())
    # the first moment forgets the spike in ~10 steps; its level is the small gradients'
    assert (m - m_ref).norm() / m_ref.norm() < 0.05


def test_bf16_states_round_stochastically_so_small_decays_are_not_lost():
    state = make_state((NUMEL,), "bf16", signed=False)
    state.write(torch.full((NUMEL,), 1e-3))
    for _ in range(200):
        state.write(state.read() * 0.999)  # a decay below half a bf16 ulp
    expected = 1e-3 * 0.999 ** 200
    assert abs(state.read().double().mean().item() / expected - 1) < 0.01
