"""The Engine: per-parameter update hooks, one step clock, accumulation, clipping, LR.

One logical step, as data flows:

    for each of k micro-batches:
        engine.backward(loss)            # (loss / k).backward()
          autograd finishes p.grad  ->  hook(p):
              grad = p.grad; p.grad = None              # the full gradient is ours, then gone
              skip it if the step already saw a non-finite value
              micro-batch < k-1: rule.accumulate(p, grad, state)   # e.g. GaLore keeps P^T G only
                                                                   # (on the device, or in host RAM)
              micro-batch = k-1: rule.update(p, grad, state)       # the one update of the step
    after the last micro-batch: finish_step()
          every rule's end_step (ReLoRA merges), the clock advances, a StepReport is returned

The engine owns time: the learning rate, weight decay and the step counter are evaluated once per
logical step and handed to every hook in a StepContext. Rules keep no clock of their own.
"""
import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .optim.schedule import ConstantSchedule
from .rules.base import Rule, StepContext


@dataclass
class StepReport:
    step: int               # the logical step just finished (0-based)
    loss: float             # mean loss over its micro-batches
    lr: float
    grad_norm: float        # global L2 norm, computed inside the hooks (see Rule.update)
    skipped: bool           # a non-finite loss or gradient: the step was not taken
    nonfinite_total: int    # skipped steps so far
    # In a skipped step, the parameters that changed anyway: per-layer updates cannot wait for the
    # whole backward, so when the non-finite gradient shows up in the last micro-batch, the
    # parameters whose hooks fired before it are already updated (and a GaLore refresh in the
    # first micro-batch has already replaced its basis). Empty when nothing moved.
    partial: tuple = ()


class NonFiniteError(RuntimeError):
    pass


