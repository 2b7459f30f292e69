"""The equivalence triangle (after optimi's tests): one tiny model trained four ways ends with the
same weights -- torch.optim.AdamW in a plain loop, torch.optim.AdamW stepped per parameter in
post-accumulate-grad hooks, the engine through engine.backward, and the engine through a plain
loss.backward() with its torch.optim face -- with weight decay per parameter group and
gradient accumulation."""
import copy

import torch

from streamtrain.engine import Engine
from streamtrain.methods import assign_rules

from conftest import random_batches, tiny_model

LR, DECAY, ACCUMULATE, STEPS = 3e-3, 0.1, 2, 4


def groups_like(engine, model) -> list[dict]:
    """torch.optim param groups with the engine's groups (one per rule object) and their decay."""
    by_name = dict(model.named_parameters())
    return [{"params": [by_name[n] for n in names],
             "weight_decay": DECAY if rule.weight_decay is None else rule.weight_decay}
            for rule, names in engine.rule_groups()]


def plain_loop(model, groups, batches):
    opt = torch.optim.AdamW(groups, lr=LR)
    for i, (x, y) in enumerate(batches):
        (model(x, y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            opt.step()
            opt.zero_grad()


def per_parameter_hooks(model, groups, batches):
    """optimi's gradient release: one AdamW per parameter, stepped in its hook on the last
    micro-batch of each step (earlier micro-batches accumulate in .grad as usual)."""
    state = {"micro": 0}
    optimizers = {p: torch.optim.AdamW([{"params": [p], "weight_decay": g["weight_decay"]}], lr=LR)
                  for g in groups for p in g["params"]}

    def hook(p):
        if state["micro"] == ACCUMULATE - 1:
            optimizers[p].step()
            optimizers[p].zero_grad()
    handles = [p.register_post_accumulate_grad_hook(hook) for p in optimizers]
    for x, y in batches:
        (model(x, y) / ACCUMULATE).backward()
        state["micro"] = (state["micro"] + 1) % ACCUMULATE
    for h in handles:
        h.remove()


def engine_backward(model, batches):
    engine = Engine(model, assign_rules(model, "adamw"), lr=LR, weight_decay=DECAY, accumulate=ACCUMULATE).attach()
    for x, y in batches:
        engine.backward(model(x, y))
    return engine


def engine_plain_backward_with_face(model, batches):
    engine = Engine(model, assign_rules(model, "adamw"), lr=LR, weight_decay=DECAY, accumulate=ACCUMULATE).attach()
    optimizer = engine.as_optimizer()
    for i, (x, y) in enumerate(batches):
        (model(x, y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
    return engine


def max_relative_difference(a, b) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_four_ways_of_training_end_with_the_same_weights():
    batches = random_batches(STEPS * ACCUMULATE)
    models = [tiny_model() for _ in range(4)]
    reference_engine = engine_backward(models[2], batches)
    plain_loop(models[0], groups_like(reference_engine, models[0]), batches)
    per_parameter_hooks(models[1], groups_like(reference_engine, models[1]), batches)
    face_engine = engine_plain_backward_with_face(models[3], batches)
    assert reference_engine.step == face_engine.step == STEPS
    assert max_relative_difference(models[2], tiny_model()) > 1e-3       # the weights moved
    assert max_relative_difference(models[1], models[0]) < 1e-6          # hooks == plain loop
    assert max_relative_difference(models[2], models[0]) < 1e-6          # engine == plain loop
    # the two engine paths do the same operations in the same order: equal to the bit
    assert all(torch.equal(p, q) for p, q in zip(models[2].parameters(), models[3].parameters()))
