"""The planner: fake-tensor plans match tracked real runs, depth extrapolation is exact, the search
finds the largest micro-batch that fits, impossible budgets are refused before allocation, and the
training recipe enforces the budget and writes its reports."""
import json
from dataclasses import replace

import psutil
import pytest
import torch

from streamtrain.config import TrainConfig
from streamtrain.memory.planner import (PlanRefused, fit_rung, flags_of, ladder, plan_config, plan_run, search_knobs,
                                        simulate)
from streamtrain.memory.units import parse_bytes
from streamtrain.models.presets import get_config, parameter_count
from streamtrain.run import main
from streamtrain.train import RunStopped, Trainer

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256,
            num_attention_heads=4, max_position_embeddings=128)


def tiny(**values):
    layers = values.pop("layers", 2)
    defaults = dict(model="llama-9m", model_overrides={**TINY, "num_hidden_layers": layers}, rank=16,
                    batch_size=4, seq_len=32, accumulate=2, device="cpu")
    return TrainConfig(**{**defaults, **values})


@pytest.mark.parametrize("method, states", [("adamw", "fp32"), ("galore", "fp32"), ("adamw", "8bit"),
                                            ("galore", "8bit")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_the_tracked_real_run(method, states, checkpointing):
    config = tiny(method=method, states=states, activation_checkpointing=checkpointing, dtype="bfloat16")
    planned = plan_config(config)["tensor_peak"]
    measured = simulate(config, fake=False)["peak"]["total"]  # the same steps on real CPU tensors
    print(f"{method} {states} ckpt={checkpointing}: planned/measured = {planned / measured:.4f}")
    assert abs(planned / measured - 1) < 0.02, (planned, measured)


@pytest.mark.parametrize("method, projector", [("adamw", "dense"), ("galore", "int4")])
def test_an_int8_plan_matches_the_tracked_real_run(method, projector):
    # the fake path builds the INT8 layers, their gradient handles and the update's scratch as a real run does
    config = tiny(method=method, states="8bit", dtype="int8", projector_precision=projector,
                  activation_checkpointing=True)
    planned = plan_config(config)
    measured = simulate(config, fake=False)["peak"]["total"]
    print(f"int8 {method} {projector}: planned/measured = {planned['tensor_peak'] / measured:.4f}")
    assert abs(planned["tensor_peak"] / measured - 1) < 0.02, (planned["tensor_peak"], measured)
    dense = plan_config(replace(config, dtype="bfloat16", projector_precision="dense"))
    weights = {plan["peak"]["phase"]: plan["max_by_category"]["weights"] for plan in (planned, dense)}
    assert planned["max_by_category"]["weights"] < 0.75 * dense["max_by_category"]["weights"], weights


def test_depth_extrapolation_equals_the_full_depth_simulation():
    config = tiny(method="galore", states="8bit", layers=6, activation_checkpointing=True, loss_chunk_tokens=48)
    extrapolated, full = plan_config(config), plan_config(config, full_depth=True)
    assert "extrapolated" in extrapolated["simulated"]["method"]
    assert abs(extrapolated["tensor_peak"] - full["tensor_peak"]) <= 8  # float rounding of the line fit
    assert extrapolated["max_by_category"] == pytest.approx(full["max_by_category"], abs=8)
    assert extrapolated["peak"]["phase"].replace("top", "5") == full["peak"]["phase"]


def test_search_finds_the_largest_micro_batch_that_fits():
    config = tiny(method="adamw", batch_size=4, accumulate=16, budget="3MB")
    plan = plan_run(config, search=True)
    best = plan["search"]["best"]
    assert best is not None and best["largest_fitting"] >= 2
    changes = best["changes"]
    fits = plan_config(tiny(method="adamw", batch_size=best["largest_fitting"], **changes), budget=parse_bytes("3MB"))
    over = plan_config(tiny(method="adamw", batch_size=best["largest_fitting"] + 1, **changes), budget=parse_bytes("3MB"))
    assert fits["fits"] and not over["fits"], (fits["total"], over["total"])


def test_search_on_a_one_micro_batch_step_counts_no_accumulation_buffers():
    # GaLore's r x n fp32 sums exist only with accumulation: a step of one micro-batch that fits its
    # budget must be found by the search as it is configured (it reported 0 sequences before)
    config = tiny(method="galore", rank=32, batch_size=2, accumulate=1, seq_len=16, dtype="bfloat16")
    needs = plan_config(config)["total"]
    as_configured = search_knobs(config, "cpu", needs)["rungs"][0]
    assert as_configured["name"] == "as configured"
    assert (as_configured["max_batch_size"], as_configured["accumulate"]) == (2, 1)
    assert abs(as_configured["predicted_total"] - needs) <= 8
    rung = ladder(config, "cpu")[0]
    assert fit_rung(config, rung, "cpu", needs - 1024, cap=2)["max_batch_size"] == 0


def test_offloaded_accumulation_buffers_are_planned_as_host_ram_not_device_memory():
    on_device = plan_config(tiny(method="galore"), target="cuda")
    offloaded_config = tiny(method="galore", offload_accumulation=True)
    offloaded = plan_config(offloaded_config, target="cuda")
    # the buffers of 2 layers: 4 attention matrices (64x64) project to 16 x 64 and 3 MLP ones
    # (64x128) to 16 x 128; embedding, lm_head (256 x 64) and the norms stay full: all fp32
    buffers = 4 * (2 * (4 * 16 * 64 + 3 * 16 * 128) + 2 * 256 * 64 + 5 * 64)
    assert offloaded["host_bytes"] == buffers and on_device["host_bytes"] == 0
    assert on_device["tensor_peak"] - offloaded["tensor_peak"] == buffers
    assert "gradients" not in offloaded["peak"]["by_category"]  # the engine holds no gradient at this peak
    measured = simulate(offloaded_config, fake=False)  # the same steps on real tensors
    assert measured["host_peak"] == buffers and measured["peak"]["total"] == offloaded["tensor_peak"]


def test_for_a_gpu_the_search_moves_buffers_to_host_ram_before_changing_the_math():
    config = tiny(method="galore", batch_size=4, accumulate=2, loss_chunk_tokens=64, activation_checkpointing=True)
    rungs = [r["name"] for r in ladder(config, "cuda")]
    assert rungs.index("+ accumulation buffers in host RAM") < rungs.index("+ 8bit states")
    assert "+ accumulation buffers in host RAM" not in [r["name"] for r in ladder(config, "cpu")]
    needs = plan_config(config, target="cuda")["total"]
    offloaded = plan_config(replace(config, offload_accumulation=True), target="cuda")["total"]
    search = search_knobs(config, "cuda", (needs + offloaded) // 2)
    best = search["best"]
    assert search["rungs"][0]["max_batch_size"] < 4  # as configured, the whole micro-batch does not fit
    assert best["changes"] == {"offload_accumulation": True}, best
    assert best["max_batch_size"] == 4 and "--offload-accumulation" in flags_of(best)


def test_offloaded_buffers_that_host_ram_cannot_hold_are_refused_before_allocation(monkeypatch):
    from types import SimpleNamespace
    from streamtrain.memory import planner
    monkeypatch.setattr(planner.psutil, "virtual_memory", lambda: SimpleNamespace(available=100_000))
    config = tiny(method="galore", offload_accumulation=True, device="cuda", budget="4GB")
    with pytest.raises(PlanRefused, match="in host RAM but only 100.00 KB"):
        planner.plan_before_training(config)


def test_offloading_on_cpu_is_refused_in_one_line(capsys):
    code = main(["--model", "byte-tiny", "--device", "cpu", "--offload-accumulation", "--accumulate", "2",
                 "--dry-run", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: --offload-accumulation"), err


def test_an_impossible_budget_is_refused_before_allocation_with_the_smallest_that_fits():
    config = TrainConfig(model="llama-7b", dtype="bfloat16", budget="8GB", batch_size=1, seq_len=256,
                         max_data_bytes=10_000, device="cpu", progress=False)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(PlanRefused) as refused:
        Trainer(config)
    assert psutil.Process().memory_info().rss - rss < 1e9  # the 13.5 GB of bf16 weights never existed
    message = str(refused.value)
    assert "\n" not in message and "8GB" in message
    smallest = float(message.split("raise --budget to at least ")[1].split(" GB")[0]) * 1e9
    weights = 2 * parameter_count(get_config("llama-7b"))
    # the search's most frugal setting: INT8 weights in the blocks (1 byte a parameter + scales; the
    # embedding and head stay bf16) + Adam's m and v in 8 bits (2 bytes) + the rest at one sequence
    assert 1.5 * weights < smallest < 1.8 * weights, smallest


def test_the_7b_recipe_fits_24GB_and_agrees_with_analytic_sizes():
    # GaLore rank 1024, 8-bit states, bf16 weights, 16 x 256 = 4096 tokens per micro-batch,
    # exact accumulation to 131072 tokens with the buffers in host RAM
    config = TrainConfig(model="llama-7b", method="galore", rank=1024, states="8bit", dtype="bfloat16",
                         batch_size=16, seq_len=256, accumulate=32, activation_checkpointing=True,
                         loss_chunk_tokens=1024, offload_accumulation=True, device="cuda")
    whole = plan_config(config, budget=parse_bytes("24GB"))
    assert whole["fits"] and whole["total"] < 23e9, whole["total"]
    plan = {line["label"]: line["bytes"] for line in whole["categories"]}
    c = get_config("llama-7b")
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    assert plan["weights"] == 2 * parameter_count(c)
    assert plan["projectors"] == layers * 7 * h * 1024 * 2  # every basis is (4096 x 1024) bf16
    moments = layers * (4 * 1024 * h + 3 * 1024 * i) + 2 * vocab * h  # low-rank + embeddings/lm_head
    eight_bit = 2 * moments * (1 + 4 / 256)                           # m and v: a byte + a scale per 256
    assert abs(plan["optimizer_states"] - eight_bit) < 0.002 * eight_bit
    assert plan["activations"] >= layers * 16 * 256 * h * 2  # at least every block's bf16 input
    norms = (2 * layers + 1) * h
    assert whole["host_bytes"] == 4 * (layers * (4 * 1024 * h + 3 * 1024 * i) + 2 * vocab * h + norms)  # fp32 sums


def test_the_recipe_enforces_a_cpu_budget_and_reports_planned_next_to_measured(tmp_path):
    values = dict(model="byte-tiny", steps=3, batch_size=4, seq_len=64, max_data_bytes=200_000, eval_every=0,
                  eval_batches=2, progress=False, device="cpu", budget="20MB")
    summary = Trainer(TrainConfig(**values, out=str(tmp_path / "fits"))).run()
    assert summary["steps"] == 3
    report = json.loads((tmp_path / "fits" / "memory.json").read_text())
    assert set(report) >= {"config", "plan", "measured", "budget"}
    ratio = report["measured"]["peak"]["total"] / report["plan"]["tensor_peak"]
    assert abs(ratio - 1) < 0.02, ratio
    assert "| **tensor peak** |" in (tmp_path / "fits" / "memory.md").read_text()

    trainer = Trainer(TrainConfig(**values, out=str(tmp_path / "over")))
    trainer.profiler.budget = 1_000_000  # as if the run grew past its budget
    with pytest.raises(RunStopped, match=r"step 0 used .* over the budget of 1.00 MB") as stopped:
        trainer.run()
    assert stopped.value.exit_code == 1 and "checkpoint saved" in str(stopped.value)
    assert (tmp_path / "over" / "memory.md").is_file() and trainer.last_checkpoint.is_dir()


def test_dry_run_writes_the_reports_and_trains_nothing(tmp_path, capsys):
    argv = ["--model", "byte-tiny", "--batch-size", "8", "--seq-len", "64", "--budget", "50MB", "--dry-run",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "dry run: fits" in out
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["kind"] == "dry run" and report["config"]["batch_size"] == 8
    assert report["plan"]["timeline"][0]["phase"] == "idle"
    assert {r["phase"] for r in report["plan"]["timeline"]} >= {"forward loss", "hook lm_head.weight"}
    assert report["plan"]["search"]["best"]["max_batch_size"] >= 8
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "final").exists()
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "memory.png").stat().st_size > 10_000
    except ImportError:
        assert not (tmp_path / "memory.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_allocator_is_capped_and_measured_every_step(tmp_path):
    config = TrainConfig(model="byte-tiny", steps=3, batch_size=4, seq_len=64, max_data_bytes=200_000, eval_every=0,
                         eval_batches=2, progress=False, device="cuda", budget="2GB", out=str(tmp_path))
    trainer = Trainer(config)
    trainer.run()
    cuda = json.loads((tmp_path / "memory.json").read_text())["measured"]["cuda"]
    assert len(cuda["steps"]) == 3 and cuda["cap"] == parse_bytes("2GB") - cuda["context"]
    assert cuda["reserved_peak"] <= cuda["cap"]
    # the tracker's tensor bytes and the allocator's agree to within the allocator's rounding and caching
    measured = json.loads((tmp_path / "memory.json").read_text())["measured"]["peak"]["total"]
    assert 0.9 * measured <= cuda["allocated_peak"] <= 1.5 * measured + 2**26


def test_the_search_tries_bf16_weights_before_lower_state_precision_or_rank():
    rungs = ladder(tiny(method="galore"), "cuda")
    names = [r["name"] for r in rungs]
    assert names.index("+ accumulation buffers in host RAM") < names.index("+ bf16 weights") < names.index("+ bf16 states")
    assert rungs[names.index("+ bf16 weights")] == {"name": "+ bf16 weights", "exact": False, "changes": {
        "loss_chunk_tokens": 1024, "activation_checkpointing": True, "offload_accumulation": True, "dtype": "bfloat16"}}
    assert "+ bf16 weights" not in [r["name"] for r in ladder(tiny(method="galore", dtype="bfloat16"), "cuda")]


def test_the_search_tries_int8_weights_after_bf16_and_low_bit_projectors_before_rank():
    names = [r["name"] for r in ladder(tiny(method="galore", rank=64), "cuda")]
    order = ["+ bf16 weights", "+ int8 weights", "+ bf16 states", "+ 8bit states", "+ int8 projectors",
             "+ int4 projectors", "+ rank 32"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order), names
    assert not any("projectors" in n for n in (r["name"] for r in ladder(tiny(method="adamw"), "cuda")))
    int8 = [r["name"] for r in ladder(tiny(method="galore", dtype="int8", projector_precision="int8"), "cuda")]
    assert "+ int8 weights" not in int8 and "+ int8 projectors" not in int8 and "+ int4 projectors" in int8


def fake_fits(monkeypatch, largest: dict):
    """search_knobs with each rung's largest fitting micro-batch taken from `largest` (by name)."""
    from streamtrain.memory import planner
    monkeypatch.setattr(planner, "fit_rung", lambda config, rung, *a, **k: {
        "name": rung["name"], "exact": rung["exact"], "changes": rung["changes"],
        "max_batch_size": largest.get(rung["name"], 0)})


@pytest.mark.parametrize("largest, best, last", [
    # nothing exact fits: the math changes only until the configured micro-batch (16) fits again
    ({"+ int4 projectors": 2, "+ rank 32": 8, "+ rank 16": 16, "+ rank 8": 16}, "+ rank 16", "+ rank 16"),
    # no rung keeps 16: the largest micro-batch, the earliest of equals
    ({"+ int8 projectors": 4, "+ rank 32": 12, "+ rank 16": 12}, "+ rank 32", "+ rank 8"),
    # an exact setting fits: the first inexact rung that fits ends the search; the exact one is the answer
    ({"as configured": 4, "+ int8 projectors": 16}, "as configured", "+ int8 projectors"),
])
def test_the_search_changes_the_math_only_as_far_as_the_configured_micro_batch_needs(monkeypatch, largest, best,
                                                                                     last):
    fake_fits(monkeypatch, largest)
    config = tiny(method="galore", rank=64, states="8bit", dtype="int8", batch_size=16, accumulate=32,
                  activation_checkpointing=True, loss_chunk_tokens=1024)
    result = search_knobs(config, "cpu", 10**9)
    assert result["best"]["name"] == best
    assert result["rungs"][-1]["name"] == last


def test_the_7b_int8_plan_with_int4_projectors_fits_12GB_at_4096_tokens_and_agrees_with_analytic_sizes():
    # the search's answer to the command (profiles/llama-7b-int8-galore-r256-int4-12GB)
    config = TrainConfig(model="llama-7b", method="galore", rank=256, states="8bit", dtype="int8",
                         projector_precision="int4", batch_size=16, seq_len=256, accumulate=32,
                         activation_checkpointing=True, loss_chunk_tokens=1024, offload_accumulation=True,
                         device="cuda")
    whole = plan_config(config, budget=parse_bytes("12GB"))
    assert whole["fits"], whole["total"]
    plan = {line["label"]: line["bytes"] for line in whole["categories"]}
    c = get_config("llama-7b")
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    linears = layers * (4 * h * h + 3 * h * i)
    norms = (2 * layers + 1) * h
    # a byte per linear element + an fp32 scale per 256; embeddings, head and norms in bf16; each
    # INT8 layer's gradient handle is one bf16 element
    assert plan["weights"] == linears * (1 + 4 / 256) + 2 * (2 * vocab * h + norms) + 2 * 7 * layers
    assert plan["projectors"] == layers * 7 * h * 256 * (0.5 + 4 / 256)  # INT4 (4096 x 256) bases
    moments = layers * (4 * 256 * h + 3 * 256 * i) + 2 * vocab * h
    assert abs(plan["optimizer_states"] - 2 * moments * (1 + 4 / 256)) < 0.002 * 2 * moments


def test_the_7b_dry_run_finds_a_fitting_command_by_itself(tmp_path, capsys):
    # fp32 weights alone are 27 GB: the dry run exits 1, and its search reaches bf16 weights
    assert main(["--model", "llama-7b", "--method", "galore", "--budget", "24GB", "--dry-run",
                 "--out", str(tmp_path)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("what fits (") and "--dtype bfloat16" in last, last
    from streamtrain.config import config_from_args
    from streamtrain.run import parser
    words = last.split("): ", 1)[1].split()
    assert words[:2] == ["streamtrain", "train"]
    fitted = config_from_args(parser().parse_args(words[2:]))
    plan = plan_config(fitted, budget=parse_bytes("24GB"))  # the command, planned as given, fits
    assert plan["fits"] and fitted.batch_size * fitted.accumulate == 16, (plan["total"], last)