class Engine:
    def __init__(self, model: torch.nn.Module, rules: dict[str, Rule], *, schedule=None, lr: float = 1e-3,
                 accumulate: int = 1, weight_decay: float = 0.0, clip_per_tensor: float | None = None,
                 norm_growth: float | None = None, stochastic_rounding: bool = True,
                 skip_nonfinite: bool = True, max_nonfinite_in_row: int = 10,
                 offload_accumulation: bool = False):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.model = model
        self._scan_parameters(rules)
        self.schedule = schedule or ConstantSchedule(lr)
        self.accumulate = accumulate
        self.weight_decay = weight_decay
        self.clip_per_tensor = clip_per_tensor
        self.norm_growth = norm_growth
        self.stochastic_rounding = stochastic_rounding
        self.skip_nonfinite = skip_nonfinite
        self.max_nonfinite_in_row = max_nonfinite_in_row
        # accumulation buffers in host RAM: the GPU keeps only the current micro-batch's gradient
        self.buffer_device = torch.device("cpu") if offload_accumulation else None
        self.states: dict[str, dict] = {}
        self.listeners = []     # objects with optional on_hook(engine, name, phase) / on_step_end(engine, report)
        self.step = 0           # logical steps completed
        self.micro_index = 0    # micro-batch within the current logical step
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self._handles = None
        self._new_step()

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> "Engine":
        """Create every rule's state and register one post-accumulate-grad hook per parameter."""
        if self._handles is not None:
            raise RuntimeError("Engine hooks are already registered; call detach() first")
        for name, p in self.params.items():
            if name not in self.states:
                self.states[name] = self.rules[name].init_state(name, p)
        self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(name))
                         for name, p in self.params.items()]
        return self

    def detach(self) -> None:
        for handle in self._handles or []:
            handle.remove()
        self._handles = None

    def rebuild(self, rules: dict[str, Rule] | None = None) -> None:
        """Re-scan the model's trainable parameters at a step boundary (ReLoRA adds adapters and
        freezes the matrices they wrap): drop the states of parameters no longer trainable, give
        new ones their rule from `rules` (existing parameters keep theirs) and fresh states, and
        re-register the hooks if they were registered."""
        attached = self._handles is not None
        self.detach()
        self._scan_parameters({**self.rules, **(rules or {})})
        self.states = {n: s for n, s in self.states.items() if n in self.params}
        if attached:
            self.attach()

    def _scan_parameters(self, rules: dict[str, Rule]) -> None:
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(set(self.params) - set(rules))
        if missing:
            raise ValueError(f"no update rule for trainable parameter(s): {missing[:5]}")
        self.rules = {n: rules[n] for n in self.params}

    def _make_hook(self, name):
        def hook(param):
            self._on_grad(name, param)
        return hook

    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        if name in self._seen_this_backward:
            raise RuntimeError(f"gradient hook for {name} fired twice in one backward "
                               "(reentrant checkpointing or a reused graph?)")
        self._seen_this_backward.add(name)
        if self._step_bad or (self.skip_nonfinite and not is_finite(grad)):
            self._step_bad = True
            return
        rule, state = self.rules[name], self.states[name]
        ctx = self.contexts[id(rule)]
        self._touched.add(name)
        self._notify("on_hook", name, "before")
        with torch.no_grad():
            if ctx.is_last:
                self._grad_sq = self._grad_sq + rule.update(param, grad, state, ctx)
                self._updated.append(name)
            else:
                rule.accumulate(param, grad, state, ctx)
        del grad
        self._notify("on_hook", name, "after")

    # -- the step ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> StepReport | None:
        """Backward one micro-batch's mean loss (scaled by 1/accumulate here). Returns the
        StepReport after the last micro-batch of a logical step, else None."""
        if self._handles is None:
            raise RuntimeError("call engine.attach() before engine.backward()")
        self.context = self._context()
        self.contexts = self._rule_contexts()
        self._seen_this_backward = set()
        loss_value = loss.detach().float()
        if self.skip_nonfinite and not bool(torch.isfinite(loss_value)):
            self._step_bad = True
        if not self._step_bad:
            (loss / self.accumulate).backward()
        self._loss_sum = self._loss_sum + loss_value
        self.micro_index += 1
        if self.micro_index < self.accumulate:
            return None
        return self.finish_step()

    def finish_step(self) -> StepReport:
        """The logical step boundary: flush, end_step of every rule, advance the clock."""
        ctx = self._context(micro_index=self.accumulate - 1)
        if self._step_bad:
            for state in self.states.values():
                discard_buffers(state)
        else:
            self._update_without_last_grad(ctx)
            for rule in unique(self.rules.values()):
                rule.end_step(self)
        report = self._report(ctx)
        self.step += 1
        self._new_step()
        self._notify("on_step_end", report)
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteError(f"{self.nonfinite_in_row} steps in a row had a non-finite loss or "
                                 "gradient; lower the learning rate or enable clipping")
        return report

    def _update_without_last_grad(self, ctx) -> None:
        # a parameter that got gradients earlier in the step but none in the last micro-batch
        # still owes its update (its buffer must not leak into the next step)
        contexts = self._rule_contexts(micro_index=self.accumulate - 1)
        for name in self._touched - self._seen_this_backward:
            p, rule = self.params[name], self.rules[name]
            with torch.no_grad():
                self._grad_sq = self._grad_sq + rule.update(p, torch.zeros_like(p), self.states[name],
                                                            contexts[id(rule)])

    def _report(self, ctx) -> StepReport:
        skipped = self._step_bad
        self.nonfinite_total += skipped
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
        loss = value_of(self._loss_sum) / self.accumulate
        grad_norm = math.nan if skipped else math.sqrt(value_of(self._grad_sq))
        partial = self._changed_anyway(ctx.step) if skipped else ()
        return StepReport(ctx.step, loss, ctx.lr, grad_norm, skipped, self.nonfinite_total, partial)

    def _changed_anyway(self, step: int) -> tuple:
        """The parameters a skipped step changed before its non-finite value was found: updated in
        the last micro-batch, or given a new subspace (refresh_step == step) in the first."""
        refreshed = [n for n, state in self.states.items() if state.get("refresh_step") == step]
        return tuple(sorted(set(self._updated) | set(refreshed)))

    # -- clock and context ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.schedule(step)

    def _context(self, micro_index=None, rule: Rule | None = None) -> StepContext:
        """The micro-batch's context; with `rule`, at that rule's learning rate and decay."""
        lr, decay = self.lr_at(self.step), self.weight_decay
        if rule is not None:
            lr, decay = lr * rule.lr_scale, decay if rule.weight_decay is None else rule.weight_decay
        return StepContext(step=self.step, lr=lr, micro_index=self.micro_index if micro_index is None else micro_index,
                           accumulate=self.accumulate, weight_decay=decay,
                           clip_per_tensor=self.clip_per_tensor, norm_growth=self.norm_growth,
                           stochastic_rounding=self.stochastic_rounding, buffer_device=self.buffer_device)

    def _rule_contexts(self, micro_index=None) -> dict:
        """One context per rule object (a parameter group), built once per micro-batch."""
        return {id(rule): self._context(micro_index, rule) for rule in unique(self.rules.values())}

    def _new_step(self) -> None:
        self.micro_index = 0
        self._step_bad = False
        self._touched = set()
        self._updated = []
        self._seen_this_backward = set()
        self._grad_sq = torch.zeros(())
        self._loss_sum = torch.zeros(())
        self.context = self._context()
        self.contexts = self._rule_contexts()

    def _notify(self, event, *args) -> None:
        for listener in self.listeners:
            fn = getattr(listener, event, None)
            if fn is not None:
                fn(self, *args)

    # -- inspection ----------------------------------------------------------------------------
    def rule_names(self) -> dict[str, str]:
        return {n: r.name for n, r in self.rules.items()}


def value_of(t: torch.Tensor) -> float:
    """A 0-d tensor as a float; NaN for fake tensors (the memory planner runs the engine on
    FakeTensorMode, where tensors have shapes but no values)."""
    return math.nan if is_fake(t) else float(t)


def is_finite(t: torch.Tensor) -> bool:
    """One reduction instead of an element-wise isfinite: a NaN or Inf anywhere makes the sum
    non-finite (so does a sum past fp32's range, which is no usable gradient either)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32)))


def discard_buffers(state: dict) -> None:
    """Drop a step's partial gradient sums (their keys end in 'grad_acc')."""
    for key in state:
        if key.endswith("grad_acc"):
            state[key] = None


def unique(items):
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out
