"""The GaLore rule against a direct, obvious implementation of its math."""
import pytest
import torch

from streamtrain.rules.base import StepContext
from streamtrain.rules.galore import GaLore


def reference_galore(weight, grads, rank, gap, scale, lr, betas=(0.9, 0.999), eps=1e-8):
    """Textbook GaLore-Adam on one matrix: P from the SVD every `gap` steps (left when m <= n)."""
    W = weight.clone()
    m_rows, n_cols = W.shape
    left = m_rows <= n_cols
    m = v = P = None
    for t, G in enumerate(grads):
        if t % gap == 0:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = U[:, :rank] if left else Vh[:rank].T
        R = P.T @ G if left else G @ P
        if m is None:
            m, v = torch.zeros_like(R), torch.zeros_like(R)
        m = betas[0] * m + (1 - betas[0]) * R
        v = betas[1] * v + (1 - betas[1]) * R * R
        m_hat, v_hat = m / (1 - betas[0] ** (t + 1)), v / (1 - betas[1] ** (t + 1))
        N = m_hat / (v_hat.sqrt() + eps)
        W = W - lr * scale * (P @ N if left else N @ P.T)
    return W


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["left", "right"])
def test_galore_rule_equals_reference_math_across_a_refresh(shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    # gradients with a drifting dominant subspace, so a refresh changes the basis
    grads = [torch.randn(shape, generator=gen) + 3 * torch.outer(torch.randn(shape[0], generator=gen),
                                                                  torch.randn(shape[1], generator=gen))
             for _ in range(7)]
    rule = GaLore(rank=6, gap=3, scale=0.25)
    param = weight.clone()
    state = rule.init_state("w", param)
    bases = []
    for t, g in enumerate(grads):
        rule.update(param, g.clone(), state, StepContext(step=t, lr=1e-2, micro_index=0, accumulate=1))
        bases.append(state["basis"].clone())
    expected = reference_galore(weight, grads, rank=6, gap=3, scale=0.25, lr=1e-2)
    assert torch.allclose(param, expected, atol=1e-5, rtol=1e-5)
    assert state["refreshes"] == 3  # steps 0, 3, 6
    assert not torch.allclose(bases[2], bases[3])  # the refresh did change the basis
    assert torch.equal(bases[3], bases[5])          # and it holds between refreshes
    low = state["exp_avg"].read()
    assert low.shape == ((6, shape[1]) if shape[0] <= shape[1] else (shape[0], 6))


def test_rank_is_clamped_to_the_smaller_side():
    state = GaLore(rank=128).init_state("w", torch.zeros(8, 32))
    assert state["rank"] == 8 and state["basis"].shape == (8, 8)


def test_bad_galore_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        GaLore(rank=0)
    with pytest.raises(ValueError, match="gap"):
        GaLore(gap=0)
    with pytest.raises(ValueError, match="matrix"):
        GaLore().init_state("norm.weight", torch.zeros(8))
