"""The engine's contract: per-layer updates equal torch.optim, accumulation equals a big batch,
one clock per logical step."""
import copy

import pytest
import torch

from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.optim.schedule import CosineSchedule
from streamtrain.rules.base import Rule

from conftest import random_batches, tiny_model


def max_relative_diff(model_a, model_b):
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_adamw_equals_torch_adamw_over_five_steps():
    """assign_rules leaves norms, biases and embeddings undecayed: torch's reference has the same
    two parameter groups."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    engine = Engine(model, assign_rules(model, "adamw", betas=(0.9, 0.95), eps=1e-8), lr=3e-3,
                    weight_decay=0.1).attach()
    undecayed = [p for n, p in reference.named_parameters() if p.dim() < 2 or n == "model.embed_tokens.weight"]
    decayed = [p for p in reference.parameters() if all(p is not q for q in undecayed)]
    assert len(decayed) == 15  # 7 matrices per block x 2 blocks + lm_head
    opt = torch.optim.AdamW([{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for x, y in random_batches(5):
        engine.backward(model(x, y))
        reference(x, y).backward()
        opt.step()
        opt.zero_grad()
    # 2e-6 on the embedding: fp32 rounding in a row whose gradient nearly cancels; decaying the
    # embedding (lr x wd x 5 steps) would be 1.5e-3
    assert max_relative_diff(model, reference) < 1e-5
    assert max_relative_diff(model, tiny_model()) > 1e-3  # the weights did move


def test_each_rule_object_is_a_parameter_group_with_its_own_lr_scale_and_decay():
    """Two AdamW rule objects (matrices decayed at full LR; norms undecayed at half LR) equal
    torch.optim.AdamW with the same two parameter groups."""
    from streamtrain.rules import AdamW
    model = tiny_model()
    reference = copy.deepcopy(model)
    matrices, others = AdamW(), AdamW()
    others.lr_scale, others.weight_decay = 0.5, 0.0
    rules = {n: (matrices if p.dim() == 2 else others) for n, p in model.named_parameters()}
    engine = Engine(model, rules, lr=3e-3, weight_decay=0.1).attach()
    groups = [{"params": [p for p in reference.parameters() if p.dim() == 2]},
              {"params": [p for p in reference.parameters() if p.dim() != 2], "lr": 1.5e-3, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    for x, y in random_batches(5):
        engine.backward(model(x, y))
        reference(x, y).backward()
        opt.step()
        opt.zero_grad()
    assert max_relative_diff(model, reference) < 1e-6
    norms = [n for n, p in model.named_parameters() if p.dim() != 2]
    assert norms and all(engine.contexts[id(others)].weight_decay == 0.0 for _ in norms)


def test_hooks_free_every_gradient():
    model = tiny_model()
    Engine(model, assign_rules(model, "galore", rank=4), lr=1e-3).attach()
    x, y = random_batches(1)[0]
    model(x, y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_registering_twice_is_refused():
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "adamw")).attach()
    with pytest.raises(RuntimeError, match="already registered"):
        engine.attach()
    engine.detach()
    engine.attach()  # after detach it may attach again


def test_every_trainable_parameter_needs_a_rule():
    model = tiny_model()
    rules = assign_rules(model, "adamw")
    rules.pop("lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight"):
        Engine(model, rules)


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_accumulating_four_micro_batches_equals_one_big_batch(method):
    # fp64: Adam's sign-like early steps amplify fp32 summation-order noise; fp64 tests the logic
    options = dict(rank=8, gap=2, subspace_from="full_step")
    batches = random_batches(12, batch=2, seed=3)
    small, big = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
    e_small = Engine(small, assign_rules(small, method, **options), lr=1e-2, accumulate=4).attach()
    # (the big batch from the m x n gradient, so its GaLore norm is the full one; the micro-batches
    # are projected in backward, projected_backward.py)
    e_big = Engine(big, assign_rules(big, method, **options), lr=1e-2, projected_backward=False).attach()
    updates = count_updates(e_small)
    for step in range(3):  # gap=2: steps 0 and 2 refresh the subspace
        group = batches[4 * step: 4 * step + 4]
        reports = [e_small.backward(small(x, y)) for x, y in group]
        assert reports[:3] == [None] * 3 and reports[3].step == step
        x = torch.cat([b[0] for b in group])
        y = torch.cat([b[1] for b in group])
        big_report = e_big.backward(big(x, y))
        assert reports[3].loss == pytest.approx(big_report.loss, rel=1e-5)
        if method == "adamw" or step % 2 == 0:
            # GaLore's norm is exact only when the full step gradient exists (refresh steps in
            # full_step mode); otherwise it is the projected norm, a lower bound
            assert reports[3].grad_norm == pytest.approx(big_report.grad_norm, rel=1e-6)
        else:
            assert reports[3].grad_norm < big_report.grad_norm
    assert max_relative_diff(small, big) < 1e-5
    n_params = len(list(small.parameters()))
    assert updates == {"update": 3 * n_params, "accumulate": 9 * n_params}


@pytest.mark.parametrize("method, subspace_from", [("adamw", "first_micro_batch"), ("galore", "first_micro_batch"),
                                                   ("galore", "full_step")])
def test_offloaded_accumulation_buffers_give_the_same_steps(method, subspace_from):
    # on CPU host RAM is the same memory, so offloading must change nothing, bit for bit; what it
    # changes on a GPU (where the buffers live) is the planner's and the tracker's business
    runs = []
    for offload in (False, True):
        model = tiny_model(dtype=torch.bfloat16)
        rules = assign_rules(model, method, rank=8, gap=2, subspace_from=subspace_from)
        engine = Engine(model, rules, lr=1e-2, accumulate=3, stochastic_rounding=False,
                        offload_accumulation=offload).attach()
        for i, (x, y) in enumerate(random_batches(9, seed=5)):
            engine.backward(model(x, y))
            if i % 3 == 0:  # mid-step: every buffer is an fp32 sum in host RAM
                buffers = [s[k] for s in engine.states.values() for k in s if k.endswith("grad_acc") and s[k] is not None]
                assert buffers and all(b.dtype == torch.float32 and b.device.type == "cpu" for b in buffers)
        runs.append(model)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters()))


def test_galore_default_takes_the_subspace_from_the_first_micro_batch():
    from streamtrain.optim.projector import svd_basis
    model, plain = tiny_model(), tiny_model()
    engine = Engine(model, assign_rules(model, "galore", rank=8, galore=dict(svd="exact")), lr=1e-2, accumulate=2).attach()
    name = "model.layers.0.mlp.up_proj.weight"
    batches = random_batches(2)
    for x, y in batches:
        engine.backward(model(x, y))
    (plain(*batches[0]) / 2).backward()  # the first micro-batch's gradient, by plain autograd
    state = engine.states[name]
    expected = svd_basis(plain.get_parameter(name).grad, state["rank"], state["side"])
    # singular vectors are defined up to sign: compare the projections P P^T
    assert torch.allclose(state["basis"] @ state["basis"].T, expected @ expected.T, atol=1e-5)
    assert state["grad_acc"] is None  # no partial sum leaks out of the step


def count_updates(engine):
    counts = {"update": 0, "accumulate": 0}
    for rule in {id(r): r for r in engine.rules.values()}.values():
        for op in counts:
            original = getattr(rule, op)

            def counted(*args, _op=op, _original=original):
                counts[_op] += 1
                return _original(*args)
            setattr(rule, op, counted)
    return counts


class LrSpy(Rule):
    name = "spy"

    def __init__(self):
        self.seen = []

    def init_state(self, name, param):
        return {}

    def accumulate(self, param, grad, state, ctx):
        self.seen.append((ctx.step, ctx.lr))

    def update(self, param, grad, state, ctx):
        self.seen.append((ctx.step, ctx.lr))
        return torch.zeros(())


@pytest.mark.parametrize("accumulate", [1, 4])
def test_every_rule_sees_the_schedule_value_of_the_logical_step(accumulate):
    model = tiny_model()
    spy = LrSpy()
    schedule = CosineSchedule(lr=1e-3, total=6, warmup=2, min_ratio=0.1)
    engine = Engine(model, {n: spy for n, _ in model.named_parameters()}, schedule=schedule,
                    accumulate=accumulate).attach()
    for x, y in random_batches(6 * accumulate):
        engine.backward(model(x, y))
    n_params = len(list(model.parameters()))
    assert len(spy.seen) == 6 * accumulate * n_params
    assert all(lr == schedule(step) for step, lr in spy.seen)
    assert sorted({step for step, _ in spy.seen}) == list(range(6))
    assert schedule(0) == pytest.approx(5e-4) and schedule(2) == pytest.approx(1e-3)
    assert schedule(6) == pytest.approx(1e-4)


def test_nonfinite_loss_skips_the_step_and_counts_it():
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "adamw"), lr=1e-2).attach()
    before = copy.deepcopy(model.state_dict())
    x, y = random_batches(1)[0]
    report = engine.backward(model(x, y) * float("nan"))
    assert report.skipped and report.nonfinite_total == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(s["step"] == 0 for s in engine.states.values())


def test_per_tensor_clipping_bounds_what_the_rule_consumes():
    model, reference = tiny_model(), tiny_model()
    clipped = Engine(model, assign_rules(model, "adamw"), lr=1e-2, clip_per_tensor=1e-3).attach()
    plain = Engine(reference, assign_rules(reference, "adamw"), lr=1e-2).attach()
    x, y = random_batches(1)[0]
    clipped.backward(model(x, y))
    plain.backward(reference(x, y))
    # Adam's first step is sign-like (scale-free) up to eps; a second step differs when clipped
    x, y = random_batches(1, seed=1)[0]
    clipped.backward(model(x, y))
    plain.backward(reference(x, y))
    m_clipped = clipped.states["lm_head.weight"]["exp_avg"].read().norm()
    m_plain = plain.states["lm_head.weight"]["exp_avg"].read().norm()
    assert m_clipped <= 1e-3 * 1.0001 and m_plain > 10 * m_clipped


def test_norm_growth_limiter_caps_the_update_norm_ratio():
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "adamw"), lr=1e-2, norm_growth=1.01).attach()
    norms = []
    for x, y in random_batches(4):
        engine.backward(model(x, y))
        norms.append(engine.states["lm_head.weight"]["prev_update_norm"].item())
    assert all(b <= 1.01 * a * (1 + 1e-6) for a, b in zip(norms, norms[1:]))


# -- plain backward, state_dict, the torch.optim face ------------------------------------------------
def test_plain_backward_drives_the_engine_like_engine_backward_bit_for_bit():
    batches = random_batches(6)
    model_a, model_b = tiny_model(), tiny_model()
    engine_a = Engine(model_a, assign_rules(model_a, "galore", rank=4, gap=2), lr=3e-3, accumulate=2).attach()
    engine_b = Engine(model_b, assign_rules(model_b, "galore", rank=4, gap=2), lr=3e-3, accumulate=2).attach()
    for i, (x, y) in enumerate(batches):
        engine_a.backward(model_a(x, y))
        (model_b(x, y) / 2).backward()          # what torch.optim loops and HF Trainer do
        assert engine_b.step == (i + 1) // 2     # the clock follows plain backwards
    assert engine_b.step == 3 and engine_b.micro_index == 0
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert engine_b.last_report.step == 2 and engine_b.last_report.grad_norm > 0


def test_a_new_engine_loaded_from_state_dict_continues_bit_identically():
    import io
    batches = random_batches(5)
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "galore", rank=4, gap=2, states="8bit"), lr=3e-3).attach()
    for x, y in batches[:3]:
        engine.backward(model(x, y))
    saved_weights = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)  # what HF Trainer does with an optimizer's state
    for x, y in batches[3:]:
        engine.backward(model(x, y))
    fresh = tiny_model(seed=7)
    fresh.load_state_dict(saved_weights)
    resumed = Engine(fresh, assign_rules(fresh, "galore", rank=4, gap=2, states="8bit"), lr=3e-3).attach()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 3
    for x, y in batches[3:]:
        resumed.backward(fresh(x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    other = tiny_model()
    with pytest.raises(ValueError, match="another method"):
        Engine(other, assign_rules(other, "adamw"), lr=3e-3).attach().load_state_dict(engine.state_dict())


def test_the_optimizer_face_lets_a_torch_scheduler_drive_the_learning_rate():
    model = tiny_model()
    reference = copy.deepcopy(model)
    engine = Engine(model, assign_rules(model, "adamw"), lr=3e-3, weight_decay=0.1).attach()
    face = engine.as_optimizer()
    assert isinstance(face, torch.optim.Optimizer) and face is engine.as_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(face, lambda step: 0.5 ** step)
    groups = [{"params": [p for n, p in reference.named_parameters() if engine.rules[n] is rule]}
              for rule, _ in engine.rule_groups()]
    for group, face_group in zip(groups, face.param_groups):
        group["weight_decay"] = face_group["weight_decay"]
    opt = torch.optim.AdamW(groups, lr=3e-3)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for x, y in random_batches(4):
        model(x, y).backward()
        face.step()
        face.zero_grad()
        scheduler.step()
        reference(x, y).backward()
        opt.step()
        opt.zero_grad()
        ref_scheduler.step()
    assert face.param_groups[0]["lr"] == pytest.approx(3e-3 / 16)
    assert engine.contexts[id(engine.rule_groups()[0][0])].lr == pytest.approx(3e-3 / 8)  # the last step's
    assert max_relative_diff(model, reference) < 1e-6
    state = face.state_dict()
    assert state["engine"]["step"] == 4 and [g["lr"] for g in state["param_groups"]] == [g["lr"] for g in face.param_groups]


def test_a_state_of_other_parameter_groups_is_refused():
    """A rule's lr_scale and weight decay are part of what a state was trained with."""
    model = tiny_model()
    engine = Engine(model, assign_rules(model, "adamw"), lr=1e-3).attach()
    other = tiny_model()
    rules = assign_rules(other, "adamw")
    next(r for r in rules.values() if r.weight_decay == 0.0).weight_decay = 0.05
    with pytest.raises(ValueError, match="weight_decay: saved 0.0, this run 0.05"):
        Engine(other, rules, lr=1e-3).attach().load_state_dict(engine.state_dict())


# -- host synchronisations ---------------------------------------------------------------------------
class HostReads:
    """Counts reads of tensor values into Python (what synchronises with a GPU): bool(), float(),
    int(), .item(), .tolist(), by wrapping them on torch.Tensor."""
    METHODS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, method, counted)


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_a_logical_step_reads_device_values_once_not_per_parameter(monkeypatch, method):
    model = tiny_model()
    engine = Engine(model, assign_rules(model, method, rank=4, gap=100), lr=1e-3, accumulate=2).attach()
    batches = random_batches(6)
    for x, y in batches[:2]:  # the first step refreshes GaLore's subspaces (SVDs read their status)
        engine.backward(model(x, y))
    reads = HostReads(monkeypatch)
    for x, y in batches[2:]:
        (model(x, y) / 2).backward()
    assert engine.step == 3
    # 2 steps x 2 micro-batches x 21 parameters would be 84 reads with a check per hook
    assert reads.count == 2, reads.count
