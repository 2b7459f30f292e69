"""The benchmark's machinery on tiny configurations (seconds). No timing is asserted: speed and
memory claims live in the published table, these tests check the numbers the table is built from."""
import json
import math
import sys
from dataclasses import asdict, replace

import pytest
import torch

from streamtrain import bench
from streamtrain.bench import cli, hooks, recipe_check, runner
from streamtrain.bench.comparisons import goal_results
from streamtrain.config import TrainConfig
from streamtrain.memory.profiler import BudgetExceeded, RunProfiler
from streamtrain.methods import low_rank_names
from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config
from streamtrain.optim.schedule import ConstantSchedule

TINY = bench.Preset("byte-tiny", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2),
                    steps=3, batch_size=2, seq_len=16, warmup_skip=1, tracked_steps=2, rank=4, gap=2,
                    eval_batches=2, max_data_bytes=50_000, svd_shape=(48, 96), svd_rank=8, threads=1)


def tiny_model(seed=0):
    cfg = get_config("llama-9m", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                     vocab_size=256, num_attention_heads=4, max_position_embeddings=64)
    return build_model(cfg, seed=seed)


def train_with(make, per_parameter, steps=3, lr=1e-2):
    model = tiny_model()
    runner_ = bench.TorchOptimizers(model, ConstantSchedule(lr), make, per_parameter)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=gen)
        losses.append(runner_.backward(model(x, x.roll(-1, 1))).loss)
    runner_.detach()
    return model, losses, runner_


def recipe(driver, lr=1e-2):
    return bench.optimizer_recipe(driver, TrainConfig(lr=lr))


def test_fused_per_parameter_hooks_equal_the_plain_loop():
    plain, plain_losses, _ = train_with(*recipe("torch"))
    hooked, hooked_losses, runner_ = train_with(*recipe("fused-hooks"))
    assert runner_.step == 3 and len(runner_.optimizers) == len(list(hooked.parameters()))
    assert all(p.grad is None for p in hooked.parameters())  # stepped and freed inside the hooks
    assert plain_losses[0] == hooked_losses[0] and plain_losses[-1] != plain_losses[0]
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_tensor_learning_rate_is_filled_in_place():
    # torchao keeps lr in a tensor and refuses (or recompiles) when it is replaced by a float
    lrs = []

    def make(name, params):
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(0.5))
        lrs.append(optimizer.param_groups[0]["lr"])
        return optimizer
    _, _, runner_ = train_with(make, per_parameter=False, lr=1e-2)
    group_lr = runner_.optimizers[None].param_groups[0]["lr"]
    assert group_lr is lrs[0] and float(group_lr) == pytest.approx(1e-2)


