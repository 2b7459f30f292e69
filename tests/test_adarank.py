"""AdaRankGrad: randomized SVD and energy rank against exact oracles, moment transfer across a
basis change, the per-step refresh cap, the convergence trigger, and no reallocation on rank change."""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.models.llama import Llama, build_model
from streamtrain.models.presets import get_config
from streamtrain.optim.projector import (basis_and_spectrum, energy_rank, project, randomized_basis,
                                         svd_basis, transfer_moments)
from streamtrain.rules.adarank import AdaRankGrad
from streamtrain.rules.base import StepContext
from streamtrain.rules.galore import GaLore

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256,
            num_attention_heads=4, max_position_embeddings=64)


def tiny_config():
    return get_config("llama-9m", **TINY)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, 16), generator=gen), torch.randint(0, 256, (2, 16), generator=gen))
            for _ in range(n)]


def context(step, micro=0, accumulate=1):
    return StepContext(step=step, lr=1e-2, micro_index=micro, accumulate=accumulate)


def matrix_with_spectrum(m, n, singular_values, noise=0.0, seed=0):
    """U diag(s) V^T with random orthonormal U, V, plus Gaussian noise of std `noise`."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (U * torch.tensor(singular_values)) @ V.T + noise * torch.randn(m, n, generator=gen)


def captured_energy(grad, basis, side):
    return (project(grad, basis, side).square().sum() / grad.square().sum()).item()


def one_matrix(shape, **options):
    """An AdaRankGrad rule over one weight matrix, driven by hand (no engine)."""
    rule = AdaRankGrad(**{"svd": "exact", "r_min": 1, "r_max": 8, "converge_threshold": 0.0,
                          "max_interval": 100, "refresh_share": 1.0, **options})
    param = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return rule, param, rule.init_state("w", param)


def random_grads(shape, count, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


# -- oracles: randomized SVD and the energy rank -------------------------------------------------
@pytest.mark.parametrize("shape", [(120, 300), (300, 120)])  # left and right projection sides
@pytest.mark.parametrize("rank", [10, 24])
def test_randomized_svd_captures_99_percent_of_exact_energy(shape, rank):
    side = "left" if shape[0] <= shape[1] else "right"
    decaying = [40.0 / (i + 1) for i in range(20)]  # rank 20 with a decaying spectrum, plus noise
    grad = matrix_with_spectrum(*shape, decaying, noise=0.05)
    exact = captured_energy(grad, svd_basis(grad, rank, side), side)
    basis = randomized_basis(grad, rank, side, generator=torch.Generator().manual_seed(0))
    assert basis.shape == (min(shape), rank)
    assert torch.allclose(basis.T @ basis, torch.eye(rank), atol=1e-5)  # orthonormal columns
    assert captured_energy(grad, basis, side) >= 0.99 * exact
    assert exact > 0.9  # the oracle itself is meaningful: the top subspace holds most energy


def test_energy_rank_picks_the_smallest_rank_keeping_eta():
    s = torch.tensor([50.0, 25, 12, 6, 3, 2, 1, 1]).sqrt()  # energies sum to 100
    assert energy_rank(s, 0.5, 1, 8) == 1
    assert energy_rank(s, 0.7, 1, 8) == 2
    assert energy_rank(s, 0.85, 1, 8) == 3
    assert energy_rank(s, 0.985, 1, 8) == 7
    assert energy_rank(s, 0.7, 4, 8) == 4      # clamped up to r_min
    assert energy_rank(s, 0.85, 1, 2) == 2     # clamped down to r_max
    # relative to the true total: a truncated spectrum (half the energy missing) never looks complete
    assert energy_rank(s, 0.45, 1, 8, total_energy=200.0) == 4
    assert energy_rank(s, 0.9, 1, 8, total_energy=200.0) == 8
    with pytest.raises(ValueError, match="eta"):
        energy_rank(s, 1.5, 1, 8)
    with pytest.raises(ValueError, match="r_min"):
        energy_rank(s, 0.5, 9, 8)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_adaptive_rank_finds_the_rank_of_a_low_rank_plus_noise_gradient(svd):
    grad = matrix_with_spectrum(96, 160, [10.0] * 5, noise=1e-3)
    basis, s = basis_and_spectrum(grad, 32, "left", svd, generator=torch.Generator().manual_seed(0))
    total = grad.square().sum()
    assert energy_rank(s, 0.99, 1, 32, total) == 5
    assert energy_rank(s, 0.7, 1, 32, total) == 4  # 4 equal values hold 80% >= 70%, 3 hold 60%


# -- moments across a basis change ---------------------------------------------------------------
def orthonormal(rows, cols, seed):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def test_transfer_with_a_general_rotation_keeps_the_first_moment_and_a_nonnegative_second():
    q_old = orthonormal(30, 6, 0)
    rotation = orthonormal(6, 6, 1)
    q_new = q_old @ rotation
    m, v = torch.randn(6, 40), torch.rand(6, 40)
    m_new, v_new = transfer_moments(m, v, q_new.T @ q_old, "left")
    assert torch.allclose(q_new @ m_new, q_old @ m, atol=1e-5)      # same momentum in weight space
    assert (v_new >= 0).all()
    assert torch.allclose(v_new.sum(0), v.sum(0), atol=1e-5)        # (R o R) has unit row sums
    # a smaller new rank keeps exactly the retained coordinates
    m_kept, v_kept = transfer_moments(m, v, q_old[:, :3].T @ q_old, "left")
    assert torch.allclose(m_kept, m[:3], atol=1e-6) and torch.allclose(v_kept, v[:3], atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_same_basis_leaves_the_moments_unchanged(shape):
    rule, param, state = one_matrix(shape)
    for step, grad in enumerate(random_grads(shape, 3)):
        rule.update(param, grad, state, context(step))
    before = {k: state[k].read().clone() for k in ("exp_avg", "exp_avg_sq")}
    rule.install_basis(state, state["basis"].clone(), state["rank"])
    for key, value in before.items():
        assert torch.allclose(state[key].read(), value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_basis_rotated_within_its_span_gives_the_same_weight_update(shape):
    # Adam's per-coordinate normalisation commutes with signed permutations only, which is what
    # an SVD recomputed on the same subspace returns (order and signs of singular vectors)
    rule, param, state = one_matrix(shape)
    grads = random_grads(shape, 4)
    for step, grad in enumerate(grads[:3]):
        rule.update(param, grad, state, context(step))
    rank = state["rank"]
    signed_permutation = torch.eye(rank)[torch.randperm(rank, generator=torch.Generator().manual_seed(3))]
    signed_permutation[::2] *= -1
    rotated = copy.deepcopy((param, state))
    rule.install_basis(rotated[1], state["basis"] @ signed_permutation, rank)
    assert not torch.allclose(rotated[1]["basis"], state["basis"])
    weight_before = param.clone()
    rule.update(param, grads[3], state, context(3))
    rule.update(rotated[0], grads[3], rotated[1], context(3))
    assert state["refreshes"] == rotated[1]["refreshes"] == 1  # neither refreshed again
    assert torch.allclose(param - weight_before, rotated[0] - weight_before, atol=1e-5)
    assert (param - weight_before).abs().max() > 1e-3


# -- refresh policy ------------------------------------------------------------------------------
def test_no_logical_step_refreshes_more_matrices_than_the_cap():
    model = build_model(tiny_config(), seed=0)
    rules = assign_rules(model, "adarankgrad", rank=8, gap=3,
                         adarank=dict(r_min=2, converge_threshold=0.99, refresh_share=0.25))
    engine = Engine(model, rules, lr=1e-3, accumulate=2, weight_decay=0.1).attach()
    rule = next(r for r in rules.values() if isinstance(r, AdaRankGrad))
    names = list(rule.ranks(engine))
    assert len(names) == rule.matrices == 14 and rule.refresh_cap() == 4  # ceil(0.25 * 14)
    initial = {n: engine.params[n].detach().clone() for n in names}
    per_step, total_before = [], 0
    for i, (x, y) in enumerate(batches(16)):
        engine.backward(model(x, y))
        if i % 2 == 1:  # a logical step ended
            total = sum(engine.states[n]["refreshes"] for n in names)
            per_step.append(total - total_before)
            total_before = total
            if len(per_step) == 1:  # step 0: matrices without a subspace waited untouched
                waited = [n for n in names if engine.states[n]["refreshes"] == 0]
                assert len(waited) == 10
                assert all(torch.equal(engine.params[n], initial[n]) for n in waited)
                assert all(engine.states[n]["step"] == 0 for n in waited)  # Adam's clock too
            if len(per_step) == 4:  # queued matrices go first: nobody waits past ceil(14 / 4) steps
                assert all(engine.states[n]["refreshes"] >= 1 for n in names)
    assert max(per_step) == 4 and per_step[:3] == [4, 4, 4]
    assert all(engine.states[n]["refreshes"] >= 2 for n in names)  # max_interval=3 over 8 steps
    assert all(2 <= r <= 8 for r in rule.ranks(engine).values())


class OneMatrix(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))


def refresh_steps_under_gradients(rule, grads):
    """Train one matrix through the engine with the given gradients (loss = sum(W * G) has
    gradient G); the step of the latest refresh after each logical step."""
    model = OneMatrix(grads[0].shape)
    engine = Engine(model, {"w": rule}, lr=1e-2).attach()
    refresh_steps = []
    for grad in grads:
        engine.backward((model.w * grad).sum())
        refresh_steps.append(engine.states["w"]["refresh_step"])
    return refresh_steps, engine.states["w"]


def test_convergence_triggers_a_refresh_before_max_interval():
    rule = one_matrix((24, 40), converge_threshold=0.5, max_interval=50)[0]
    grad = random_grads((24, 40), 1)[0]
    scales = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    refresh_steps, state = refresh_steps_under_gradients(rule, [grad * c for c in scales])
    # the norm falls to 0.1 of the refresh norm at step 3; the next step's decision refreshes
    assert refresh_steps == [0, 0, 0, 0, 4, 4]
    assert torch.allclose(state["refresh_norm"], state["last_norm"])


def test_max_interval_forces_a_refresh():
    rule = one_matrix((40, 24), converge_threshold=0.0, max_interval=3)[0]
    refresh_steps, _ = refresh_steps_under_gradients(rule, random_grads((40, 24), 8))
    assert refresh_steps == [0, 0, 0, 3, 3, 3, 6, 6]


def test_rank_changes_reuse_the_same_storage():
    shape = (32, 48)
    rule, param, state = one_matrix(shape, eta=0.99, r_min=1, r_max=16, max_interval=1,
                                    svd="randomized")
    pointers = {k: state[k].data_ptr() for k in ("basis", "refresh_norm", "last_norm")}
    pointers.update({k: state[k].data.data_ptr() for k in ("exp_avg", "exp_avg_sq")})
    ranks = []
    for step, k in enumerate([2, 10, 3, 16, 1]):
        grad = matrix_with_spectrum(*shape, [5.0] * k, seed=step)
        rule.update(param, grad, state, context(step))
        ranks.append(state["rank"])
        assert state["exp_avg"].data[state["rank"]:].count_nonzero() == 0  # beyond the rank: zero
    assert ranks == [2, 10, 3, 16, 1]
    assert state["exp_avg"].data.shape == (16, 48) and state["basis"].shape == (32, 16)
    assert {k: state[k].data_ptr() for k in ("basis", "refresh_norm", "last_norm")} == \
        {k: pointers[k] for k in ("basis", "refresh_norm", "last_norm")}
    assert state["exp_avg"].data.data_ptr() == pointers["exp_avg"]
    assert state["exp_avg_sq"].data.data_ptr() == pointers["exp_avg_sq"]
    assert (state["exp_avg_sq"].data >= 0).all()


def test_at_full_rank_and_fixed_schedule_it_equals_galore():
    model = build_model(tiny_config(), seed=0)
    reference = copy.deepcopy(model)
    fixed = AdaRankGrad(eta=1.0, r_min=8, r_max=8, svd="exact", converge_threshold=0.0,
                        max_interval=100, refresh_share=1.0)
    engines = [Engine(m, assign_rules(m, "galore", rank=8, gap=100, galore=dict(svd="exact")), lr=1e-2, accumulate=2).attach()
               for m in (model, reference)]
    engines[0].rules.update({n: fixed for n, r in engines[0].rules.items() if isinstance(r, GaLore)})
    engines[0].states = {}
    engines[0].detach()
    engines[0].attach()
    for x, y in batches(6):
        for engine, m in zip(engines, (model, reference)):
            engine.backward(m(x, y))
    diffs = [(a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())]
    assert max(diffs) < 1e-6
    assert max((a - b).abs().max().item() for a, b in
               zip(model.parameters(), build_model(tiny_config(), seed=0).parameters())) > 1e-3


# -- the memory planner's view: fake tensors -----------------------------------------------------
def fake_step(finish: bool):
    with FakeTensorMode():
        model = Llama(tiny_config())  # build_model's .to(dtype) cannot swap fake parameters
        rules = assign_rules(model, "adarankgrad", rank=16, adarank=dict(r_min=4, refresh_share=1.0))
        engine = Engine(model, rules, lr=1e-3, skip_nonfinite=False).attach()
        x, y = (torch.randint(0, 256, (2, 16)) for _ in range(2))
        loss = model(x, y)
        engine.backward(loss) if finish else loss.backward()
    return engine, next(r for r in rules.values() if isinstance(r, AdaRankGrad))


def test_rule_runs_on_fake_tensors_at_capacity():
    engine, rule = fake_step(finish=False)
    ranks = rule.ranks(engine)
    assert len(ranks) == 14 and set(ranks.values()) == {16}
    for name in ranks:
        state = engine.states[name]
        assert state["refreshes"] == 1 and isinstance(state["basis"], FakeTensor)
        assert state["exp_avg"].data.shape[0 if state["side"] == "left" else 1] == 16


def test_engine_step_runs_on_fake_tensors():
    engine, rule = fake_step(finish=True)
    assert engine.step == 1 and set(rule.ranks(engine).values()) == {16}


def test_the_training_recipe_logs_every_matrix_rank_over_time(tmp_path):
    import json

    from streamtrain.config import TrainConfig
    from streamtrain.train import train
    train(TrainConfig(model="byte-tiny", method="adarankgrad", rank=16, r_min=2, eta=0.5, steps=6,
                      batch_size=2, seq_len=32, max_data_bytes=200_000, eval_every=0, eval_batches=1,
                      galore_gap=2, out=str(tmp_path), progress=False))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all("mean_rank" in r for r in records)
    first = records[0]["ranks"]
    assert len(first) == 2 * 7 and all(2 <= r <= 16 for r in first.values())
    assert records[0]["mean_rank"] == sum(first.values()) / len(first)
