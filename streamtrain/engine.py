"""The Engine: per-parameter update hooks, one step clock, accumulation, clipping, LR.

One logical step, as data flows:

    for each of k micro-batches:
        loss.backward()                  # or engine.backward(loss): (loss / k).backward()
          autograd finishes p.grad  ->  hook(p):
              the first hook of a backward queues end_backward on autograd's engine
              grad = p.grad; p.grad = None              # the full gradient is ours, then gone
                  (a GaLore matrix of an nn.Linear: p.grad is None, and grad is the factors (X, dY)
                   its layer's backward left, which the rule projects: projected_backward.py)
              found_inf |= grad is not finite           # on the device: no host read per hook
              micro-batch < k-1: rule.accumulate(p, grad, state)   # e.g. GaLore keeps P^T G only
                                                                   # (on the device, or in host RAM)
              micro-batch = k-1: rule.update(p, grad, state)       # the one update of the step; a
                                                                   # no-op on the device once found_inf
              (data parallel: rule.step_gradient -> bucketed async all-reduce -> rule.apply)
          end_backward (autograd runs it when the whole backward is done): the micro-batch counts;
          after the k-th: finish_step()
              one host read (found_inf, loss, grad norm); a bad step's buffers are dropped,
              else every rule's end_step (ReLoRA merges); the clock advances, a StepReport is kept

So a plain `loss.backward()` drives the engine (HF Trainer, accelerate and Lightning call
nothing else; they scale the loss by 1/k themselves, as with torch.optim), and `engine.backward`
is the convenience that scales, checks the loss and returns the report.

The engine owns time: the learning rate, weight decay and the step counter are evaluated once per
backward and handed to every hook in a StepContext, one per rule object (a parameter group with
its own lr_scale and weight_decay). Rules keep no clock of their own. With `as_optimizer()` the
learning rate of each group comes from the torch.optim face's param_groups instead, where
torch.optim.lr_scheduler (or HF's) schedulers set it.

`state_dict()` / `load_state_dict()` hold everything a run needs to continue bit for bit, in
memory and keyed by parameter name (checkpoint.py serialises it; HF Trainer torch.saves it).
"""
import functools
import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from . import engine_state
from .projected_backward import FactorSink, eligible_linears, install, uninstall

