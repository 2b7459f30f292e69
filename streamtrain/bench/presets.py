"""The benchmark's presets: one workload per preset (model, data, steps), as plain data.

`quick` is a smoke check of every row (about a minute on 2 cores), `full` the published CPU
table (profiles/bench-cpu.md), `gpu` the rows a GPU lease has time for (profiles/gpu-check.sh).
Only `full` runs the data-parallel section (2 ranks under torchrun: about 30 s more even on the
quick model, mostly process start-ups); `--parallel-ranks 2` adds it to any preset.
The GaLore gap is shorter than the timed window in every preset, so GaLore rows time subspace
refreshes and the table's worst/median column shows their spikes.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    model: str
    model_overrides: dict
    steps: int
    batch_size: int
    seq_len: int
    warmup_skip: int          # first steps left out of the step-time median (compilation, caches, first subspaces)
    tracked_steps: int        # steps of the memory run (Trainer's profiler tracks the first 2)
    rank: int
    gap: int                  # GaLore refresh gap: shorter than the timed window, so refreshes are timed
    activation_checkpointing: bool = False
    threads: int = 1          # torch intra-op threads per worker (0: torch's default); one thread keeps
                              # timings steady when other work shares the machine and makes CPU time exact
    repeats: int = 1          # timing rounds over all rows
    lr: float = 2e-3
    eval_batches: int = 8
    max_data_bytes: int = 4_000_000
    svd_shape: tuple = (4096, 11008)
    svd_rank: int = 1024
    memory_runs: bool = True  # a separate tracked run per row (peak tensors, RSS); off: the timed run's CUDA peaks only
    one_process: bool = False  # memory and timed run of a row in one worker (quicker, timings a little less clean)
    jobs: int = 1             # rows measured at once (more than 1 only for smoke checks: they share the cores)
    fresh_compile_cache: bool = False  # an empty inductor cache per benchmark: torchao's first step is a true cold start
    rows: tuple = ()          # row names to run (empty: every row this installation can run)
    hooks: dict = field(default_factory=dict)  # the hook-overhead section's sizes (see hooks.py); empty: left out
    quality: dict = field(default_factory=dict)  # the low-bit quality section's run (see quality.py); empty: left out
    parallel_ranks: int = 0   # the data-parallel section's ranks (parallel.py); 0: left out


QUICK_HOOKS = dict(layers=200, width=16, batch=4, steps=10, rounds=3, warmup=3)
FULL_HOOKS = dict(layers=200, width=16, batch=4, steps=20, rounds=6, warmup=5)
# bf16 vs INT8 weights vs INT8 + INT4 projectors: quick is a smoke check; full trains byte-small
# far enough (val loss 5.5 -> about 2.5, six subspace refreshes) that the rows' differences are the rounding's, not noise
QUICK_QUALITY = dict(model="byte-tiny", steps=4, batch_size=4, seq_len=64, rank=16, gap=2, lr=2e-3,
                     eval_batches=2, max_data_bytes=1_000_000)
FULL_QUALITY = dict(model="byte-small", steps=150, batch_size=8, seq_len=128, rank=64, gap=25, lr=2e-3,
                    eval_batches=8, max_data_bytes=2_000_000)

PRESETS = {
    "quick": Preset("byte-tiny", {}, steps=8, batch_size=8, seq_len=128, warmup_skip=3, tracked_steps=2,
                    rank=32, gap=3, eval_batches=2, max_data_bytes=1_000_000, svd_shape=(1024, 2752),
                    svd_rank=256, one_process=True, jobs=2, hooks=QUICK_HOOKS, quality=QUICK_QUALITY),
    # the published numbers: a 10.8M-parameter model with activation checkpointing, so weights,
    # gradients and optimizer states rather than activations set the peak (as they do at 7B)
    "full": Preset("byte-small", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=6),
                   steps=30, batch_size=4, seq_len=128, warmup_skip=4, tracked_steps=2, rank=96, gap=10,
                   activation_checkpointing=True, repeats=2, fresh_compile_cache=True, hooks=FULL_HOOKS,
                   quality=FULL_QUALITY, parallel_ranks=2),
    # one GPU lease: an 85M-parameter model, the rows the issue compares on CUDA, no separate memory runs
    # (the timed run reads the allocator's peaks), refreshes inside the window
    "gpu": Preset("byte-small", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                     num_attention_heads=12),
                  steps=20, batch_size=8, seq_len=512, warmup_skip=5, tracked_steps=2, rank=128, gap=8,
                  threads=0, memory_runs=False, eval_batches=2, max_data_bytes=2_000_000,
                  rows=("torch-adamw", "torch-adamw-fused-hooks", "engine-adamw", "engine-adamw-8bit",
                        "engine-galore", "engine-galore-full-gradient", "engine-galore-exact-all",
                        "galore-torch-per-layer",
                        "torchao-adamw8bit", "bnb-adamw8bit"),
                  hooks=dict(QUICK_HOOKS, steps=20)),
}
