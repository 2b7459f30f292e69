"""The rows of the table: every update path the benchmark can run, and each row's TrainConfig.

A row is the engine with one method/precision, or a peer optimizer (peers.py) driven through
the same Trainer loop. Rows this installation cannot run are left out with one line each.
"""
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..methods import METHODS
from . import peers
from .presets import Preset

BASELINE = "torch-adamw"


@dataclass(frozen=True)
class Row:
    name: str
    driver: str               # "engine", or a driver of peers.optimizer_recipe(): "torch", "fused-hooks", ...
    method: str = "adamw"
    states: str = "fp32"
    dtype: str = "float32"
    note: str = ""
    options: dict = field(default_factory=dict)  # further TrainConfig fields (svd, refresh_share, ...)
    env: dict = field(default_factory=dict)      # environment of its workers (STREAMTRAIN_UPDATE_BACKEND, ...)


REFERENCE = {"STREAMTRAIN_UPDATE_BACKEND": "reference"}


def engine_rows() -> list[Row]:
    """Every method and precision on the default update backend, and AdamW (fp32, 8-bit) on the
    reference one (torch.optim.AdamW's single-tensor ops, the 8-bit codec op by op)."""
    rows = [Row("engine-adamw", "engine"),
            Row("engine-adamw-reference", "engine", env=REFERENCE,
                note="streamtrain Engine, AdamW, fp32 states, STREAMTRAIN_UPDATE_BACKEND=reference"),
            Row("engine-adamw-bf16-states", "engine", states="bf16"),
            Row("engine-adamw-8bit", "engine", states="8bit"),
            Row("engine-adamw-8bit-reference", "engine", states="8bit", env=REFERENCE,
                note="streamtrain Engine, AdamW, 8-bit states, STREAMTRAIN_UPDATE_BACKEND=reference"),
            Row("engine-adamw-bf16-weights", "engine", dtype="bfloat16",
                note="streamtrain Engine, AdamW, fp32 states, bf16 weights with stochastic rounding"),
            Row("engine-galore", "engine", method="galore",
                note="streamtrain Engine, GaLore, fp32 states: randomized range finder, refreshes staggered "
                     "(--refresh-share 0.25)"),
            Row("engine-galore-full-gradient", "engine", method="galore", options=dict(projected_backward=False),
                note="streamtrain Engine, GaLore as engine-galore, but the m x n weight gradient computed in "
                     "backward and projected in the hook (--no-projected-backward)"),
            Row("engine-galore-exact-all", "engine", method="galore", options=dict(svd="exact", refresh_share=1.0),
                note="streamtrain Engine, GaLore, fp32 states: exact SVD, every matrix refreshing on the same "
                     "step (--svd exact --refresh-share 1.0, galore-torch's schedule)"),
            Row("engine-galore-8bit", "engine", method="galore", states="8bit")]
    return rows + [Row(f"engine-{m}", "engine", method=m) for m in METHODS if m not in ("adamw", "galore")]


def peer_rows() -> list[Row]:
    return [Row("bnb-adamw8bit", "bnb-8bit", states="8bit",
                note="bitsandbytes.optim.AdamW8bit, plain loop: backward, step, zero_grad"),
            Row("bnb-adamw8bit-hooks", "bnb-8bit-hooks", states="8bit",
                note="bitsandbytes.optim.AdamW8bit per parameter, stepped in post-accumulate-grad hooks"),
            Row("torchao-adamw8bit", "torchao-8bit", states="8bit",
                note="torchao.optim.AdamW8bit, plain loop (its step is torch.compile'd: the first step compiles)"),
            Row("galore-torch-per-layer", "galore-torch", method="galore",
                note="galore_torch.GaLoreAdamW, one per parameter, stepped in hooks (exact SVD, all matrices "
                     "refresh on the same step)"),
            Row("galore-torch-8bit-per-layer", "galore-torch-8bit", method="galore", states="8bit",
                note="GaLoreAdamW8bit + bnb Adam8bit per parameter (the authors' recipe)")]


def discover_rows(device: str = "cpu", names=()) -> tuple[list[Row], list[str]]:
    """Every row this installation can run on `device` (only those in `names`, when given), and
    one line for each it cannot."""
    rows = [Row(BASELINE, "torch", note="torch.optim.AdamW, plain loop: backward, step, zero_grad"),
            Row("torch-adamw-fused-hooks", "fused-hooks",
                note="torch.optim.AdamW(fused=True) per parameter, stepped in post-accumulate-grad hooks"),
            *engine_rows(), *peer_rows()]
    if names:
        rows = [r for r in rows if r.name in names]
    available, skipped = [], []
    for row in rows:
        reason = None if row.driver == "engine" else peers.missing(row.driver, device)
        if reason is None:
            available.append(row)
        else:
            skipped.append(f"{row.name}: {reason}")
    return available, skipped


def describe(row: dict) -> str:
    dtype = "bf16 weights" if row["dtype"] == "bfloat16" else "fp32 weights"
    return f"streamtrain Engine, method {row['method']}, {row['states']} states, {dtype}"


def train_config(row: Row, preset: Preset, device: str, steps: int, out: str) -> TrainConfig:
    values = dict(model=preset.model, model_overrides=dict(preset.model_overrides), data="builtin",
                  max_data_bytes=preset.max_data_bytes, steps=steps, batch_size=preset.batch_size,
                  seq_len=preset.seq_len, method=row.method, lr=preset.lr, rank=preset.rank,
                  galore_gap=preset.gap, states=row.states, dtype=row.dtype, device=device, seed=0,
                  activation_checkpointing=preset.activation_checkpointing, out=out, eval_every=0,
                  eval_batches=preset.eval_batches, progress=False, save_every=0, **row.options)
    if row.driver != "engine":  # Trainer builds an engine that BenchTrainer then drops: any method does
        values.update(method="adamw", states="fp32")
    return TrainConfig(**values)
