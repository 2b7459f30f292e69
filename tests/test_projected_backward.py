"""Projected backward: GaLore matrices get their gradient projected from the layer's factors
(R = dY^T (X P)), never as the m x n gradient; the training math stays GaLore's."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import random_batches, tiny_model
from streamtrain.engine import Engine
from streamtrain.methods import assign_rules

# randomized refreshes: an exact SVD's singular vectors may flip sign on a rounding-level change of
# the gradient, and GaLore keeps its moments through a refresh, so two exact runs that differ by
# rounding part ways at the first refresh after step 0 (both paths, galore-torch's too)
GALORE = dict(rank=8, gap=2, galore={"svd": "randomized"})


def train(model, batches, accumulate=1, projected=True, method="galore", **options):
    engine = Engine(model, assign_rules(model, method, **{**GALORE, **options}), lr=1e-2, accumulate=accumulate,
                    projected_backward=projected).attach()
    for inputs, targets in batches:
        engine.backward(model(inputs, targets))
    return engine


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("method", ["galore", "adarankgrad"])
def test_projected_backward_trains_the_same_weights_as_the_full_gradient(accumulate, method):
    # in fp64, so that what is left is rounding (fp32 runs differ by ~1e-6 relative at step 6, through
    # Adam's normalisation of small projected entries)
    batches = random_batches(6 * accumulate)
    projected, full = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
    engine = train(projected, batches, accumulate, method=method)
    train(full, batches, accumulate, projected=False, method=method)
    assert len(engine._factored_linears) == 14  # 7 block linears x 2 layers: the path ran
    assert max_relative_difference(projected, full) < 1e-12


def test_projected_backward_equals_galore_torch_stepping_the_whole_model():
    galore_torch = pytest.importorskip("galore_torch")
    batches = random_batches(5)
    model, reference = tiny_model(), tiny_model()
    for net in (model, reference):  # the block linears train alone: the comparison is GaLore's
        for name, p in net.named_parameters():
            p.requires_grad_(name.endswith("proj.weight"))
    # eps = 0: galore-torch adds eps to sqrt(v) before the bias correction (see test_galore.py)
    engine = Engine(model, assign_rules(model, "galore", rank=8, gap=100, eps=0.0, galore={"svd": "exact"}),
                    lr=1e-2).attach()
    optimizer = galore_torch.GaLoreAdamW([{"params": [p for p in reference.parameters() if p.requires_grad],
                                           "rank": 8, "update_proj_gap": 100, "scale": 0.25, "proj_type": "std"}],
                                         lr=1e-2, weight_decay=0.0, eps=0.0, no_deprecation_warning=True)
    for inputs, targets in batches:
        engine.backward(model(inputs, targets))
        reference(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(engine._factored_linears) == 14
    assert max_relative_difference(model, reference) < 1e-5


def backward_matmul_flops(model, projected: bool) -> int:
    engine = Engine(model, assign_rules(model, "galore", rank=8, gap=100), lr=1e-3,
                    projected_backward=projected).attach()
    inputs, targets = random_batches(2, batch=2, seq=64)[0]
    engine.backward(model(inputs, targets))  # step 0 refreshes: the full gradient is needed once
    loss = model(inputs, targets)
    with FlopCounterMode(display=False) as counter:
        engine.backward(loss)
    return counter.get_total_flops()


def test_projected_backward_skips_the_full_weight_gradient_matmuls():
    # per block linear (m x n, 128 tokens, rank 8): the weight gradient dY^T X (128 m n multiply-adds)
    # and its projection G P (m n 8) become dY^T (X P) (128 * 8 (m + n)); 2 flops each, 2 layers
    full = backward_matmul_flops(tiny_model(), projected=False)
    projected = backward_matmul_flops(tiny_model(), projected=True)
    shapes = [(64, 64)] * 4 + [(128, 64), (128, 64), (64, 128)]
    saved = 2 * 2 * sum(128 * m * n + m * n * 8 - 128 * 8 * (m + n) for m, n in shapes)
    assert full - projected == saved


class TwiceUsed(torch.nn.Module):
    """One linear layer applied twice in a forward (its gradient has two factor pairs)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 12, bias=True)
        self.head = torch.nn.Linear(12, 1)

    def forward(self, x, targets):
        return (self.head(torch.tanh(self.proj(torch.tanh(self.proj(x))))).squeeze(-1) - targets).square().mean()


def test_a_layer_used_twice_in_one_backward_gets_both_uses_in_its_gradient():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, 12, generator=gen), torch.randn(4, 5, generator=gen)) for _ in range(4)]
    torch.manual_seed(0)
    projected = TwiceUsed()
    full = copy.deepcopy(projected)
    targets = ["proj"]
    engine = train(projected, batches, rank=4, targets=targets)
    train(full, batches, projected=False, rank=4, targets=targets)
    assert list(engine._factored_linears) == ["proj.weight"]
    assert max_relative_difference(projected, full) < 1e-5


def test_detach_restores_the_layers_own_forward():
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "galore", rank=8), lr=1e-3).attach()
    layer = model.get_submodule(next(iter(engine._factored_linears)).rpartition(".")[0])
    assert "forward" in vars(layer)
    engine.detach()
    assert "forward" not in vars(layer) and not engine._factored_linears


def test_a_copy_of_an_attached_model_computes_ordinary_gradients():
    model = tiny_model()
    Engine(model, assign_rules(model, "galore", rank=8), lr=1e-3).attach()
    copied = copy.deepcopy(model)  # (an EMA copy, a reference model): no engine takes its factors
    copied(*random_batches(1)[0]).backward()
    grad = copied.get_parameter("model.layers.0.mlp.up_proj.weight").grad
    assert grad is not None and grad.abs().sum() > 0


def test_the_factors_are_let_go_once_the_gradient_is_formed():
    # the update (and a refresh's SVD) must not hold X and dY: at 8192 tokens they outweigh a
    # 4096 x 11008 gradient 2.7x (the 7B rank-128 plan's peak is such an update)
    from streamtrain.projected_backward import LinearGradient
    gen = torch.Generator().manual_seed(0)
    x, dy, basis = (torch.randn(*shape, generator=gen) for shape in ((10, 6), (10, 4), (6, 2)))
    grad = LinearGradient([x], [dy])
    assert torch.allclose(grad.project(basis, "right"), (dy.T @ x) @ basis, atol=1e-6)
    assert grad.x is None and grad.dy is None
    with pytest.raises(RuntimeError, match="used once"):
        grad.full()
