"""The engine's torch.optim face: what loops written for torch.optim need from an optimizer.

HF Trainer, accelerate and Lightning call `loss.backward()`, then `optimizer.step()` and
`optimizer.zero_grad()`, drive the learning rate by writing `param_groups[i]['lr']` (through a
torch.optim.lr_scheduler), and save `optimizer.state_dict()`. With the engine the update already
happened inside backward, so:

- step() and zero_grad() do nothing (the gradients are already gone), except that step() ends a
  logical step cut short by the loop (fewer backwards than the engine accumulates); step() runs
  a closure if given, as torch.optim does.
- param_groups has one group per rule object (a parameter group of the engine: GaLore matrices,
  decayed full-rank weights, undecayed norms/biases/embeddings, ...). Its 'lr' and
  'weight_decay' are what the hooks use from the next backward on; they start at the engine's
  schedule value times the rule's lr_scale, and the rule's (or engine's) decay.
- state_dict() / load_state_dict() round-trip the engine (Engine.state_dict) and the groups'
  hyperparameters, so HF Trainer's checkpoints resume the engine exactly.
"""
import torch


class EngineOptimizer(torch.optim.Optimizer):
    def __init__(self, engine):
        self.engine = engine
        self._rules = [rule for rule, _ in engine.rule_groups()]
        groups = []
        for rule, names in engine.rule_groups():
            decay = engine.weight_decay if rule.weight_decay is None else rule.weight_decay
            groups.append({"params": [engine.params[n] for n in names], "rule": rule.name,
                           "lr": engine.lr_at(engine.step) * rule.lr_scale, "weight_decay": decay})
        super().__init__(groups, defaults={})

    def group_of(self, rule) -> dict:
        return self.param_groups[next(i for i, r in enumerate(self._rules) if r is rule)]

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing to do: every parameter was updated by its hook during backward. After fewer
        backwards than the engine accumulates (a loop's shorter last accumulation), it ends that
        logical step with what was accumulated."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.finish_partial_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """A no-op: the hooks already set every gradient to None."""

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(),
                "param_groups": [{"rule": g["rule"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                  **{k: v for k, v in g.items() if k == "initial_lr"}} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        if [g["rule"] for g in saved] != [g["rule"] for g in self.param_groups]:
            raise ValueError(f"the saved optimizer has groups {[g['rule'] for g in saved]}, this engine "
                             f"{[g['rule'] for g in self.param_groups]}; build the engine with the same rules")
        self.engine.load_state_dict(state_dict["engine"])
        for group, values in zip(self.param_groups, saved):
            group.update({k: v for k, v in values.items() if k != "rule"})
