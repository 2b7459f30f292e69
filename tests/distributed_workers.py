"""Worker functions the distributed tests spawn (a module of its own so that spawned processes
can import them): each rank trains a tiny model on its shard of the global batches with the
engine reducing inside its hooks, and saves its weights for the test to compare."""
import os

import torch
import torch.distributed as dist

from streamtrain.distributed.reducer import BucketReducer
from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.models.int8 import quantize_linears
from streamtrain.models.lora import apply_lora

from conftest import random_batches, tiny_model

STEPS, BATCH = 4, 2  # per rank; one process takes world * BATCH
CASES = {
    "adamw": dict(method="adamw", dtype=torch.float64),
    "galore-refresh": dict(method="galore", dtype=torch.float64, rules=dict(rank=4, gap=2)),
    "adarankgrad": dict(method="adarankgrad", dtype=torch.float64,
                        rules=dict(rank=6, gap=2, adarank=dict(r_min=2, refresh_share=1.0))),
    "accumulate-2": dict(method="galore", dtype=torch.float64, accumulate=2, rules=dict(rank=4, gap=3)),
    "lora": dict(method="lora", dtype=torch.float64),
    "8bit": dict(method="adamw", dtype=torch.float32, rules=dict(states="8bit")),
    "bf16-weights": dict(method="galore", dtype=torch.bfloat16, rules=dict(rank=4, gap=2)),
    # block linears as INT8 codes (each layer's rounding stream seeded from its path: replicas agree)
    "int8-weights": dict(method="galore", dtype=torch.bfloat16, int8=True, rules=dict(rank=4, gap=2)),
}


def build(case: str, reducer=None):
    spec = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(dtype=spec["dtype"], hidden_size=128, intermediate_size=256)
    if spec["method"] == "lora":
        apply_lora(model, "all-linear", rank=4, alpha=8)
    if spec.get("int8"):
        quantize_linears(model, group_size=64)
    rules = assign_rules(model, spec["method"], **spec.get("rules", {}))
    engine = Engine(model, rules, lr=3e-3, weight_decay=0.1, accumulate=spec.get("accumulate", 1),
                    reducer=reducer).attach()
    return model, engine


class OnStepEnd:
    def __init__(self, action):
        self.action = action

    def on_step_end(self, engine, report):
        self.action()


def train(case: str, rank: int = 0, world: int = 1, reducer=None, on_step_end=None):
    """The weights after STEPS logical steps of `case` on this rank's rows of every global batch."""
    model, engine = build(case, reducer)
    if on_step_end is not None:
        engine.listeners.append(OnStepEnd(on_step_end))
    accumulate = CASES[case].get("accumulate", 1)
    global_batches = random_batches(STEPS * accumulate, batch=BATCH * 2, seq=16, seed=1)
    for x, y in global_batches:
        rows = slice(rank * BATCH * 2 // world, (rank + 1) * BATCH * 2 // world)
        engine.backward(model(x[rows], y[rows]))
    assert engine.step == STEPS
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, engine


def rank_main(rank: int, world: int, store: str, out: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for case in cases:
            reducer = BucketReducer(dist.group.WORLD, world, bucket_bytes=64 * 1024)  # several buckets
            traffic = []  # (bytes sent, bytes a full-gradient all-reduce would send) per logical step
            weights, engine = train(case, rank, world, reducer, on_step_end=lambda: traffic.append(
                reducer.reset_counters()))
            torch.save({"weights": weights, "traffic": traffic}, os.path.join(out, f"{case}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
