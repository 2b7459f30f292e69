"""Quality of low-bit weights and projectors (issue 17): the same GaLore run three ways.

    bf16-weights                    --dtype bfloat16 (stochastic rounding): the reference
    int8-weights                    --dtype int8: block linears as INT8 codes + a scale per group
    int8-weights-int4-projectors    and GaLore's bases as INT4 codes + scales (Q-GaLore's setting)

Every row trains the same preset, data, seed, steps and tokens through Trainer, one after another
in one worker process, and reports its validation loss before and after and the ratio to the
bf16 row (goal: within 2%). The rows differ only in storage, so the comparison measures what the
rounding costs; refreshes fall inside the run (the gap is shorter than the steps), so the INT4
bases are used and replaced several times. Quality is the point here, not speed: the rows' times
are given only to show the cost of dequantizing on the fly (on CPU, unfused).
"""
import tempfile
import time

from ..config import TrainConfig
from ..train import Trainer

ROWS = {"bf16-weights": {"dtype": "bfloat16"},
        "int8-weights": {"dtype": "int8"},
        "int8-weights-int4-projectors": {"dtype": "int8", "projector_precision": "int4"}}
BASE_ROW = "bf16-weights"
GOAL = 1.02  # validation loss at most 2% above the bf16 row's


def quality_config(settings: dict, changes: dict, device: str, out: str) -> TrainConfig:
    """A GaLore run of the section's `settings` (model, steps, batch_size, seq_len, rank, gap,
    lr, eval_batches, max_data_bytes) with one row's storage `changes`."""
    s = dict(settings)
    return TrainConfig(model=s.pop("model"), galore_gap=s.pop("gap"), method="galore", data="builtin", seed=0,
                       device=device, out=out, eval_every=0, progress=False, save_every=0, **s, **changes)


def quality_comparison(settings: dict, device: str = "cpu") -> dict:
    """Train every row; {'settings', 'rows': {name: val losses, seconds, ratio to bf16}, 'goal'}."""
    rows = {}
    for name, changes in ROWS.items():
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            summary = Trainer(quality_config(settings, changes, device, out)).run()
        rows[name] = {"flags": changes, "initial_val_loss": summary["initial_val_loss"],
                      "val_loss": summary["val_loss"], "seconds": time.perf_counter() - started}
    base = rows[BASE_ROW]["val_loss"]
    for row in rows.values():
        row["vs_bf16"] = row["val_loss"] / base
    return {"settings": dict(settings), "rows": rows, "goal": GOAL}


def quality_lines(quality: dict | None) -> list[str]:
    """The report's section: the settings, one table row per storage, the goal's verdict."""
    if not quality:
        return ["not run (--no-quality, or the preset has no quality section)"]
    if "error" in quality:
        return [f"failed: {quality['error']}"]
    s = quality["settings"]
    lines = [f"GaLore rank {s['rank']} (gap {s['gap']}) on `{s['model']}`, built-in corpus, seed 0: {s['steps']} steps "
             f"x {s['batch_size']} x {s['seq_len']} tokens per row, lr {s['lr']}; validation loss on "
             f"{s['eval_batches']} held-out batches.", "",
             "| row | flags | val loss at start | val loss at end | vs bf16 | seconds |", "|---|---|---|---|---|---|"]
    for name, r in quality["rows"].items():
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["flags"].items())
        lines.append(f"| {name} | `{flags}` | {r['initial_val_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['vs_bf16']:.4f}x | {r['seconds']:.0f} |")
    worst = max(r["vs_bf16"] for r in quality["rows"].values())
    verdict = "met" if worst <= quality["goal"] else "NOT met"
    return lines + ["", f"Goal: validation loss within {quality['goal'] - 1:.0%} of bf16 weights: {verdict} "
                        f"(worst {worst:.4f}x)."]
