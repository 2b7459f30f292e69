"""Peer optimizers behind the part of the Engine interface that Trainer and its memory profiler
use, so that every row of the benchmark runs the same loop, data, timing and evaluation code."""
import math

import torch

from ..engine import StepReport


class TorchOptimizers:
    """torch.optim-style optimizers behind backward -> StepReport, step, micro_index,
    nonfinite_total, states, listeners and detach, with the engine's LR schedule.
    `per_parameter`: one optimizer per parameter, stepped in its post-accumulate-grad hook the
    moment its gradient is complete (the gradient is freed right after)."""

    def __init__(self, model, schedule, make_optimizer, per_parameter: bool):
        self.schedule, self.step, self.micro_index, self.nonfinite_total = schedule, 0, 0, 0
        self.listeners = []  # as the engine's: on_step_end(self, report)
        self.reducer = None  # one process: no data-parallel reduction
        self.rules = {}      # no streamtrain rules: nothing for Trainer to ask about ranks
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if per_parameter:
            self.optimizers = {p: make_optimizer(n, p) for n, p in self.named}
            self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for _, p in self.named]
        else:
            self.optimizers = {None: make_optimizer(None, [p for _, p in self.named])}
            self.handles = []

    @property
    def states(self) -> dict:
        """{parameter name: its optimizer state}, so the tracker files it as optimizer state."""
        return {n: self.optimizers.get(p, self.optimizers.get(None)).state.get(p, {}) for n, p in self.named}

    def _step_one(self, param):
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr in a tensor so its compiled step
                    group["lr"].fill_(lr)                  # is not recompiled for every new value
                else:
                    group["lr"] = lr

    def backward(self, loss) -> StepReport:
        lr = self.schedule(self.step)
        self.set_lr(lr)
        loss.backward()
        if not self.handles:
            self.optimizers[None].step()
            self.optimizers[None].zero_grad(set_to_none=True)
        report = StepReport(self.step, float(loss.detach()), lr, math.nan, False, 0)
        self.step += 1
        for listener in self.listeners:
            listener.on_step_end(self, report)
        return report

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
