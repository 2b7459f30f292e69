"""What a run tells its user while it runs: the plan at the start, then each step.

- At the start, a few lines: the plan's verdict (fits / needs / budget) and its largest categories.
- Each step goes to a progress bar when stderr is a terminal, and otherwise (stderr redirected to
  a log file, or `--no-progress`) to a plain log line every `--log-every` steps: tqdm's `\\r`
  updates in a file make one line of megabytes.
- With `--tensorboard` (the `tensorboard` extra), every step's loss, learning rate, gradient norm,
  tokens/s and memory, and each validation loss, go to event files in `<out>/tensorboard`. A
  resumed run purges the events after its checkpoint's step, as metrics.jsonl is trimmed.

metrics.jsonl (written by the Trainer) stays the record; this module only shows it.
"""
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from .memory.units import format_bytes

TENSORBOARD_FOLDER = "tensorboard"
LARGEST_CATEGORIES = 3


def short_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def plan_lines(plan: dict | None, config) -> list[str]:
    """The plan in two lines: verdict and total, then the largest categories at the peak."""
    if plan is None:
        return ["plan: none (the planner could not simulate this configuration; without --budget it trains anyway)"]
    where = f"on {plan['target']}"
    if plan["budget"] is None:
        verdict = f"plan: needs {format_bytes(plan['total'])} {where} (no --budget)"
    else:
        verdict = (f"plan: fits --budget {config.budget} {where}: needs {format_bytes(plan['total'])} "
                   f"({plan['total'] / plan['budget']:.0%} of {format_bytes(plan['budget'])})")
    if plan.get("host_bytes"):
        verdict += f", plus {format_bytes(plan['host_bytes'])} of host RAM"
    largest = sorted(plan["categories"], key=lambda line: -line["bytes"])[:LARGEST_CATEGORIES]
    peak = plan["peak"]
    return [verdict, f"plan: at the peak ({peak['phase']}, step {peak['step']}): "
            + ", ".join(f"{line['label']} {short_bytes(line['bytes'])}" for line in largest)]


def log_line(record: dict, steps: int, elapsed: float) -> str:
    """One step's record as one line: 'step 10/200 | loss 3.1234 | lr 2.00e-03 | ...'."""
    parts = [f"step {record['step'] + 1}/{steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"grad norm {record['grad_norm']:.3f}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    if record.get("skipped"):
        parts.append(f"skipped (non-finite, {record['nonfinite_total']} so far)")
    minutes, seconds = divmod(int(elapsed), 60)
    parts.append(f"{minutes}:{seconds:02d} elapsed")
    return " | ".join(parts)


class Logbook:
    """The progress bar or the log lines, and the optional TensorBoard writer, of one run."""

    def __init__(self, config, out: Path, start_step: int, profiler=None):
        self.steps, self.every, self.profiler = config.steps, config.log_every, profiler
        self.started = time.monotonic()
        self.bar = None
        if config.progress and sys.stderr.isatty():
            self.bar = tqdm(total=config.steps, initial=start_step, desc="train", unit="step", file=sys.stderr)
        self.writer = tensorboard_writer(Path(out) / TENSORBOARD_FOLDER, start_step) if config.tensorboard else None

    def step(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            self.bar.update(1)
        elif self.due(record):
            print(log_line(record, self.steps, time.monotonic() - self.started), flush=True)
        if self.writer is not None:
            self.write_scalars(record)

    def due(self, record: dict) -> bool:
        done = record["step"] + 1
        return done % self.every == 0 or done == self.steps or "val_loss" in record

    def write_scalars(self, record: dict) -> None:
        step = record["step"]
        for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                         ("train/tokens_per_s", "tokens_per_s"), ("val/loss", "val_loss")):
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        for tag, value in memory_scalars(self.profiler).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def memory_scalars(profiler) -> dict:
    """Bytes after a step: the process's resident memory, and on CUDA the allocator's peaks."""
    scalars = {"memory/process_rss_bytes": psutil.Process().memory_info().rss}
    cuda_steps = getattr(profiler, "cuda_steps", None)
    if cuda_steps:
        scalars["memory/cuda_allocated_peak_bytes"] = cuda_steps[-1]["allocated_peak"]
        scalars["memory/cuda_reserved_peak_bytes"] = cuda_steps[-1]["reserved_peak"]
    return scalars


def tensorboard_writer(folder: Path, start_step: int):
    """A SummaryWriter on `folder`; a resumed run purges the events from its start step on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # config validation checks this first; here only for library callers
        raise ValueError("--tensorboard needs the 'tensorboard' package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(folder), purge_step=start_step or None)
