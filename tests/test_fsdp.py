"""Sharded training on FSDP2: 2 gloo ranks with batch B end where 1 process with batch 2B ends
(AdamW, GaLore with refreshes on both projection sides by either sharded refresh, accumulation,
8-bit states), every state holding one rank's shard."""
import json
from dataclasses import replace
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import fsdp_workers as workers
from conftest import kill_when_saved, spawn_cases, tiny_model
from streamtrain.distributed.fsdp import ShardingError, shard_model, simulated_world
from streamtrain.methods import assign_rules
from torch.distributed.tensor import DTensor
from streamtrain.memory.planner import plan_config
from streamtrain.recipe import build_run_model, model_config_of
from test_planner import tiny
from streamtrain.memory.report import dry_run
from streamtrain.memory.units import format_bytes

WORLD = 2


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Every case trained once by 2 spawned gloo ranks: {(case, rank): saved results}."""
    return spawn_cases(workers, tmp_path_factory.mktemp("fsdp"), WORLD)


def relative_differences(a: dict, b: dict) -> dict:
    return {k: ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in b}


# fp64: only the order of summation differs (measured 7e-16 .. 5e-15); 8-bit nearest rounding in
# fp32: rounding, then a few moments moved across a code boundary (measured 7e-5)
TOLERANCE = {"adamw": 1e-12, "galore-gather": 1e-12, "galore-sketch": 1e-12, "galore-uneven-gather": 1e-12,
             "galore-uneven-sketch": 1e-12, "accumulate-2": 1e-12, "8bit-nearest": 1e-3}


@pytest.mark.parametrize("case", list(TOLERANCE))
def test_two_sharded_ranks_with_batch_b_equal_one_process_with_batch_2b(two_rank_results, case):
    rank0, rank1 = two_rank_results[(case, 0)], two_rank_results[(case, 1)]
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])  # one model
    single, _ = workers.train(case)
    difference = max(relative_differences(rank0["weights"], single).values())
    assert difference < TOLERANCE[case], difference
    initial = {k: v.clone() for k, v in workers.build(case)[0].state_dict().items()}
    assert max(relative_differences(single, initial).values()) > 1e-3  # it trained


def test_states_hold_the_local_shard_only(two_rank_results):
    shapes = two_rank_results[("galore-gather", 1)]["state_shapes"]
    # GaLore rank 4: gate 256 x 128 projects from the right, sharded by rows: moments 128 x 4;
    # down 128 x 256 from the left, sharded by columns: 4 x 128; vocab 257 -> 128 rows on rank 1
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, 4)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4, 128)
    assert shapes["model.embed_tokens.weight"] == (128, 128)
    assert two_rank_results[("galore-gather", 0)]["state_shapes"]["model.embed_tokens.weight"] == (129, 128)


def test_a_dimension_not_divisible_by_the_ranks_is_split_as_torch_chunk_splits_it(two_rank_results):
    shapes = [two_rank_results[("galore-uneven-gather", rank)]["state_shapes"] for rank in range(WORLD)]
    assert [s["model.layers.0.mlp.gate_proj.weight"] for s in shapes] == [(128, 4), (127, 4)]  # rows
    assert [s["model.layers.0.mlp.down_proj.weight"] for s in shapes] == [(64, 255), (64, 255)]  # AdamW, rows


def test_a_left_projected_matrix_with_columns_not_divisible_by_the_ranks_is_refused_in_one_line():
    model = tiny_model(**{**workers.MODEL, "intermediate_size": 255})
    with simulated_world(2) as mesh, pytest.raises(ShardingError) as refused:
        shard_model(model, assign_rules(model, "galore", rank=4), mesh, torch.float32)
    assert "down_proj.weight (128 x 255)" in str(refused.value) and "\n" not in str(refused.value)
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # refused before anything was sharded


def test_sketch_refresh_moves_less_than_gathering_at_low_rank(two_rank_results):
    gather = two_rank_results[("galore-gather", 0)]["refresh_bytes"]
    sketch = two_rank_results[("galore-sketch", 0)]["refresh_bytes"]
    assert 0 < sketch < gather, (sketch, gather)


def test_stochastic_8bit_shards_stay_within_the_rounding_noise(two_rank_results):
    """Each rank rounds its shard's 8-bit moments from its own stream, so the result is one process's
    up to other draws: per block matrix no further from it than a run with other draws is."""
    sharded = two_rank_results[("8bit", 0)]["weights"]
    single, _ = workers.train("8bit")
    other_draws, _ = workers.train("8bit", state_seed=1)
    floor, difference = relative_differences(other_draws, single), relative_differences(sharded, single)
    matrices = [k for k in single if single[k].dim() == 2 and "layers" in k]
    assert all(difference[k] < 1.5 * floor[k] for k in matrices), {k: difference[k] / floor[k] for k in matrices}


# -- the command line under torchrun ------------------------------------------------------------------
from test_distributed import REPO, RUN, final_weights, torchrun  # noqa: E402

SHARDED = ["--parallel", "fsdp"]
GALORE_SHARDABLE = ["--method", "galore", "--rank", "4", "--galore-gap", "2"]


def single_process(*args):
    return subprocess.run([sys.executable, "-m", "streamtrain.run", *RUN, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_torchrun_two_sharded_ranks_train_like_one_process_with_the_global_batch(tmp_path):
    settings = ["--steps", "3", "--accumulate", "2"]
    # activation checkpointing on the sharded side only: a block recomputed in backward while FSDP2 holds it gathered
    done = torchrun(*SHARDED, *settings, "--batch-size", "2", "--activation-checkpointing",
                    "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stdout + done.stderr
    one = single_process(*settings, "--batch-size", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    sharded, single = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one")
    assert set(sharded) == set(single)  # rank 0 wrote the whole model, gathered from the shards
    # fp32 summation order only (measured 3e-7)
    assert max(((sharded[k] - single[k]).norm() / single[k].norm()).item() for k in single) < 1e-5
    assert "(2 sharded (FSDP2) ranks)" in done.stdout and done.stdout.count("done: 3 steps") == 1
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["val_loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["val_loss"], rel=1e-5)


def test_a_killed_sharded_run_resumes_bit_identical_to_an_uninterrupted_one(tmp_path):
    """GaLore with bf16 weights and 8-bit states: every rank's shards, states and rounding streams
    go through torch.distributed.checkpoint and come back to the bit."""
    settings = [*SHARDED, "--steps", "6", "--batch-size", "2", "--save-every", "2", "--dtype", "bfloat16",
                "--states", "8bit", "--method", "galore", "--rank", "16", "--galore-gap", "2", "--refresh-share", "1"]
    eager = {"STREAMTRAIN_UPDATE_BACKEND": "fused"}  # no torch.compile in every rank (see fsdp_workers)
    whole = torchrun(*settings, "--out", str(tmp_path / "whole"), env=eager)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    run = torchrun(*settings, "--out", str(tmp_path / "killed"), background=True,
                   env={"STREAMTRAIN_CHECKPOINT_DELAY": "1.5", **eager})
    saved = tmp_path / "killed" / "checkpoints" / "step-000002"
    kill_when_saved(run, saved)
    assert saved.exists() and not (tmp_path / "killed" / "final").exists()
    assert {p.name for p in saved.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "checkpoint.json"}
    resumed = torchrun(*settings, "--out", str(tmp_path / "killed"), "--resume", "auto", env=eager)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    # the states are shards of 2 ranks: 3 ranks are refused before anything is loaded, in one line
    other = torchrun(*settings, "--out", str(tmp_path / "killed"), "--resume", "auto", "--steps", "8", ranks=3,
                     env=eager)
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    # each rank says it in one line and exits 2 (torchrun stops the other ranks once the first has)
    assert other.returncode != 0 and errors and len(set(errors)) == 1, other.stdout + other.stderr
    assert "was written by 2 ranks, this run has 3" in errors[0] and "exitcode  : 2" in other.stderr, errors
    assert "streamtrain/" not in other.stderr and "SIGABRT" not in other.stderr  # no traceback, no abort
    assert not (tmp_path / "killed" / "checkpoints" / "step-000008").exists()


# -- the plan of one rank ------------------------------------------------------------------------------
PLANNED = {"adamw": tiny(parallel="fsdp", world_size=WORLD, method="adamw", layers=4),
           "galore-8bit-recompute": tiny(parallel="fsdp", world_size=WORLD, method="galore", states="8bit",
                                         dtype="bfloat16", activation_checkpointing=True, layers=4)}


def weight_bytes(config) -> tuple[int, int, int]:
    """(all weights, one block's, the root's: embeddings, final norm, head) in the run's dtype."""
    model = build_run_model(config, "meta", model_config_of(config))
    size = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    total, block = size(model.parameters()), size(model.blocks[0].parameters())
    return total, block, total - len(model.blocks) * block


