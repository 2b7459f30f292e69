"""The table's key comparisons: pairs of rows as ratios, each against the issue's goal if it has one.

Goals (the performance issue): engine AdamW at most 1.0x torch's fused AdamW stepped in hooks;
engine GaLore at most 0.9x galore-torch per layer; engine 8-bit AdamW at most 1.0x bitsandbytes'
AdamW8bit and at most 1.3x the engine's own fp32 states. A goal is judged on the median step time
and, on CPU, on the CPU time too (steadier when other work shares the machine). The mean step time
is shown beside it: the median leaves out a peer's refresh stall when it falls on few steps, the
mean (total time over the window) charges every row for its refreshes.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    row: str
    other: str
    goal: float | None = None   # the ratio row / other must not exceed
    what: str = ""


COMPARISONS = (
    Comparison("engine-adamw", "torch-adamw"),
    Comparison("engine-adamw", "torch-adamw-fused-hooks", 1.0),
    Comparison("engine-adamw", "engine-adamw-reference", what="default update backend vs reference"),
    Comparison("engine-galore", "galore-torch-per-layer", 0.9),
    Comparison("engine-galore", "engine-galore-exact-all", what="staggered randomized refreshes vs exact, all at once"),
    Comparison("engine-galore", "engine-galore-full-gradient", what="projected backward vs the m x n gradient"),
    Comparison("engine-adamw-8bit", "bnb-adamw8bit", 1.0),
    Comparison("engine-adamw-8bit", "bnb-adamw8bit-hooks"),
    Comparison("engine-adamw-8bit", "torchao-adamw8bit"),
    Comparison("engine-adamw-8bit", "engine-adamw", 1.3),
    Comparison("engine-adamw-8bit", "engine-adamw-8bit-reference", what="default update backend vs reference"),
    Comparison("engine-galore-8bit", "galore-torch-8bit-per-layer"),
)


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def key_comparisons(rows: dict, device: str, skipped=()) -> list[str]:
    """One line per comparison whose rows were both asked for (run, or in `skipped`: names of
    rows this installation cannot run)."""
    lines = []
    for c in COMPARISONS:
        if not {c.row, c.other} <= set(rows) | set(skipped):
            continue
        a, b = rows.get(c.row, {}), rows.get(c.other, {})
        title = f"- {c.row} vs {c.other}" + (f" ({c.what})" if c.what else "")
        if "median_step_s" not in a or "median_step_s" not in b:
            lines.append(f"{title}: not measured (a row was skipped or failed, see below)")
            continue
        worst = worst_key(device)
        parts = [f"step time {ratio(a['median_step_s'], b['median_step_s'])}"
                 + ("" if device == "cuda" else f" (CPU time {ratio(a['median_step_cpu_s'], b['median_step_cpu_s'])})"),
                 f"mean step {ratio(a.get('mean_step_s'), b.get('mean_step_s'))} (the window's refreshes included)",
                 f"worst/median {two_places(a.get(worst))} vs {two_places(b.get(worst))}"]
        if c.goal is not None:
            parts.append(verdict(a, b, c.goal, device))
        for key, label in (("peak_tensor_bytes", "peak tensors"), ("rss_peak_bytes", "peak RSS"),
                           ("cuda_allocated_peak_bytes", "CUDA allocated")):
            if a.get(key) and b.get(key):
                parts.append(f"{label} {ratio(a[key], b[key])}")
        if a.get("val_loss") is not None and b.get("val_loss") is not None:
            parts.append(f"val loss {a['val_loss']:.4f} vs {b['val_loss']:.4f}")
        lines.append(f"{title}: " + ", ".join(parts))
    return lines


def two_places(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def worst_key(device: str) -> str:
    """The worst/median figure a table shows: wall time on CUDA (CPU time says little about
    asynchronous GPU work), CPU time on CPU (one thread per worker: the wall clock's worst step
    is often another process's)."""
    return "worst_over_median" if device == "cuda" else "worst_over_median_cpu"


def verdict(a: dict, b: dict, goal: float, device: str) -> str:
    """'goal <= 1.00x: met' on step time (and CPU time on CPU)."""
    judged = [("step time", "median_step_s")] + ([] if device == "cuda" else [("CPU time", "median_step_cpu_s")])
    results = [f"{label} {'met' if a[key] / b[key] <= goal else 'NOT met'}" for label, key in judged]
    return f"**goal <= {goal:.2f}x: {', '.join(results)}**"


def goal_results(rows: dict) -> list[dict]:
    """Every goal with its measured step-time ratios, for the JSON report."""
    out = []
    for c in COMPARISONS:
        a, b = rows.get(c.row, {}), rows.get(c.other, {})
        if c.goal is None or "median_step_s" not in a or "median_step_s" not in b:
            continue
        out.append({"row": c.row, "other": c.other, "goal": c.goal,
                    "step_time_ratio": a["median_step_s"] / b["median_step_s"],
                    "cpu_time_ratio": a["median_step_cpu_s"] / b["median_step_cpu_s"]})
    return out
