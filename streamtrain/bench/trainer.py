"""Trainer for one benchmark row: the user's training loop, clocked, without I/O or planning.

BenchTrainer swaps in peer optimizers (and a memory profiler that follows them) where the row
asks for them, clocks every step from the start of the loop, reads the peak RSS when training
ends, and writes nothing: no checkpoints, no final weights, no memory report. Without a budget
it also skips the memory plan that Trainer makes before training (a FakeTensorMode simulation,
seconds per process on 2 cores, which the benchmark's numbers do not use).

Only memory runs track tensors (`track_tensors`): the tracker is a TorchDispatchMode that slows
every op (and torch.compile refuses to run under it), so timed runs read the CUDA allocator's
peaks alone (PeaksOnlyProfiler).
"""
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch

from ..config import TrainConfig
from ..memory.device import process_bytes_nvml
from ..memory.profiler import RunProfiler
from ..methods import low_rank_names
from ..recipe import low_rank_targets
from ..train import Trainer
from .peers import optimizer_recipe
from .rows import Row
from .torch_optimizers import TorchOptimizers


class StepClock:
    """Engine listener: wall and process CPU time at the start of the loop and at the end of
    every logical step. CPU time counts only this process's work, so it stays put when other work
    shares the machine (with one torch thread; with more, threads waiting on each other count too)."""

    def __init__(self):
        self.stamps = []

    def start(self) -> None:
        self.stamps = [self.now()]

    def on_step_end(self, engine, report):
        self.stamps.append(self.now())

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def step_times(self) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of every step, the first one included."""
        pairs = list(zip(self.stamps, self.stamps[1:]))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


class PeaksOnlyProfiler:
    """The part of RunProfiler that Trainer calls, without the tensor tracker and without work
    between steps (that would land in the next step's time): on CUDA the allocator's peaks over
    the whole run and NVML's figure for the process at the end; on CPU nothing."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def tracking(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield self

    def after_step(self) -> None:
        pass

    def measured(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"cuda": {"allocated_peak": torch.cuda.max_memory_allocated(self.device),
                         "reserved_peak": torch.cuda.max_memory_reserved(self.device),
                         "nvml_peak": process_bytes_nvml(self.device)}}


class BenchTrainer(Trainer):
    def __init__(self, config: TrainConfig, row: Row, track_tensors: bool = False):
        if config.budget:
            super().__init__(config)
        else:  # the plan only feeds the memory report, which a benchmark run does not write
            with mock.patch("streamtrain.train.plan_before_training", return_value=None):
                super().__init__(config)
        if row.driver != "engine":
            schedule = self.engine.schedule
            self.engine.detach()
            self.engine = None   # its states are freed before any peak is read
            low_rank = set(low_rank_names(self.model, low_rank_targets(config)))
            make, per_parameter = optimizer_recipe(row.driver, config, low_rank)
            self.engine = TorchOptimizers(self.model, schedule, make, per_parameter)
            self.profiler = RunProfiler(self.model, self.engine, self.device)
        if not track_tensors:
            self.profiler = PeaksOnlyProfiler(self.device)
        self.clock = StepClock()
        self.engine.listeners.append(self.clock)
        reset_peak_rss()

    def _train_steps(self, metrics, bar) -> None:
        self.clock.start()  # after the first evaluation: step 0 is timed from here
        super()._train_steps(metrics, bar)

    def finish(self) -> dict:
        self.rss_peak_bytes = peak_rss()
        self.engine.detach()
        val = [r["val_loss"] for r in self.history if "val_loss" in r]
        return {"steps": self.engine.step, "val_loss": val[-1] if val else None,
                "initial_val_loss": getattr(self, "initial_val_loss", None)}

    def save_checkpoint(self):
        return None


def reset_peak_rss() -> None:
    """Restart the RSS high-water mark, so a row's peak is its training's, not its setup's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
    except OSError:
        pass


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: the current RSS is the best there is
    return psutil.Process().memory_info().rss