def test_the_plan_of_one_sharded_rank_matches_its_tracked_real_peak(tmp_path):
    """The planner shards the model in a fake process group on one process; 2 real gloo ranks run the
    same steps on their shards under the tracker. The plan is the worst rank's: the simulated rank holds
    the larger chunks and gathers every matrix it refreshes."""
    mp.spawn(workers.plan_rank_main, args=(WORLD, str(tmp_path / "store"), str(tmp_path), PLANNED), nprocs=WORLD,
             join=True)
    measured = [torch.load(tmp_path / f"peaks-rank{rank}.pt") for rank in range(WORLD)]
    for name, config in PLANNED.items():
        planned, whole = plan_config(config), plan_config(replace(config, parallel="dp", world_size=1))
        peaks = [m[name]["total"] for m in measured]
        ratio = planned["tensor_peak"] / max(peaks)
        print(f"{name}: planned {planned['tensor_peak']}, measured per rank {peaks}: ratio {ratio:.4f}")
        assert abs(ratio - 1) < 0.02, (name, planned["tensor_peak"], peaks)
        # each rank holds about half of the weights and states (and one gathered block at a time)
        per_rank = {c["label"]: c["bytes"] for c in planned["categories"]}
        one = {c["label"]: c["bytes"] for c in whole["categories"]}
        assert per_rank["optimizer_states"] < 0.6 * one["optimizer_states"], (per_rank, one)
        # weights at their largest: the shards and a gathered block at least; at most the gathered root and 2 of
        # the 4 blocks (the one computing, the one prefetched): every block ever gathered would add 2 more
        total, block, root = weight_bytes(config)
        weights = planned["max_by_category"]["weights"]
        print(f"{name}: weights {weights}, shards {total / WORLD:.0f} + root {root} + block {block}")
        assert total / WORLD + block <= weights <= total / WORLD + root + 2 * block, (name, weights, total, block)


