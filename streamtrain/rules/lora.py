"""LoRA needs no rule of its own; ReLoRA (Lialin et al., 2023) is a rule that adds restarts.

LoRA. The adapters (`...lora_A`, `...lora_B`, see streamtrain/models/lora.py) are ordinary
trainable parameters: the engine's hooks update them with any rule (AdamW at any state precision)
and the frozen base weights get no gradient, no hook and no state.

ReLoRA. The `ReLoRA` rule is assigned to the attention and MLP matrices (methods.assign_rules).
Per parameter it does what its inner rule (AdamW) does; its `end_step`, called by the engine once
per logical step after every hook, drives the method:

  steps [0, warm_start_steps)   full-rank warm start: the matrices train with the inner rule.
  end of step warm_start-1      wrap: every matrix this rule governs becomes a LoRALinear, frozen;
                                the engine is rebuilt, so the matrices' full-size Adam states are
                                dropped and the adapters get fresh ones (same rule).
  every `cycle` steps after     restart: W += scale * B @ A (fp32, then cast), fresh adapters
                                (B @ A == 0, never both zero: init "split" or "standard"), and
                                the adapters' optimizer moments pruned to `keep_fraction` of their
                                entries (by magnitude, or at random).

Embeddings, norms and lm_head keep their own full-rank rule throughout. The LR follows
`ReLoRA.schedule(envelope)`: a jagged cosine that is 0 at each restart step (and at the wrap) and
climbs back to the envelope over `restart_warmup` steps.

Everything is a function of the engine's clock: restart k happens at the end of logical step
warm_start_steps + k * cycle - 1, so a resumed run needs only `sync(engine)` (re-wrap) before its
weights and states are loaded. If that one step is skipped for a non-finite value, its end_step
does not run and that merge is skipped (the next cycle's merge folds the adapters as usual).
"""
import re

import torch

from ..models.lora import apply_lora, check_lora_settings, is_adapter_name, lora_modules
from ..optim.schedule import CosineSchedule, JaggedCosineSchedule
from .adamw import AdamW
from .base import Rule

PRUNE_MODES = ("magnitude", "random")


