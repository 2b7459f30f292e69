"""What one worker process measures for a row: a timed run, a memory run, or both.

time:   Trainer.run() as a user runs it: every step's wall and CPU time, tokens/s, the final
        validation loss (and the allocator's and NVML's peaks on CUDA);
memory: a short run of the same row under the memory tracker (peak live tensor bytes, what made
        the peak) with the process's peak RSS. The tracker slows every op, so it stays out of the
        timed run, and the parent runs it with glibc told to return freed blocks at once
        (MALLOC_MMAP_THRESHOLD_), so RSS follows the tensors.
"""
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ..engine import Engine
from .hooks import hook_overhead
from .presets import Preset
from .quality import quality_comparison
from .peers import untrackable_reason
from .rows import Row, train_config
from .svd import run_svd_comparison
from .trainer import BenchTrainer


def timed_run(row: Row, preset: Preset, device: str) -> dict:
    """The full run: step times (the first `warmup_skip` apart), tokens/s, validation loss."""
    with tempfile.TemporaryDirectory() as out:
        trainer = BenchTrainer(train_config(row, preset, device, preset.steps, out), row)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        summary = trainer.run()
        (wall, cpu), ranks = trainer.clock.step_times(), low_ranks(trainer.engine)
        traffic = [[r["comm_bytes"], r["comm_bytes_full_gradients"]] for r in trainer.history if "comm_bytes" in r]
        cuda = trainer.profiler.measured().get("cuda", {})
        del trainer
    skip = preset.warmup_skip
    return {"steps": summary["steps"], "val_loss": summary["val_loss"],
            "initial_val_loss": summary["initial_val_loss"],
            "parameters": parameters, "trainable_parameters": trainable,
            "first_step_s": wall[0], "step_wall_s": wall[skip:], "step_cpu_s": cpu[skip:],
            "mean_rank": statistics.fmean(ranks) if ranks else None,
            **({"traffic": traffic} if traffic else {}),  # data parallel: [sent, full-gradient] bytes per step
            **{f"cuda_{key}_bytes": cuda[key] for key in ("allocated_peak", "reserved_peak", "nvml_peak")
               if cuda.get(key) is not None}}


def low_ranks(engine) -> list[int]:
    """The current rank of every low-rank projected matrix (GaLore, AdaRankGrad) at the end."""
    states = engine.states.values() if isinstance(engine, Engine) else []
    return [s["rank"] for s in states if isinstance(s.get("rank"), int)]


def memory_run(row: Row, preset: Preset, device: str) -> dict:
    """A short run of the same row: what Trainer's memory profiler measured over its first steps
    (peak live tensor bytes, what made the peak, the largest optimizer-state bytes) and the
    process's peak RSS in training. Rows that cannot run under the tracker get the RSS alone."""
    trackable = untrackable_reason(row) is None
    with tempfile.TemporaryDirectory() as out:
        trainer = BenchTrainer(train_config(row, preset, device, preset.tracked_steps, out), row,
                               track_tensors=trackable)
        trainer.run()
        measured, rss = trainer.profiler.measured(), trainer.rss_peak_bytes
        del trainer
    if not trackable:
        return {"rss_peak_bytes": rss, "untracked": untrackable_reason(row)}
    peak = measured["peak"]
    return {"peak_tensor_bytes": peak["total"], "peak_phase": peak["phase"],
            "peak_by_category": peak["by_category"], "rss_peak_bytes": rss,
            "state_bytes": measured["max_by_category"]["optimizer_states"]}


def both_runs(row: Row, preset: Preset, device: str) -> dict:
    """Time, then memory, in one process (the quick preset: half the process start-ups); timing
    first, so a compiled optimizer's first step is still its first."""
    timed = timed_run(row, preset, device)
    return {**memory_run(row, preset, device), **timed}


KINDS = {"time": timed_run, "memory": memory_run, "both": both_runs}


def worker_main(spec: dict) -> None:
    """`python -m streamtrain.bench --worker SPEC`: one measurement, its result as JSON at
    spec['result_path']."""
    preset, device = Preset(**spec["preset"]), spec["device"]
    if preset.threads:
        torch.set_num_threads(preset.threads)
    if spec["kind"] == "svd":
        result = run_svd_comparison(preset, device)
    elif spec["kind"] == "hooks":
        result = hook_overhead(device=device, **preset.hooks)
    elif spec["kind"] == "quality":
        result = quality_comparison(preset.quality, device)
    else:
        result = KINDS[spec["kind"]](Row(**spec["row"]), preset, device)
    if torch.distributed.is_initialized():  # a data-parallel run (parallel.py): rank 0 reports for all
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    Path(spec["result_path"]).write_text(json.dumps(result))
