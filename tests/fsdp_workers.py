"""Worker functions the FSDP2 tests spawn (a module of their own so that spawned processes can
import them): each rank shards a tiny model with distributed.fsdp.shard_model, trains it on its
rows of the global batches with the engine updating its shards in the hooks, and saves the
gathered weights; `train(case)` is the one-process reference with the global batch."""
import contextlib
import gc
import os

import torch
import torch.distributed as dist

from streamtrain.distributed.fsdp import ShardGroup, device_mesh, shard_model
from streamtrain.engine import Engine
from streamtrain.methods import assign_rules
from streamtrain.optim.quant8 import BlockwiseState8bit

from conftest import random_batches, tiny_model

STEPS, BATCH = 4, 2  # per rank; one process takes world * BATCH
# the tiny model's MLP has gate/up 256 x 128 (right projection: sharded by rows) and down
# 128 x 256 (left: sharded by columns); vocab 257 does not divide by 2 ranks
MODEL = dict(hidden_size=128, intermediate_size=256, vocab_size=257)
UNEVEN = ["gate_proj", "up_proj"]
CASES = {
    "adamw": dict(method="adamw", dtype=torch.float64),
    "galore-gather": dict(method="galore", dtype=torch.float64, rules=dict(rank=4, gap=2), refresh="gather"),
    "galore-sketch": dict(method="galore", dtype=torch.float64, rules=dict(rank=4, gap=2), refresh="sketch"),
    # intermediate 255: GaLore's gate and up (255 x 128, right) sharded by rows, 128 + 127 on 2 ranks; down
    # (128 x 255, left: its columns, which FSDP2 splits only evenly) stays with AdamW, sharded by its 128 rows
    "galore-uneven-gather": dict(method="galore", dtype=torch.float64, rules=dict(rank=4, gap=2, targets=UNEVEN),
                                 refresh="gather", model=dict(intermediate_size=255)),
    "galore-uneven-sketch": dict(method="galore", dtype=torch.float64, rules=dict(rank=4, gap=2, targets=UNEVEN),
                                 refresh="sketch", model=dict(intermediate_size=255)),
    "accumulate-2": dict(method="galore", dtype=torch.float64, accumulate=2, rules=dict(rank=4, gap=3)),
    # 8-bit moments rounded to the nearest code: deterministic, so comparable to one process (vocab
    # 256: every shard starts on a 256-element block, so the blocks are one process's blocks)
    "8bit-nearest": dict(method="adamw", dtype=torch.float32, rules=dict(states="8bit"), nearest=True,
                         model=dict(vocab_size=256)),
    "8bit": dict(method="adamw", dtype=torch.float32, rules=dict(states="8bit")),
}
# The 8-bit cases run the eager update: the compiled kernel is the same elementwise update of each
# chunk of the shard (tests/test_fused.py compares the two), and compiling it in every spawned
# process would cost more than the rest of this file.
EAGER_8BIT = {"STREAMTRAIN_UPDATE_BACKEND": "fused"}


def build(case: str, rank: int = 0, sharded: bool = False, state_seed: int | None = None):
    spec = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(dtype=spec["dtype"], **{**MODEL, **spec.get("model", {})})
    rules = assign_rules(model, spec["method"], **spec.get("rules", {}))
    shards = None
    if sharded:
        shard_model(model, rules, device_mesh(torch.device("cpu"), dist.get_world_size()), spec["dtype"])
        rules = assign_rules(model, spec["method"], **spec.get("rules", {}))  # fresh rules, same assignment
        shards = ShardGroup(refresh=spec.get("refresh", "gather"))
        state_seed = 1000 + rank if state_seed is None else state_seed  # rank-specific rounding streams
    if state_seed is not None:  # (the 8-bit states' generators are seeded from the global one)
        torch.manual_seed(state_seed)
    engine = Engine(model, rules, lr=3e-3, weight_decay=0.1, accumulate=spec.get("accumulate", 1),
                    shards=shards).attach()
    if spec.get("nearest"):
        for state in engine.states.values():
            for value in state.values():
                if isinstance(value, BlockwiseState8bit):
                    value.stochastic, value.generator = False, None
    return model, engine


def train(case: str, rank: int = 0, world: int = 1, state_seed: int | None = None):
    """The full weights after STEPS logical steps of `case` on this rank's rows of every global batch."""
    with environment(EAGER_8BIT if "8bit" in case else {}):
        return train_steps(case, rank, world, state_seed)


