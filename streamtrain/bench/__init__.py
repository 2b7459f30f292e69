"""`python -m streamtrain.bench`: speed, memory and quality of every update path, side by side.

Each configuration (a row: the engine with one method and precision, or a peer optimizer such as
torch's fused AdamW in hooks, galore-torch, bitsandbytes' or torchao's AdamW8bit) trains the same
preset, data, seed and token budget through Trainer's own loop, in fresh processes of its own so
that its peaks are its own. The report gives every row as ratios to a base row, the issue's key
comparisons against their goals, the hook overhead alone on a model of tiny matmuls, and the
randomized vs exact SVD pair.

    python -m streamtrain.bench                   # quick preset: a smoke check of every row
    python -m streamtrain.bench --preset full     # the published table (profiles/bench-cpu.md)
    python -m streamtrain.bench --preset gpu      # the rows a GPU lease runs (profiles/gpu-check.sh)

One concept per module: presets (workloads), rows (what runs), peers (the other optimizers),
torch_optimizers (peers behind the engine's interface), trainer (the clocked Trainer), measure
(one worker's runs), hooks (hook overhead), parallel (data-parallel bytes and step time), svd, runner
(the parent), comparisons and report (Markdown), quality (bf16 vs INT8 weights vs INT8 + INT4
projectors), cli, recipe_check (the 7B memory check of profiles/gpu-check.sh).
"""
from .comparisons import COMPARISONS, key_comparisons
from .hooks import hook_overhead
from .measure import both_runs, memory_run, timed_run
from .parallel import data_parallel, parallel_lines
from .peers import optimizer_recipe
from .presets import PRESETS, Preset
from .quality import quality_comparison
from .report import to_markdown
from .rows import BASELINE, Row, discover_rows, train_config
from .runner import benchmark, machine_description, run_in_worker, schedule
from .svd import run_svd_comparison
from .torch_optimizers import TorchOptimizers
from .trainer import BenchTrainer, StepClock

__all__ = ["BASELINE", "COMPARISONS", "BenchTrainer", "PRESETS", "Preset", "Row", "StepClock", "TorchOptimizers",
           "benchmark", "both_runs", "data_parallel", "discover_rows", "hook_overhead", "key_comparisons",
           "machine_description", "memory_run", "optimizer_recipe", "parallel_lines", "quality_comparison",
           "run_in_worker", "run_svd_comparison", "schedule", "timed_run", "to_markdown", "train_config"]