def test_the_sharded_plan_extrapolated_in_depth_equals_the_full_depth_plan():
    """Simulated at 3 and 4 layers (FSDP2's 2-layer phases are not a deep model's) and extrapolated per
    phase: the same bytes as all 7 layers simulated, with GaLore refreshes gathered on the planned rank."""
    config = tiny(parallel="fsdp", world_size=4, method="galore", states="8bit", dtype="bfloat16", layers=7,
                  activation_checkpointing=True, loss_chunk_tokens=48)
    extrapolated, full = plan_config(config), plan_config(config, full_depth=True)
    assert "at 3 and 4 layers" in extrapolated["simulated"]["method"]
    assert abs(extrapolated["tensor_peak"] - full["tensor_peak"]) <= 8, (extrapolated["tensor_peak"], full["tensor_peak"])
    assert extrapolated["max_by_category"] == pytest.approx(full["max_by_category"], abs=8)


def test_a_sharded_dry_run_over_budget_names_the_ranks_at_which_it_fits(tmp_path, capsys):
    config = tiny(parallel="fsdp", world_size=4, method="adamw", batch_size=1, accumulate=1)
    per_rank = {ranks: plan_config(replace(config, world_size=ranks))["total"] for ranks in (2, 4)}
    assert per_rank[4] < per_rank[2]
    budget = (per_rank[4] + per_rank[2]) // 2  # fits 4 ranks, not 2
    result = dry_run(replace(config, world_size=2, budget=f"{budget / 1e6:.3f}MB", out=str(tmp_path)))
    out = capsys.readouterr().out + result["message"]
    assert "one of 2 FSDP2 ranks" in (tmp_path / "memory.md").read_text()
    assert "| 4 |" in out and f"it fits on 4 ranks ({format_bytes(per_rank[4])} each): --nproc-per-node 4" in out, out


