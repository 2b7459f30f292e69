"""ReLoRA: full-rank warm start, wrap, merges that keep the outputs, pruned adapter states, the
jagged LR, rank growth beyond r, and restarts only at logical step boundaries."""
import pytest
import torch

from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.models.lora import LoRALinear, lora_modules
from streamtrain.optim.schedule import CosineSchedule
from streamtrain.optim.state import make_state
from streamtrain.rules.adamw import AdamW
from streamtrain.rules.lora import ReLoRA, keep_mask, prune_moments

from conftest import random_batches, tiny_model

Q = "model.layers.0.self_attn.q_proj"
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
ENVELOPE = CosineSchedule(lr=1e-2, total=40, warmup=2)


def relora_run(accumulate=1, **options):
    """(model, engine, relora rule) for a tiny model; defaults: r=2, warm start 2, cycle 3."""
    model = tiny_model()
    settings = {"alpha": 4.0, "warm_start_steps": 2, "cycle": 3, "restart_warmup": 2,
                "keep_fraction": 0.25, **options}
    rules = assign_rules(model, "relora", rank=2, relora=settings)
    relora = rules[f"{Q}.weight"]
    engine = Engine(model, rules, schedule=relora.schedule(ENVELOPE), accumulate=accumulate).attach()
    return model, engine, relora


def train(model, engine, steps, seed=0):
    for x, y in random_batches(steps * engine.accumulate, seed=seed):
        engine.backward(model(x, y))


def test_warm_start_trains_full_rank_then_wraps_the_matrices():
    model, engine, relora = relora_run()
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    train(model, engine, 1)
    assert not lora_modules(model) and engine.rules[f"{Q}.weight"] is relora
    train(model, engine, 1)                                      # end of the warm start
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and len(lora_modules(model)) == 2 * 7
    assert (q.weight - w0).abs().max() > 1e-4                    # it trained full-rank first
    assert f"{Q}.weight" not in engine.params and f"{Q}.weight" not in engine.states
    assert engine.rules[f"{Q}.lora_A"] is relora and engine.rules[f"{Q}.lora_B"] is relora
    for full_rank in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert isinstance(engine.rules[full_rank], AdamW) and engine.params[full_rank].requires_grad
    frozen, embed = q.weight.clone(), model.model.embed_tokens.weight.clone()
    train(model, engine, 2, seed=1)            # steps 2 (LR 0: the wrap restarts the LR) and 3
    assert torch.equal(q.weight, frozen)
    assert (model.model.embed_tokens.weight - embed).abs().max() > 0
    assert q.lora_A.grad is None and q.lora_B.abs().max() > 0


def test_restart_leaves_the_outputs_unchanged():
    model, engine, relora = relora_run()
    train(model, engine, 4)
    model.eval()
    q = model.model.layers[0].self_attn.q_proj
    before_logits, before_w = model(IDS), q.weight.clone()
    relora.restart(engine, steps_done=5)
    assert (model(IDS) - before_logits).abs().max().item() < 1e-5
    assert (q.weight - before_w).abs().max() > 1e-5                 # the adapter was folded in
    assert torch.equal(q.lora_B @ q.lora_A, torch.zeros_like(q.weight))
    assert q.lora_A.abs().max() > 0 and q.lora_B.abs().max() > 0  # never both zero


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_restart_keeps_the_configured_fraction_of_adapter_state(mode):
    model, engine, relora = relora_run(keep_fraction=0.25, prune=mode, cycle=10)
    train(model, engine, 6)           # by now every adapter entry has had a non-zero gradient
    names = [f"{path}.{adapter}" for path, _ in lora_modules(model) for adapter in ("lora_A", "lora_B")]
    moments = [(name, key) for name in names for key in ("exp_avg", "exp_avg_sq")]
    assert all(bool(engine.states[n][k].read().all()) for n, k in moments)
    name = f"{Q}.lora_B"
    before = {k: engine.states[name][k].read().clone() for k in ("exp_avg", "exp_avg_sq")}
    steps_before = engine.states[name]["step"]
    relora.restart(engine, steps_done=7)
    for n, k in moments:
        moment = engine.states[n][k].read()
        assert int(moment.count_nonzero()) == round(0.25 * moment.numel())
    assert engine.states[name]["step"] == steps_before           # bias correction continues
    for key, old in before.items():
        new = engine.states[name][key].read()
        kept = new != 0
        assert torch.equal(new[kept], old[kept])                  # kept entries untouched
        if mode == "magnitude":
            assert old[kept].abs().min() >= old[~kept].abs().max()


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_pruning_goes_through_low_precision_storages(precision):
    if precision == "8bit":
        pytest.importorskip("streamtrain.optim.quant8", reason="8-bit state storage not built yet")
    values = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    state = {"exp_avg": make_state(values.shape, precision, signed=True), "step": 7}
    state["exp_avg"].write(values)
    stored = state["exp_avg"].read().clone()
    prune_moments(state, 0.1, "magnitude")
    pruned = state["exp_avg"].read()
    assert int(pruned.count_nonzero()) == round(0.1 * values.numel())
    assert torch.equal(pruned != 0, keep_mask(stored, 0.1, "magnitude"))
    assert state["step"] == 7