class ReLoRA(Rule):
    name = "relora"

    def __init__(self, rank: int = 128, alpha: float = 32.0, warm_start_steps: int = 1000,
                 cycle: int = 2000, restart_warmup: int = 100, keep_fraction: float = 0.1,
                 prune: str = "magnitude", dropout: float = 0.0, rslora: bool = False,
                 init: str = "split", seed: int = 0, inner: Rule | None = None):
        check_lora_settings(rank, alpha, dropout, init)
        if warm_start_steps < 0:
            raise ValueError(f"ReLoRA warm_start_steps must be >= 0, got {warm_start_steps}")
        if cycle < 1:
            raise ValueError(f"ReLoRA cycle must be >= 1 step, got {cycle}")
        if not 0 <= restart_warmup <= cycle:
            raise ValueError(f"ReLoRA restart_warmup must be in [0, cycle={cycle}], got {restart_warmup}")
        if not 0 <= keep_fraction <= 1:
            raise ValueError(f"ReLoRA keep_fraction must be in [0, 1], got {keep_fraction}")
        if prune not in PRUNE_MODES:
            raise ValueError(f"unknown ReLoRA prune mode {prune!r}; choose one of {PRUNE_MODES}")
        self.rank, self.alpha, self.dropout, self.rslora, self.init = rank, alpha, dropout, rslora, init
        self.warm_start_steps, self.cycle, self.restart_warmup = warm_start_steps, cycle, restart_warmup
        self.keep_fraction, self.prune, self.seed = keep_fraction, prune, seed
        self.inner = inner or AdamW()

    # -- per parameter: the inner rule's work ---------------------------------------------------
    def init_state(self, name, param):
        return self.inner.init_state(name, param)

    def accumulate(self, param, grad, state, ctx):
        self.inner.accumulate(param, grad, state, ctx)

    def update(self, param, grad, state, ctx):
        return self.inner.update(param, grad, state, ctx)

    def step_gradient(self, param, grad, state, ctx):
        return self.inner.step_gradient(param, grad, state, ctx)

    def apply(self, param, step_grad, state, ctx):
        return self.inner.apply(param, step_grad, state, ctx)

    # -- the clock --------------------------------------------------------------------------------
    def schedule(self, envelope: CosineSchedule) -> JaggedCosineSchedule:
        """The LR schedule to give the Engine: `envelope`, restarted at the wrap and every cycle."""
        return JaggedCosineSchedule(envelope, first_restart=self.warm_start_steps, cycle=self.cycle,
                                    restart_warmup=self.restart_warmup)

    def is_restart_boundary(self, steps_done: int) -> bool:
        since = steps_done - self.warm_start_steps
        return since > 0 and since % self.cycle == 0

    def end_step(self, engine) -> None:
        steps_done = engine.step + 1     # the engine advances its clock after end_step
        if not self.is_wrapped(engine):
            if steps_done >= self.warm_start_steps:
                self.wrap(engine)
        elif self.is_restart_boundary(steps_done):
            self.restart(engine, steps_done)

    def sync(self, engine) -> None:
        """Bring the model in line with the engine's clock: wraps before the first step when
        warm_start_steps == 0, or after a resume past the warm start (before loading weights)."""
        if engine.step >= self.warm_start_steps and not self.is_wrapped(engine):
            self.wrap(engine)

    # -- structure changes, at the step boundary only --------------------------------------------
    def governed(self, engine) -> list[str]:
        return [n for n, rule in engine.rules.items() if rule is self]

    def is_wrapped(self, engine) -> bool:
        return any(is_adapter_name(n) for n in self.governed(engine))

    def wrap(self, engine) -> list[str]:
        """Replace every matrix this rule governs by a frozen LoRALinear and rebuild the engine so
        the adapters (governed by this rule) get states and hooks. Returns the wrapped paths."""
        matrices = [n for n in self.governed(engine) if n.endswith(".weight")]
        paths = [n[: -len(".weight")] for n in matrices]
        apply_lora(engine.model, [re.escape(p) for p in paths], self.rank, self.alpha, self.dropout,
                   self.rslora, self.init, seed=self.seed, freeze_others=False)
        engine.rebuild({f"{p}.{adapter}": self for p in paths for adapter in ("lora_A", "lora_B")})
        return paths

    @torch.no_grad()
    def restart(self, engine, steps_done: int) -> None:
        """Merge, re-initialise and prune every adapter this rule governs."""
        generator = torch.Generator().manual_seed(self.seed + steps_done)
        governed = set(self.governed(engine))
        for path, module in lora_modules(engine.model):
            names = [f"{path}.lora_A", f"{path}.lora_B"]
            if names[0] not in governed:
                continue
            module.fold_and_reset(generator)
            for name in names:
                prune_moments(engine.states[name], self.keep_fraction, self.prune, generator)

    def config(self):
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "rslora": self.rslora, "init": self.init, "warm_start_steps": self.warm_start_steps,
                "cycle": self.cycle, "restart_warmup": self.restart_warmup,
                "keep_fraction": self.keep_fraction, "prune": self.prune, "seed": self.seed,
                "inner": self.inner.config()}


# -- optimizer-state pruning ------------------------------------------------------------------------
def keep_mask(values: torch.Tensor, keep_fraction: float, mode: str = "magnitude",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask selecting exactly round(keep_fraction * numel) entries of `values`: the
    largest by |value| ("magnitude") or a uniform random subset ("random")."""
    numel = values.numel()
    keep = round(keep_fraction * numel)
    if mode == "magnitude":
        index = values.abs().flatten().topk(keep).indices
    elif mode == "random":
        index = torch.randperm(numel, generator=generator)[:keep].to(values.device)
    else:
        raise ValueError(f"unknown prune mode {mode!r}; choose one of {PRUNE_MODES}")
    mask = torch.zeros(numel, dtype=torch.bool, device=values.device)
    mask[index] = True
    return mask.view(values.shape)


def prune_moments(state: dict, keep_fraction: float, mode: str = "magnitude",
                  generator: torch.Generator | None = None) -> None:
    """Zero all but `keep_fraction` of every optimizer-state storage in `state` (each moment
    separately). Goes through read() -> modify -> write(), so 8-bit and bf16 storages work."""
    for value in state.values():
        if hasattr(value, "read") and hasattr(value, "write"):
            moment = value.read()
            moment.mul_(keep_mask(moment, keep_fraction, mode, generator))
            value.write(moment)
