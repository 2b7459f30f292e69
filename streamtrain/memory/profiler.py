"""Memory during a real run: measured next to the plan, and the budget enforced every step.

- The MemoryTracker follows the first `timeline_steps` logical steps (categories and the per-phase
  timeline). On CPU with a budget it stays on for the whole run: there the budget applies to
  tracked tensor bytes, checked at every step end.
- On CUDA the caching allocator is capped to the budget minus the measured CUDA context, and at
  every step end the allocator's peaks and NVML's figure for the process are read. Going over the
  budget raises BudgetExceeded at the step boundary (weights and states are whole there, so the
  trainer can save a checkpoint); an allocation beyond the cap raises torch.OutOfMemoryError
  inside the step instead of letting the process grow.
"""
import contextlib

import torch

from .device import cap_allocator, context_bytes, cuda_step_measurement
from .tracker import MemoryTracker
from .units import format_bytes


class BudgetExceeded(RuntimeError):
    """A step used more memory than the budget allows."""


class RunProfiler:
    def __init__(self, model, engine, device: torch.device, budget: int | None = None, timeline_steps: int = 2):
        self.model, self.engine, self.device, self.budget = model, engine, device, budget
        self.cuda = device.type == "cuda"
        self.timeline_steps = timeline_steps
        self.track_every_step = budget is not None and not self.cuda
        self.tracker = MemoryTracker(round_to=512 if self.cuda else 1, timeline_steps=timeline_steps,
                                     device_type=device.type)
        self.cuda_steps: list[dict] = []
        self.context = self.cap = None
        self._tracking = False

    @contextlib.contextmanager
    def tracking(self):
        """Track from here; stop tracking on leaving (normally or by an exception)."""
        self.start()
        try:
            yield self
        finally:
            self.stop_tracking()

    def start(self) -> None:
        if self.cuda:
            self.context = context_bytes(self.device)
            if self.budget is not None:
                self.cap = self.budget - self.context
                cap_allocator(self.budget, self.device, self.context)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tracker.watch(self.model, self.engine)
        self.tracker.__enter__()
        self._tracking = True

    def stop_tracking(self) -> None:
        if self._tracking:
            self.tracker.__exit__(None, None, None)
            self.tracker.unwatch()
            self._tracking = False

    def after_step(self) -> None:
        """Call at every logical step boundary (after the engine's step end). Raises
        BudgetExceeded when the step went over the budget."""
        if self.cuda:
            self.cuda_steps.append(cuda_step_measurement(self.device))
        if self._tracking and not self.track_every_step and self.tracker.step >= self.timeline_steps:
            self.stop_tracking()
        if self.budget is None:
            return
        used, what = self.step_usage()
        if used > self.budget:
            raise BudgetExceeded(f"step {self.engine.step - 1} used {format_bytes(used)} ({what}), over the "
                                 f"budget of {format_bytes(self.budget)}")

    def step_usage(self) -> tuple[int, str]:
        """The last step's memory as the budget counts it."""
        if not self.cuda:
            return self.tracker.step_peaks[-1]["total"], "tracked tensor bytes"
        last = self.cuda_steps[-1]
        allocator = last["reserved_peak"] + self.context
        if last["nvml_process"] is not None and last["nvml_process"] > allocator:
            return last["nvml_process"], "the process on the device, NVML"
        return allocator, "allocator peak reserved + CUDA context"

    def measured(self) -> dict:
        summary = self.tracker.summary()
        result = {**summary, "timeline_steps": self.timeline_steps}
        if self.cuda:
            steps = self.cuda_steps or [cuda_step_measurement(self.device)]
            nvml = [s["nvml_process"] for s in steps if s["nvml_process"] is not None]
            result["cuda"] = {"name": torch.cuda.get_device_name(self.device), "context": self.context, "cap": self.cap,
                              "allocated_peak": max(s["allocated_peak"] for s in steps),
                              "reserved_peak": max(s["reserved_peak"] for s in steps),
                              "nvml_peak": max(nvml) if nvml else None, "steps": steps}
        return result