def test_rows_in_their_own_processes_match_and_report():
    # one process per row (time, then memory): the separate-process schedule is test_schedule_...'s
    preset = replace(TINY, one_process=True)
    report = bench.benchmark(preset, "cpu", only=["torch-adamw", "engine-adamw"], svd=False, log=lambda s: None)
    base, engine = report["rows"]["torch-adamw"], report["rows"]["engine-adamw"]
    assert "error" not in base and "error" not in engine, (base, engine)
    # same data, seed and math in two processes: the engine's AdamW lands where torch.optim.AdamW does
    assert engine["val_loss"] == pytest.approx(base["val_loss"], abs=1e-4)
    assert base["val_loss"] < base["initial_val_loss"]
    params = base["parameters"]
    assert engine["parameters"] == params
    # every step after the warm-up is timed; step 0 is the cold start, kept apart
    assert len(base["step_wall_s"]) == len(base["step_cpu_s"]) == TINY.steps - TINY.warmup_skip
    assert base["cold_start_s"] == base["first_step_s"][0] > 0
    assert base["worst_over_median"] == pytest.approx(max(base["step_wall_s"]) / base["median_step_s"])
    assert base["worst_over_median_cpu"] == pytest.approx(max(base["step_cpu_s"]) / base["median_step_cpu_s"])
    # at its optimizer step the plain loop holds weights, both Adam moments and every gradient
    assert base["peak_tensor_bytes"] >= 4 * 4 * params
    # the tracker watched the row's own model and engine: fp32 weights, both moments, all labelled
    assert engine["peak_by_category"]["weights"] == 4 * params
    states = engine["peak_by_category"]["optimizer_states"]
    assert 0 <= states - 2 * 4 * params <= 4 * 16  # + a 0-d update norm per tensor (12 tensors)
    assert sum(engine["peak_by_category"].values()) == engine["peak_tensor_bytes"]
    # torch.optim's moments reach the tracker through TorchOptimizers.states (+ a 0-d step each)
    assert 0 <= base["state_bytes"] - 2 * 4 * params <= 4 * 16
    assert base["rss_peak_bytes"] > base["peak_tensor_bytes"]
    assert base["tokens_per_s"] == pytest.approx(TINY.batch_size * TINY.seq_len / base["median_step_s"])
    assert report["goals"] == []  # neither row pair with a goal is complete among these two rows
    markdown = bench.to_markdown(report)
    assert "| torch-adamw (base) |" in markdown and "1.00x" in markdown
    assert f"{engine['val_loss']:.4f}" in markdown


def test_galore_torch_runs_galore_on_the_matrices_the_engine_would():
    pytest.importorskip("galore_torch")
    model = tiny_model()
    low_rank = set(low_rank_names(model))
    make, per_parameter = bench.optimizer_recipe("galore-torch", TrainConfig(rank=4, galore_gap=2), low_rank)
    runner_ = bench.TorchOptimizers(model, ConstantSchedule(1e-3), make, per_parameter)
    galore = {n for n, p in runner_.named if "rank" in runner_.optimizers[p].param_groups[0]}
    assert per_parameter and galore == low_rank and len(galore) == 2 * 7  # 2 blocks x q, k, v, o, gate, up, down
    runner_.detach()


def recipe_check_args(out, steps=2):
    return ["--model", "byte-tiny", "--method", "galore", "--rank", "8", "--states", "8bit", "--steps", str(steps),
            "--batch-size", "2", "--seq-len", "32", "--accumulate", "2", "--budget", "1GB", "--device", "cpu",
            "--eval-batches", "1", "--no-progress", "--max-data-bytes", "100000", "--out", str(out)]