def test_lr_drops_to_zero_at_each_restart_and_rewarms():
    model, engine, relora = relora_run(warm_start_steps=4, cycle=6, restart_warmup=3)
    for restart in (4, 10, 16):
        assert engine.lr_at(restart) == 0.0
        for k in range(1, 3):
            assert engine.lr_at(restart + k) == pytest.approx(ENVELOPE(restart + k) * k / 3)
        for k in range(3, 6):
            assert engine.lr_at(restart + k) == pytest.approx(ENVELOPE(restart + k))
    assert [engine.lr_at(s) for s in range(4)] == [ENVELOPE(s) for s in range(4)]
    # the engine hands that LR to the step right after a restart (merge at the end of step 9)
    reports = [r for x, y in random_batches(12) if (r := engine.backward(model(x, y)))]
    assert reports[10].lr == 0.0 and reports[9].lr > 1e-3


def test_rank_of_the_accumulated_change_exceeds_r():
    rank, merges = 2, 5
    model, engine, relora = relora_run(cycle=3, restart_warmup=1)
    train(model, engine, 2)                                       # warm start; wrapped now
    q = model.model.layers[0].self_attn.q_proj
    w_warm = q.weight.detach().double()
    train(model, engine, 3 * merges, seed=1)
    delta = q.weight.detach().double() - w_warm
    # each merge rounds W to fp32: that noise has spectral norm at most ~ sqrt(m n) eps |W|max
    # per merge (~1e-8 here); the merged directions are ~1e-2, so the cut sits far from both
    noise = merges * delta.numel() ** 0.5 * torch.finfo(torch.float32).eps * q.weight.abs().max().item()
    delta_rank = int(torch.linalg.matrix_rank(delta, atol=noise))
    print(f"rank(W_now - W_warm_start) = {delta_rank} after {merges} merges of rank {rank}; "
          f"singular values {torch.linalg.svdvals(delta)[:12].tolist()}, noise bound {noise:.1e}")
    assert rank < delta_rank <= merges * rank


def test_restarts_happen_only_at_step_boundaries_with_accumulation():
    model, engine, relora = relora_run(accumulate=2)

    class Watch:
        def __init__(self):
            self.seen = []   # (step, micro_index, fingerprint of the frozen matrices)

        def on_hook(self, engine, name, phase):
            frozen = [m.weight.sum().item() for _, m in lora_modules(engine.model)]
            self.seen.append((engine.step, engine.micro_index, tuple(frozen)))

    watch = Watch()
    engine.listeners.append(watch)
    train(model, engine, 11)
    per_step = {}
    for step, micro, fingerprint in watch.seen:
        if fingerprint:
            per_step.setdefault(step, set()).add(fingerprint)
    assert sorted(per_step) == list(range(2, 11))
    assert all(len(prints) == 1 for prints in per_step.values())   # never changes inside a step
    assert {micro for _, micro, _ in watch.seen} == {0, 1}
    changed_after = [s for s in range(2, 10) if per_step[s] != per_step[s + 1]]
    assert changed_after == [4, 7]                                  # ends of steps 4 and 7: 2+3k-1

    # and two micro-batches of 2 equal one batch of 4, merges included
    big_model, big_engine, _ = relora_run(accumulate=1)
    batches = random_batches(22)
    for i in range(0, 22, 2):
        (x1, y1), (x2, y2) = batches[i], batches[i + 1]
        big_engine.backward(big_model(torch.cat([x1, x2]), torch.cat([y1, y2])))
    model.eval(), big_model.eval()
    assert (model(IDS) - big_model(IDS)).abs().max().item() < 1e-4


def test_warm_start_zero_wraps_on_sync_and_settings_are_checked():
    model, engine, relora = relora_run(warm_start_steps=0)
    relora.sync(engine)
    assert len(lora_modules(model)) == 14 and f"{Q}.lora_A" in engine.states
    relora.sync(engine)                                            # idempotent
    assert len(lora_modules(model)) == 14
    assert relora.config()["inner"]["name"] == "adamw"
    with pytest.raises(ValueError, match="keep_fraction"):
        ReLoRA(keep_fraction=1.5)
    with pytest.raises(ValueError, match="prune mode"):
        ReLoRA(prune="largest")
    with pytest.raises(ValueError, match="restart_warmup"):
        ReLoRA(cycle=10, restart_warmup=20)