@contextlib.contextmanager
def environment(variables: dict):
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def train_steps(case: str, rank: int, world: int, state_seed: int | None):
    model, engine = build(case, rank, sharded=world > 1, state_seed=state_seed)
    accumulate = CASES[case].get("accumulate", 1)
    vocab = model.config.vocab_size
    for x, y in random_batches(STEPS * accumulate, batch=BATCH * 2, seq=16, vocab=vocab, seed=1):
        rows = slice(rank * BATCH * 2 // world, (rank + 1) * BATCH * 2 // world)
        engine.backward(model(x[rows], y[rows]))
    assert engine.step == STEPS
    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}, engine


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rank_main(rank: int, world: int, store: str, out: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for case in cases:
            weights, engine = train(case, rank, world)
            shapes = {name: tuple(getattr(s["exp_avg"], "shape", None) or s["exp_avg"].data.shape)
                      for name, s in engine.states.items()}
            torch.save({"weights": weights, "state_shapes": shapes, "refresh_bytes": engine.shards.reset_counters()},
                       os.path.join(out, f"{case}-rank{rank}.pt"))
            del engine
    finally:
        close_group()


def close_group() -> None:
    """Free FSDP2's modules and mesh (reference cycles that hold the group) before destroying the
    group, as streamtrain.train does: otherwise gloo's I/O thread may outlive it at exit (SIGABRT)."""
    gc.collect()
    dist.destroy_process_group()


def plan_rank_main(rank: int, world: int, store: str, out: str, configs: dict) -> None:
    """Each rank runs the planner's steps of every config on its real shards (simulate, fake=False)
    under the memory tracker, and saves its tracked peak."""
    from streamtrain.memory.planner import simulate
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        peaks = {name: simulate(config, fake=False)["peak"] for name, config in configs.items()}
        torch.save(peaks, os.path.join(out, f"peaks-rank{rank}.pt"))
    finally:
        close_group()


def nonfinite_rank_main(rank: int, world: int, store: str, out: str) -> None:
    """One step of a plain model per rank, linked by a ShardGroup only (no FSDP2, so no reduction
    carries rank 1's NaN to rank 0): rank 1's loss is NaN. Saves which weights moved and the report."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tiny_model(**MODEL)
        engine = Engine(model, assign_rules(model, "adamw"), lr=3e-3, shards=ShardGroup()).attach()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        (x, y), = random_batches(1, batch=2, seq=16, vocab=MODEL["vocab_size"], seed=1)
        loss = model(x, y)
        report = engine.backward(loss * float("nan") if rank == 1 else loss)
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        torch.save({"moved": moved, "skipped": report.skipped}, os.path.join(out, f"nonfinite-rank{rank}.pt"))
    finally:
        close_group()


def checkpoint_rank_main(rank: int, world: int, store: str, out: str) -> None:
    """Save a sharded checkpoint after 2 steps and again after 3, restore the older into a fresh
    sharded engine, then corrupt one byte of rank 1's newer shard file and locate again."""
    from streamtrain.checkpoint_files import CheckpointError
    from streamtrain.distributed.sharded_checkpoint import locate_sharded, restore_sharded, save_sharded
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, engine = build("galore-gather", rank, sharded=True)
        batches = random_batches(3, batch=BATCH, seq=16, vocab=model.config.vocab_size, seed=rank)
        for step, (x, y) in enumerate(batches):
            engine.backward(model(x, y))
            if step >= 1:
                newest = save_sharded(out, engine, position=step + 1)
        fresh_model, fresh = build("galore-gather", rank, sharded=True)
        older = newest.parent / "step-000002"
        record = restore_sharded(older, fresh, locate_sharded(older)[1][0], identity=None, max_position=None)
        x, y = batches[2]  # the third step again, from the restored step 2: the newer checkpoint's weights
        fresh.backward(fresh_model(x, y))
        same = all(torch.equal(full(a), full(b)) for a, b in zip(fresh_model.state_dict().values(),
                                                                 model.state_dict().values()))
        dist.barrier()
        if rank == 0:
            shard = newest / "__1_0.distcp"
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        dist.barrier()
        try:
            locate_sharded(newest)
            refusal = None
        except CheckpointError as e:
            refusal = str(e)
        fallback = locate_sharded(newest.parent.parent)[0].name  # the run folder: the newest intact one
        torch.save({"step": record["step"], "same": same, "refusal": refusal, "fallback": fallback},
                   os.path.join(out, f"checkpoint-rank{rank}.pt"))
        del engine, fresh
    finally:
        close_group()
