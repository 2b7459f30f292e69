"""Update rules: one per file. A rule owns per-parameter state (plain tensors in a dict) and two
operations the engine's hook calls: `accumulate` (fold a micro-batch gradient) and `update`
(fold the last one and apply the step)."""
from .base import Rule, StepContext
from .adamw import AdamW
from .galore import GaLore

__all__ = ["Rule", "StepContext", "AdamW", "GaLore"]