def test_a_nan_on_one_rank_masks_every_ranks_updates(tmp_path):
    """Each rank sees its own shards' gradients only: the flag is agreed in every hook before the
    update, so rank 0 moves nothing either (as one process masks the whole matrix)."""
    mp.spawn(workers.nonfinite_rank_main, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    results = [torch.load(tmp_path / f"nonfinite-rank{rank}.pt") for rank in range(WORLD)]
    assert [r["skipped"] for r in results] == [True, True]
    assert [r["moved"] for r in results] == [[], []]


def test_torchrun_shards_a_transformers_model_like_one_process(tmp_path):
    """A transformers Qwen2 folder: its decoder layers are the blocks FSDP2 shards; final/ holds the
    whole model under its HF names."""
    pytest.importorskip("transformers")
    from tiny_hf import save_folder
    save_folder(tmp_path / "model", "qwen2")
    settings = ["--model", str(tmp_path / "model"), "--seq-len", "12", "--steps", "3", *GALORE_SHARDABLE]
    done = torchrun(*SHARDED, *settings, "--batch-size", "2", "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stdout + done.stderr
    one = single_process(*settings, "--batch-size", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    sharded, single = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one")
    assert set(sharded) == set(single)
    # measured 2.9e-5; data parallelism on the same model and steps: 3.5e-5 (early Adam steps amplify
    # the summation order on this tiny model)
    assert max(((sharded[k] - single[k]).norm() / single[k].norm()).item() for k in single) < 1e-4


def test_sharded_checkpoints_restore_exactly_and_a_corrupt_shard_is_refused_on_every_rank(tmp_path):
    mp.spawn(workers.checkpoint_rank_main, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    results = [torch.load(tmp_path / f"checkpoint-rank{rank}.pt") for rank in range(WORLD)]
    assert [r["step"] for r in results] == [2, 2]
    assert all(r["same"] for r in results)  # restored step 2 + step 3 == the run that went on (bit for bit)
    # rank 1 verifies its own file; rank 0 learns of it through the agreement, and nothing is loaded
    assert "__1_0.distcp: size or checksum mismatch" in results[1]["refusal"], results[1]["refusal"]
    assert "unusable on another rank" in results[0]["refusal"], results[0]["refusal"]
    assert [r["fallback"] for r in results] == ["step-000002", "step-000002"]  # --resume auto walks back


@pytest.mark.parametrize("values, flag", [
    (dict(method="lora"), "--parallel fsdp: --method lora is not supported sharded"),
    (dict(method="galore", dtype="int8"), "--parallel fsdp: INT8 weights and low-bit projectors are not sharded"),
    (dict(method="galore", projector_precision="int4"), "--parallel fsdp: INT8 weights and low-bit projectors"),
    (dict(method="galore", check_replicas=2), "--check-replicas: compares replicas"),
])
def test_what_fsdp_does_not_shard_is_refused_in_one_line(values, flag):
    from streamtrain.config import ConfigError
    with pytest.raises(ConfigError) as refused:
        tiny(parallel="fsdp", world_size=WORLD, **values).validate()
    assert str(refused.value).startswith(flag) and "\n" not in str(refused.value)
