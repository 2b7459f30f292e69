"""The benchmark's machinery on a tiny configuration (seconds). No timing is asserted: speed and
memory claims live in the published table, these tests check the numbers the table is built from."""
import math

import pytest
import torch

from streamtrain import bench
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


def train_with(driver, steps=3, lr=1e-2):
    model = tiny_model()
    config = bench.TrainConfig(lr=lr)
    make, per_parameter = bench.optimizer_recipe(driver, config)
    runner = bench.TorchOptimizers(model, ConstantSchedule(lr), make, per_parameter)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=gen)
        report = runner.backward(model(x, x.roll(-1, 1)))
        losses.append(report.loss)
    runner.detach()
    return model, losses, runner


def test_fused_per_parameter_hooks_equal_the_plain_loop():
    plain, plain_losses, _ = train_with("torch")
    hooked, hooked_losses, runner = train_with("fused-hooks")
    assert runner.step == 3 and len(runner.optimizers) == len(list(hooked.parameters()))
    assert all(p.grad is None for p in hooked.parameters())  # stepped and freed inside the hooks
    assert plain_losses[0] == hooked_losses[0] and plain_losses[-1] != plain_losses[0]
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_rows_in_their_own_processes_match_and_report():
    report = bench.benchmark(TINY, "cpu", only=["torch-adamw", "engine-adamw"], svd=False, log=lambda s: None)
    base, engine = report["rows"]["torch-adamw"], report["rows"]["engine-adamw"]
    assert "error" not in base and "error" not in engine, (base, engine)
    # same data, seed and math in two processes: the engine's AdamW lands where torch.optim.AdamW does
    assert engine["val_loss"] == pytest.approx(base["val_loss"], abs=1e-4)
    assert base["val_loss"] < base["initial_val_loss"]
    params = base["parameters"]
    assert engine["parameters"] == params
    assert len(base["step_wall_s"]) == len(base["step_cpu_s"]) == TINY.steps - TINY.warmup_skip
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
    markdown = bench.to_markdown(report)
    assert "| torch-adamw (base) |" in markdown and "1.00x" in markdown
    assert f"{engine['val_loss']:.4f}" in markdown


def test_memory_run_sees_gradients_freed_in_hooks():
    # batch 1 x 8 tokens: parameters, not activations, set the peak; the plain loop's peak holds
    # every gradient, the per-parameter hooks free each one before the next is made
    preset = bench.replace(TINY, batch_size=1, seq_len=8)
    plain = bench.memory_run(bench.Row("plain", "torch"), preset, "cpu")["peak_tensor_bytes"]
    hooked = bench.memory_run(bench.Row("hooked", "fused-hooks"), preset, "cpu")["peak_tensor_bytes"]
    model = build_model(get_config(TINY.model, **TINY.model_overrides))
    sizes = [4 * p.numel() for p in model.parameters()]
    assert sum(sizes) - max(sizes) <= plain - hooked <= 1.05 * sum(sizes)  # + small temporaries


def test_markdown_ratios_are_taken_against_the_named_baseline():
    row = dict(row=dict(note="", method="adamw", states="fp32", dtype="float32"), parameters=1e6,
               median_step_s=0.2, median_step_cpu_s=0.2, tokens_per_s=100.0, peak_tensor_bytes=4e6,
               rss_peak_bytes=8e6, val_loss=3.0)
    half = {**row, "median_step_s": 0.1, "median_step_cpu_s": 0.1, "tokens_per_s": 200.0, "peak_tensor_bytes": 1e6}
    report = dict(rows={"base": row, "half": half},
                  device="cpu", baseline="base", preset="custom", preset_settings=bench.asdict(TINY),
                  machine=bench.machine_description("cpu"), load_average_start=None, load_average_end=None,
                  skipped=["peer x: not installed"])
    lines = bench.to_markdown(report).splitlines()
    half = next(line for line in lines if line.startswith("| half |"))
    assert half.split(" | ")[1:7] == ["100", "0.50x", "100", "0.50x", "200", "1.0"] and "0.25x" in half
    assert "- skipped: peer x: not installed" in lines


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