from .optim.schedule import ConstantSchedule
from .optim.int8_weights import weight_storage
from .rules.base import Rule, StepContext, local_part


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
                 offload_accumulation: bool = False, projected_backward: bool = True, reducer=None, shards=None):
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
        # data parallelism: averages each step gradient across ranks (distributed/reducer.py)
        self.reducer = reducer
        # sharded data parallelism: FSDP2 reduced the gradient already (distributed/fsdp.ShardGroup)
        self.shards = shards
        # GaLore matrices of nn.Linear layers get their gradient as factors (projected_backward.py)
        self.projected_backward = projected_backward and shards is None
        self._factors = FactorSink()
        self._factored_linears = {}
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("the model is wrapped in DistributedDataParallel, whose reducer reads gradients the "
                             "engine's hooks have already consumed (the replicas would silently diverge); pass the "
                             "bare model and a reducer (streamtrain.distributed) instead")
        self.states: dict[str, dict] = {}
        self.listeners = []     # objects with optional on_hook(engine, name, phase) / on_step_end(engine, report)
        self.step = 0           # logical steps completed
        self.micro_index = 0    # micro-batch within the current logical step
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.last_report = None   # the StepReport of the last finished logical step
        self.optimizer = None     # the torch.optim face, once as_optimizer() made it
        self._backwards = 0       # backward passes seen (a micro-batch clock that never resets)
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
        if self.projected_backward:
            self._factored_linears = eligible_linears(self.model, [
                n for n, p in self.params.items() if self.rules[n].projects_gradient and weight_storage(p) is None])
            install(self._factored_linears, self._factors)
        return self

    def detach(self) -> None:
        for handle in self._handles or []:
            handle.remove()
        self._handles = None
        uninstall(self._factored_linears)
        self._factored_linears = {}

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
        if grad is None:  # a projected-backward matrix: its gradient's factors (projected_backward.py)
            grad = self._factors.take(name)
            if grad is None:
                return
        if self.shards is not None:  # FSDP2: rules get this rank's shards as plain tensors
            param, grad = local_part(param), local_part(grad)
        if not self._in_backward:
            self._begin_backward()
        if name in self._seen_this_backward:
            raise RuntimeError(f"gradient hook for {name} fired twice in one backward "
                               "(reentrant checkpointing or a reused graph?)")
        self._seen_this_backward.add(name)
        rule, state = self.rules[name], self.states[name]
        ctx = self.contexts[id(rule)]
        self._touched.add(name)
        for listener in self._hook_listeners:
            listener(self, name, "before")
        if self._found_inf is None and self.skip_nonfinite:
            self._make_flag(grad.device)
        if not ctx.is_last:  # a NaN here must stop every update of the last micro-batch, even those before its own
            self._flag_nonfinite(grad.sum(dtype=torch.float32))
        # (in the last micro-batch the rule's apply checks the step gradient before it moves anything:
        # the norm it computes anyway; under data parallelism the averaged one, alike on every rank)
        if not ctx.is_last:
            rule.accumulate(param, grad, state, ctx)
        elif self.reducer is None:
            self._record_update(name, rule.update(param, grad, state, ctx))
        else:
            self.reducer.add(rule.step_gradient(param, grad, state, ctx),
                             functools.partial(self._apply_reduced, name, param, rule, state, ctx), param.numel())
        del grad
        for listener in self._hook_listeners:
            listener(self, name, "after")

    def _apply_reduced(self, name, param, rule, state, ctx, step_grad) -> None:
        """A step gradient averaged across ranks has landed: apply it (the rule checks it)."""
        self._record_update(name, rule.apply(param, step_grad, state, ctx))

    def _make_flag(self, device) -> None:
        """The step's device-side counters: the non-finite flag every context shares, the sum of
        squared gradient norms, and how many updates ran while the flag was set."""
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._masked_updates = torch.zeros((), dtype=torch.float32, device=device)
        self._grad_sq = torch.zeros((), dtype=torch.float32, device=device)
        for ctx in self.contexts.values():
            ctx.found_inf = self._found_inf

    def _flag_nonfinite(self, t: torch.Tensor) -> None:
        """found_inf |= `t` holds a NaN or Inf (a 0-d loss), on the device."""
        if not self.skip_nonfinite:
            return
        if self._found_inf is None:
            self._make_flag(t.device)
        bad = torch.isfinite(t.detach()).logical_not_().to(self._found_inf)
        torch.maximum(self._found_inf, bad, out=self._found_inf)

    def _record_update(self, name: str, grad_sq: torch.Tensor) -> None:
        if self._found_inf is None:  # no checks (the planner's engines): a plain sum
            self._grad_sq = self._grad_sq + grad_sq
        else:
            self._grad_sq.add_(grad_sq.to(self._grad_sq.dtype))
            # once set the flag stays set: the updates before it are the ones that moved
            self._masked_updates.add_(self._found_inf)
        self._updated.append(name)

    def _begin_backward(self) -> None:
        """The first hook of a backward pass: this micro-batch's contexts, and the callback that
        autograd runs once the whole backward is done (what DDP and FSDP use to end theirs)."""
        self._in_backward = True
        self._seen_this_backward = set()
        self.context = self._context()
        self.contexts = self._rule_contexts()
        for ctx in self.contexts.values():
            ctx.found_inf, ctx.collective = self._found_inf, self.reducer or self.shards
        if self.reducer is not None and self._found_inf is not None and self.micro_index == self.accumulate - 1:
            # ranks flag their own earlier micro-batches: agree before the last one updates anything
            self._found_inf.copy_(self.reducer.maximum(self._found_inf))
        self._hook_listeners = [getattr(x, "on_hook") for x in self.listeners if hasattr(x, "on_hook")]
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._in_backward = False
        self._factors.clear()
        if self.reducer is not None:  # the last bucket goes out; every reduced update lands
            self.reducer.flush()
        self._count_micro_batch()

    def _count_micro_batch(self) -> None:
        self.micro_index += 1
        self._backwards += 1
        if self.micro_index == self.accumulate:
            self.last_report = self.finish_step()

    # -- the step ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> StepReport | None:
        """Backward one micro-batch's mean loss, scaled by 1/accumulate here (a plain
        `loss.backward()` works too; then the caller scales). Returns the StepReport after the
        last micro-batch of a logical step, else None."""
        if self._handles is None:
            raise RuntimeError("call engine.attach() before engine.backward()")
        loss_value = loss.detach().float()
        self._loss_sum = self._loss_sum + loss_value
        self._losses += 1
        if self.reducer is None:  # (data parallel: a local NaN reaches every rank through the reduction)
            self._flag_nonfinite(loss_value)
        backwards, step = self._backwards, self.step
        (loss / self.accumulate).backward()
        if self._backwards == backwards:  # no hook fired (a gradient-free micro-batch)
            self._seen_this_backward = set()
            self._count_micro_batch()
        return self.last_report if self.step != step else None

    def finish_step(self) -> StepReport:
        """The logical step boundary: the owed updates, the one host read of the step, end_step of
        every rule (unless the step was bad), advance the clock."""
        ctx = self._context(micro_index=self.accumulate - 1)
        self._update_without_last_grad()
        found_inf, loss_sum, grad_sq = self._read_step()
        self._step_bad = found_inf > 0
        if self._step_bad:
            for state in self.states.values():
                discard_buffers(state)
            self._take_back_masked_updates()
        else:
            for rule in unique(self.rules.values()):
                rule.end_step(self)
        report = self._report(ctx, loss_sum, grad_sq)
        self.step += 1
        self._new_step()
        self._notify("on_step_end", report)
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteError(f"{self.nonfinite_in_row} steps in a row had a non-finite loss or "
                                 "gradient; lower the learning rate or enable clipping")
        return report

    def finish_partial_step(self) -> StepReport | None:
        """End the logical step after fewer than `accumulate` backwards (HF Trainer steps its
        optimizer after the last, shorter accumulation of an epoch): every parameter with buffered
        gradients is updated from what it has. None when no step is in flight."""
        if self.micro_index == 0:
            return None
        self._seen_this_backward = set()  # none of the buffered parameters got its update yet
        self.last_report = self.finish_step()
        return self.last_report

    def _update_without_last_grad(self) -> None:
        # a parameter that got gradients earlier in the step but none in the last micro-batch
        # still owes its update (its buffer must not leak into the next step); no-ops on the
        # device if the step turns out bad
        owed = self._touched - self._seen_this_backward
        if not owed:
            return
        contexts = self._rule_contexts(micro_index=self.accumulate - 1)
        for ctx in contexts.values():
            ctx.found_inf, ctx.collective = self._found_inf, self.shards  # (a shard's refresh needs its ranks)
        for name in sorted(owed, key=list(self.params).index):
            p, rule = local_part(self.params[name]), self.rules[name]
            with torch.no_grad():
                self._record_update(name, rule.update(p, torch.zeros_like(p), self.states[name], contexts[id(rule)]))

    def _read_step(self) -> tuple[float, float, float]:
        """(found_inf, loss sum, squared grad norm) on the host: the step's one synchronisation
        (under data parallelism the loss is averaged over ranks first, in the same read). NaN
        values and a clean flag on fake tensors (the planner)."""
        device = self._grad_sq.device if self._found_inf is None else self._found_inf.device
        flag = torch.zeros((), device=device) if self._found_inf is None else self._found_inf
        values = torch.stack([flag, self._loss_sum.to(device), self._grad_sq.to(device).float()])
        if self.reducer is not None:
            values[1] = self.reducer.mean(values[1], counted=False)
        elif self.shards is not None:  # each rank's norm covers its shards: summed; flags and losses agree
            values = self.shards.step_values(values)
        if is_fake(values):
            return 0.0, math.nan, math.nan
        return tuple(values.tolist())

    def _take_back_masked_updates(self) -> None:
        """A bad step's updates made after its non-finite value were no-ops on the device: their
        rules' update counts (Adam's bias correction) go back too."""
        if not self._updated:
            return
        moved = len(self._updated) - round(self._masked_updates.item())
        self._moved = self._updated[:moved]
        for name in self._updated[moved:]:
            if "step" in self.states[name]:
                self.states[name]["step"] -= 1

    def _report(self, ctx, loss_sum: float, grad_sq: float) -> StepReport:
        skipped = self._step_bad
        self.nonfinite_total += skipped
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
        # the mean loss of the micro-batches engine.backward saw (NaN with plain loss.backward())
        loss = loss_sum / self._losses if self._losses else math.nan
        grad_norm = math.nan if skipped else math.sqrt(grad_sq)
        partial = self._changed_anyway(ctx.step) if skipped else ()
        return StepReport(ctx.step, loss, ctx.lr, grad_norm, skipped, self.nonfinite_total, partial)

    def _changed_anyway(self, step: int) -> tuple:
        """The parameters a skipped step changed before its non-finite value was found: updated in
        the last micro-batch while the step still looked clean, or given a new subspace
        (refresh_step == step) in the first."""
        refreshed = [n for n, state in self.states.items() if state.get("refresh_step") == step]
        return tuple(sorted(set(self._moved) | set(refreshed)))

    # -- clock and context ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.schedule(step)

    def _group_hyperparameters(self, rule: Rule) -> tuple[float, float]:
        """(lr, weight decay) of a rule's parameters for the current step."""
        if self.optimizer is not None:  # a torch.optim face: its param_groups are the source
            group = self.optimizer.group_of(rule)
            return group["lr"], group["weight_decay"]
        decay = self.weight_decay if rule.weight_decay is None else rule.weight_decay
        return self.lr_at(self.step) * rule.lr_scale, decay

    def _context(self, micro_index=None, rule: Rule | None = None) -> StepContext:
        """The micro-batch's context; with `rule`, at that rule's learning rate and decay."""
        lr, decay = self.lr_at(self.step), self.weight_decay
        if rule is not None:
            lr, decay = self._group_hyperparameters(rule)
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
        self._found_inf = None    # the step's non-finite flag on the device, made by the first check
        self._touched = set()
        self._updated = []        # the last micro-batch's updates, in order
        self._masked_updates = None
        self._moved = []
        self._seen_this_backward = set()
        self._grad_sq = torch.zeros(())
        self._loss_sum = torch.zeros(())
        self._losses = 0
        self._in_backward = False
        self._hook_listeners = []
        self.context = self._context()
        self.contexts = self._rule_contexts()

    def _notify(self, event, *args) -> None:
        for listener in self.listeners:
            fn = getattr(listener, event, None)
            if fn is not None:
                fn(self, *args)

    # -- state and faces ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything this engine needs to continue bit for bit, in memory, keyed by parameter
        name: the clock, every rule's per-parameter state (tensors and storages by reference,
        python scalars), each rule's config, parameters and rule-level extra state. The model's
        weights are not in it (they are the model's: model.state_dict())."""
        if self.micro_index != 0:
            raise RuntimeError("the engine's state is taken at a step boundary, not in the middle of step "
                               f"{self.step} (micro-batch {self.micro_index} is in flight)")
        return {"step": self.step, "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                "rules": [{"config": engine_state.rule_config(rule), "parameters": names,
                           "extra": rule.state_extra(self)}
                          for rule, names in self.rule_groups()],
                "states": {name: {key: engine_state.export(value) for key, value in state.items()}
                           for name, state in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output: clock, rule-level state, the structure rules
        derive from the clock (ReLoRA's adapters), then every parameter's state, copied in place.
        Refuses (ValueError, one line) another method, rule setting or parameter set."""
        if self.micro_index != 0:
            raise RuntimeError("load the engine's state at a step boundary, not in the middle of a step")
        engine_state.check_rules(state["rules"], self.rule_groups())
        self.step, self.nonfinite_total, self.nonfinite_in_row = (
            state["step"], state["nonfinite_total"], state["nonfinite_in_row"])
        self._new_step()  # the per-step context is a function of the clock: rebuild it
        for (rule, _), saved in zip(self.rule_groups(), engine_state.in_order(state["rules"], self.rule_groups())):
            rule.load_state_extra(self, saved["extra"])
            rule.sync(self)
        engine_state.check_parameters(state, self.rule_groups(), set(self.states))
        for name, entries in state["states"].items():
            engine_state.load_into(name, self.states[name], entries)

    def as_optimizer(self) -> "torch.optim.Optimizer":
        """A torch.optim.Optimizer face for loops that call optimizer.step()/zero_grad() and drive
        the LR through param_groups (HF Trainer, accelerate, Lightning): step() and zero_grad()
        are no-ops (the updates happen in backward), param_groups hold one group per rule object
        whose 'lr' and 'weight_decay' the hooks read from then on, and state_dict() round-trips
        the engine."""
        from .optimizer import EngineOptimizer
        if self.optimizer is None:
            self.optimizer = EngineOptimizer(self)
        return self.optimizer

    # -- inspection ----------------------------------------------------------------------------
    def rule_names(self) -> dict[str, str]:
        return {n: r.name for n, r in self.rules.items()}

    def rule_groups(self) -> list[tuple]:
        """[(rule, [parameter names it governs])] in first-seen order, one entry per rule object."""
        grouped = {}
        for name, rule in self.rules.items():
            grouped.setdefault(id(rule), (rule, []))[1].append(name)
        return list(grouped.values())


def value_of(t: torch.Tensor) -> float:
    """A 0-d tensor as a float; NaN for fake tensors (the memory planner runs the engine on
    FakeTensorMode, where tensors have shapes but no values)."""
    return math.nan if is_fake(t) else float(t)


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