def test_recipe_check_trains_and_writes_the_plan_next_to_the_measurement(tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe_check.main(recipe_check_args(out)) == 0
    result = json.loads((out / "recipe.json").read_text())
    assert result["steps"] == 2 and len(result["step_s"]) == 2 and len(result["losses"]) == 2
    assert result["tokens_per_step"] == 2 * 32 * 2
    # on CPU the tracker measures the same tensors the planner simulated
    assert result["tensor_peak_ratio"] == pytest.approx(1.0, abs=0.02)
    assert "Planned vs measured" in (out / "memory.md").read_text()
    assert not (out / "checkpoints").exists() and not (out / "final").exists()  # a check writes no weights
    assert "recipe check: 2 steps on cpu" in capsys.readouterr().out


def test_a_recipe_check_stopped_over_budget_still_reports(tmp_path, monkeypatch, capsys):
    after_step = RunProfiler.after_step

    def over_budget(profiler):  # the first step measures as usual, then counts as over the budget
        after_step(profiler)
        raise BudgetExceeded("step 0 used 25 GB, over the budget of 24 GB")
    monkeypatch.setattr(RunProfiler, "after_step", over_budget)
    out = tmp_path / "run"
    assert recipe_check.main(recipe_check_args(out, steps=3)) == 1
    result = json.loads((out / "recipe.json").read_text())
    assert result["steps"] == 1 and "over the budget of 24 GB" in result["stopped"] and len(result["step_s"]) == 1
    assert result["planned_total_bytes"] > 0 and (out / "memory.md").exists()
    assert "error: step 0 used 25 GB" in capsys.readouterr().err


def test_memory_run_sees_gradients_freed_in_hooks():
    # batch 1 x 8 tokens: parameters, not activations, set the peak; the plain loop's peak holds
    # every gradient, the per-parameter hooks free each one before the next is made
    preset = replace(TINY, batch_size=1, seq_len=8)
    plain = bench.memory_run(bench.Row("plain", "torch"), preset, "cpu")["peak_tensor_bytes"]
    hooked = bench.memory_run(bench.Row("hooked", "fused-hooks"), preset, "cpu")["peak_tensor_bytes"]
    model = build_model(get_config(TINY.model, **TINY.model_overrides))
    sizes = [4 * p.numel() for p in model.parameters()]
    assert sum(sizes) - max(sizes) <= plain - hooked <= 1.05 * sum(sizes)  # + small temporaries


def test_step_statistics_keep_the_worst_step_and_the_cold_start_apart():
    result = {"step_wall_s": [0.1, 0.1, 0.3, 0.1, 0.2], "step_cpu_s": [0.1, 0.1, 0.1, 0.1, 0.15],
              "first_step_s": [9.0, 0.5]}
    stats = runner.step_statistics(result, TINY)
    assert stats["median_step_s"] == 0.1 and stats["worst_step_s"] == 0.3
    assert stats["worst_over_median"] == pytest.approx(3.0)
    assert stats["worst_over_median_cpu"] == pytest.approx(1.5)  # the wall clock's 0.3 was not this process's work
    assert stats["cold_start_s"] == 9.0  # the row's first process: compilation shows here, not in the median
    assert stats["tokens_per_s"] == pytest.approx(TINY.batch_size * TINY.seq_len / 0.1)


def test_every_preset_times_galore_refreshes():
    # the worst/median column only shows refresh spikes if a refresh step lies in the timed window
    for name, preset in bench.PRESETS.items():
        window = range(preset.warmup_skip, preset.steps)
        assert any(step % preset.gap == 0 for step in window), name


def test_schedule_measures_memory_first_then_timing_rounds():
    rows = [bench.Row("a", "torch"), bench.Row("b", "engine")]
    kinds = lambda preset: [[(row.name, kind) for row, kind in tasks] for tasks in bench.schedule(rows, preset)]
    assert kinds(replace(TINY, repeats=2)) == [[("a", "memory"), ("b", "memory")], [("a", "time"), ("b", "time")],
                                              [("a", "time"), ("b", "time")]]
    assert kinds(replace(TINY, one_process=True)) == [[("a", "both"), ("b", "both")]]
    assert kinds(replace(TINY, memory_runs=False)) == [[("a", "time"), ("b", "time")]]


def test_workers_get_the_rows_backend_glibcs_setting_and_compile_caches_of_their_own():
    row, other = bench.Row("a", "engine", env={"STREAMTRAIN_UPDATE_BACKEND": "reference"}), bench.Row("b", "engine")
    fresh = replace(TINY, fresh_compile_cache=True)
    memory = runner.worker_env(fresh, "memory", row, "/caches")
    assert memory["STREAMTRAIN_UPDATE_BACKEND"] == "reference" and memory["MALLOC_MMAP_THRESHOLD_"] == "65536"
    timed = runner.worker_env(fresh, "time", row, "/caches")
    assert "MALLOC_MMAP_THRESHOLD_" not in timed  # it slows allocation: timed runs go without it
    caches = {runner.worker_env(fresh, kind, r, "/caches")["TORCHINDUCTOR_CACHE_DIR"]
              for kind in ("memory", "time") for r in (row, other)}
    assert len(caches) == 4  # no row's first step finds another run's compiled kernels
    assert "TORCHINDUCTOR_CACHE_DIR" not in runner.worker_env(TINY, "time", other, "/caches")


def test_missing_peers_are_skipped_with_one_line_each(monkeypatch):
    for module in ("galore_torch", "bitsandbytes", "torchao.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    rows, skipped = bench.discover_rows("cpu")
    names = {r.name for r in rows}
    peers = ("bnb-adamw8bit", "bnb-adamw8bit-hooks", "torchao-adamw8bit", "galore-torch-per-layer")
    assert not names & set(peers) and {"torch-adamw", "torch-adamw-fused-hooks", "engine-adamw"} <= names
    for peer in peers:
        line = next(s for s in skipped if s.startswith(f"{peer}: "))
        assert "import" in line and 'pip install -e ".[bench]"' in line and "\n" not in line


def test_only_refuses_an_unknown_row_in_one_line(capsys):
    assert cli.main(["--only", "torch-adamw,no-such-row", "--no-svd", "--no-hooks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --only: unknown row(s) ['no-such-row']; see --list"]


def test_one_data_parallel_rank_is_refused_in_one_line(capsys):
    assert cli.main(["--only", "torch-adamw", "--parallel-ranks", "1", "--no-svd", "--no-hooks"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --parallel-ranks must be 0 (leave the section out) or at least 2"]


def test_hook_overhead_times_every_variant_on_the_same_math():
    result = bench.hook_overhead(layers=12, width=8, batch=2, steps=2, rounds=2, warmup=1)
    assert result["hooks_per_step"] == 24 and result["timed_steps"] == 4
    assert set(result["variants"]) == set(hooks.VARIANTS)
    figures = result["variants"]
    assert figures["backward-only"]["us_per_hook"] == 0.0
    expected = (figures["engine-adamw"]["median_step_s"] - figures["backward-only"]["median_step_s"]) / 24 * 1e6
    assert figures["engine-adamw"]["us_per_hook"] == pytest.approx(expected)
    assert result["engine_vs_fused_step"] == pytest.approx(
        figures["engine-adamw"]["median_step_s"] / figures["torch-fused-hooks"]["median_step_s"])
    # the engine's AdamW and torch's fused AdamW trained their copies to the same weights (8 steps)
    assert result["engine_vs_fused_max_weight_diff"] < 1e-5
    untrained = hooks.tiny_linears(12, 8)
    trained = hooks.Variant("engine-adamw", hooks.tiny_linears(12, 8))
    trained.step(torch.randn(2, 8))
    trained.close()
    assert not torch.equal(untrained[0].weight, trained.model[0].weight)  # the engine variant did update


def test_key_comparisons_judge_the_issue_goals():
    def row(step, cpu, mean=None):
        return dict(median_step_s=step, median_step_cpu_s=cpu, mean_step_s=mean or step, worst_over_median=1.5,
                    worst_over_median_cpu=1.25, val_loss=3.0)
    rows = {"engine-adamw": row(0.2, 0.2, mean=0.22), "torch-adamw-fused-hooks": row(0.25, 0.18, mean=0.4),
            "engine-adamw-8bit": row(0.3, 0.3), "engine-galore": row(0.3, 0.3)}
    lines = bench.key_comparisons(rows, "cpu", skipped=["galore-torch-per-layer"])
    fused = next(line for line in lines if "vs torch-adamw-fused-hooks" in line)
    assert "step time 0.80x (CPU time 1.11x), mean step 0.55x" in fused  # on CPU: in CPU time too
    assert "worst/median 1.25 vs 1.25" in fused
    assert "goal <= 1.00x: step time met, CPU time NOT met" in fused
    own = next(line for line in lines if line.startswith("- engine-adamw-8bit vs engine-adamw:"))
    assert "step time 1.50x" in own and "goal <= 1.30x: step time NOT met" in own
    assert any(line.startswith("- engine-galore vs galore-torch-per-layer: not measured") for line in lines)
    assert not any("bnb-adamw8bit" in line for line in lines)  # neither run nor skipped: not asked for
    goals = goal_results(rows)
    assert [(g["row"], g["other"], g["goal"]) for g in goals] == [
        ("engine-adamw", "torch-adamw-fused-hooks", 1.0), ("engine-adamw-8bit", "engine-adamw", 1.3)]


def test_markdown_ratios_are_taken_against_the_named_baseline():
    row = dict(row=dict(note="", method="adamw", states="fp32", dtype="float32"), parameters=1e6,
               median_step_s=0.2, median_step_cpu_s=0.2, worst_over_median=3.0, worst_over_median_cpu=1.5,
               cold_start_s=2.0,
               tokens_per_s=100.0, peak_tensor_bytes=4e6, rss_peak_bytes=8e6, val_loss=3.0)
    half = {**row, "median_step_s": 0.1, "median_step_cpu_s": 0.1, "tokens_per_s": 200.0, "peak_tensor_bytes": 1e6}
    report = dict(rows={"base": row, "half": half, "broken": {"row": row["row"], "error": "worker exited 1: boom"}},
                  device="cpu", baseline="base", preset="custom", preset_settings=asdict(TINY),
                  machine=bench.machine_description("cpu"), load_average_start=None, load_average_end=None,
                  skipped=["peer x: not installed"], note="two test suites ran beside it")
    lines = bench.to_markdown(report).splitlines()
    assert "- Note: two test suites ran beside it" in lines
    half = next(line for line in lines if line.startswith("| half |"))
    assert half.split(" | ")[1:10] == ["100", "0.50x", "100", "0.50x", "1.50", "2.00", "200", "1.0", "0.25x"]
    assert "| broken | worker exited 1: boom |" in lines
    assert "- skipped: peer x: not installed" in lines


def test_a_gpu_report_shows_allocator_peaks_and_judges_step_time_alone():
    # the gpu preset has no separate memory runs: its timed runs read the CUDA allocator's peaks
    row = dict(row=dict(note="", method="adamw", states="fp32", dtype="float32"), parameters=85e6,
               median_step_s=0.05, median_step_cpu_s=0.05, worst_over_median=1.1, worst_over_median_cpu=1.0,
               cold_start_s=3.0,
               tokens_per_s=80000.0, cuda_allocated_peak_bytes=2e9, cuda_nvml_peak_bytes=3e9, val_loss=3.0)
    rows = {"torch-adamw-fused-hooks": row, "engine-adamw": {**row, "median_step_s": 0.04, "median_step_cpu_s": 0.09,
                                                             "cuda_allocated_peak_bytes": 1e9}}
    machine = dict(cpu="cpu", cores=16, gpu="NVIDIA H200", torch="2.11", python="3.12", peers={})
    report = dict(rows=rows, device="cuda", baseline="torch-adamw-fused-hooks", preset="gpu",
                  preset_settings=asdict(bench.PRESETS["gpu"]), machine=machine, load_average_start=None,
                  load_average_end=None, skipped=[])
    lines = bench.to_markdown(report).splitlines()
    header = next(line for line in lines if line.startswith("| row |"))
    assert "CUDA allocated MB" in header and "peak tensors" not in header and "peak RSS" not in header
    engine = next(line for line in lines if line.startswith("| engine-adamw |"))
    assert "| 1000.0 | 0.50x |" in engine
    fused = next(line for line in lines if line.startswith("- engine-adamw vs torch-adamw-fused-hooks"))
    assert "goal <= 1.00x: step time met**" in fused and "CPU time" not in fused  # GPU work is asynchronous
    assert "worst/median 1.10 vs 1.10" in fused and "| 1.10 |" in engine
    assert "CUDA allocated 0.50x" in fused


def test_svd_comparison_measures_captured_energy():
    result = bench.run_svd_comparison(TINY, "cpu")
    m, n = TINY.svd_shape
    gen = torch.Generator().manual_seed(0)  # the same matrix, rebuilt: its top-r energy is the oracle
    weights = 1.0 / torch.arange(1, m + 1, dtype=torch.float32)
    matrix = (torch.randn(m, m, generator=gen) * weights) @ torch.randn(m, n, generator=gen) / math.sqrt(m * n)
    matrix += 1e-3 * matrix.std() * torch.randn(m, n, generator=gen)
    s = torch.linalg.svdvals(matrix)
    expected = float(s[:TINY.svd_rank].square().sum() / s.square().sum())
    assert result["exact"]["energy_captured"] == pytest.approx(expected, rel=1e-4)
    assert expected - 0.01 < result["randomized"]["energy_captured"] <= expected + 1e-5


def test_the_quality_section_trains_bf16_int8_and_int4_projector_rows_alike_and_reports_ratios():
    from streamtrain.bench.quality import ROWS, quality_comparison, quality_lines
    settings = dict(model="byte-tiny", steps=2, batch_size=2, seq_len=32, rank=8, gap=1, lr=2e-3, eval_batches=1,
                    max_data_bytes=100_000)
    result = quality_comparison(settings)
    rows = result["rows"]
    assert list(rows) == list(ROWS) and rows["bf16-weights"]["vs_bf16"] == 1.0
    for row in rows.values():  # the same data and steps: every row learns, by similar amounts
        assert row["val_loss"] < row["initial_val_loss"] - 0.1
        assert 0.9 < row["vs_bf16"] < 1.1 and row["vs_bf16"] == row["val_loss"] / rows["bf16-weights"]["val_loss"]
    lines = quality_lines(result)
    assert sum(line.startswith("| int8-weights") for line in lines) == 2
    assert "`--dtype int8 --projector-precision int4`" in "\n".join(lines) and lines[-1].startswith("Goal:")
    failing = {**result, "rows": {**rows, "int8-weights": {**rows["int8-weights"], "vs_bf16": 1.05}}}
    assert "NOT met (worst 1.0500x)" in quality_lines(failing)[-1]


def projected_and_full_bytes(preset) -> tuple[int, int]:
    """Bytes one step all-reduces in fp32 when every GaLore matrix sends its projected gradient
    (r x n or m x r: r times its larger side), and when every parameter sends its full gradient."""
    model = build_model(get_config(preset.model, **preset.model_overrides))
    galore = set(low_rank_names(model))
    projected = full = 0
    for name, p in model.named_parameters():
        full += p.numel() * 4
        projected += (min(preset.rank, *p.shape) * max(p.shape) if name in galore else p.numel()) * 4
    return projected, full


def test_data_parallel_galore_all_reduces_projected_gradients_and_matches_one_process():
    # 2 gloo ranks under torchrun vs one process with the global batch; a gap longer than the run,
    # so after step 0 (every matrix's first subspace: full gradients and bases) no step refreshes
    preset = replace(TINY, model_overrides=dict(TINY.model_overrides, hidden_size=64, intermediate_size=256,
                                                          num_hidden_layers=2),
                     steps=4, gap=100, parallel_ranks=2)
    section = bench.data_parallel(preset, "cpu", lambda spec, launcher: runner.run_in_worker(
        spec, 300, launcher=launcher), log=lambda line: None, names=("engine-galore",))
    ranks, single = section["runs"]
    assert (ranks["ranks"], ranks["batch_per_rank"], single["ranks"], single["batch_per_rank"]) == (2, 1, 1, 2)
    projected, full = projected_and_full_bytes(preset)
    assert full > 3.5 * projected  # the projection ratio this check rests on
    sent_per_step = [sent for sent, _ in ranks["comm_bytes_per_step"]]
    assert sent_per_step[0] > full and sent_per_step[1:] == [projected] * 3
    assert all(f == full for _, f in ranks["comm_bytes_per_step"])
    assert ranks["full_over_sent"] == pytest.approx(full / projected)
    assert ranks["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert single["comm_bytes_per_step"] is None and "| engine-galore | 2 x 1 |" in "\n".join(
        bench.parallel_lines(section))
