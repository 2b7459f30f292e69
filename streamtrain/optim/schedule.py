"""Learning-rate schedules as pure functions of the logical step.

The engine evaluates one schedule once per logical step; rules never keep a clock of their own.
"""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine down to `lr * min_ratio`
    at `total` steps (held there after)."""
    lr: float
    total: int
    warmup: int = 0
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * cosine)


@dataclass(frozen=True)
class RescheduledCosine:
    """`base` until step `start`; from there a cosine from base(start) down to `floor` at step
    `total` (held after): a run whose length changed when it was resumed (--reschedule) continues
    from the learning rate it had, without a jump."""
    base: object
    start: int
    total: int
    floor: float

    def __call__(self, step: int) -> float:
        if step < self.start:
            return self.base(step)
        top = self.base(self.start)
        progress = min(1.0, (step - self.start) / max(1, self.total - self.start))
        return self.floor + (top - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ConstantSchedule:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class JaggedCosineSchedule:
    """ReLoRA's schedule: the cosine envelope, multiplied after every restart by a short linear
    re-warmup, so the LR drops to ~0 at each restart and climbs back to the envelope."""
    envelope: CosineSchedule
    first_restart: int
    cycle: int
    restart_warmup: int

    def __call__(self, step: int) -> float:
        base = self.envelope(step)
        if step < self.first_restart or self.restart_warmup <= 0:
            return base
        since_restart = (step - self.first_restart) % self.cycle
        if since_restart < self.restart_warmup:
            return base * since_restart / self.restart_warmup
        return base
