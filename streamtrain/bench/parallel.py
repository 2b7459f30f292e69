"""The data-parallel section: bytes all-reduced per step and step time, full-rank vs GaLore-projected.

Each configuration trains the preset's model through Trainer's torchrun path: `world` ranks
launched by `python -m torch.distributed.run --standalone` (gloo on CPU, nccl on CUDA; the
engine all-reduces inside its hooks, no DDP), each rank on `batch_size / world` sequences of
every global batch, beside one process with the whole global batch (the baseline the ranks must
reproduce). The bytes are what the engine's reducer counted (Trainer's `comm_bytes` metric: the
payload all-reduced and broadcast in the step) and what all-reducing every full gradient would
have moved (`comm_bytes_full_gradients`). AdamW sends full gradients; a GaLore matrix sends its
r x n (or m x r) projected gradient, plus, on the steps it refreshes its subspace, its full
gradient and the new basis, so the median step shows the projection and the worst step the
refreshes. Rank 0's clock times the steps (the collectives keep the ranks in step).
"""
import statistics
from dataclasses import asdict, replace

from .presets import Preset
from .rows import engine_rows

PARALLEL_ROWS = ("engine-adamw", "engine-galore")


def torchrun_prefix(world: int) -> list[str]:
    """The module launcher of `world` local ranks (what `torchrun --standalone` runs)."""
    return ["torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m"]


def parallel_tasks(preset: Preset, names=PARALLEL_ROWS) -> list[dict]:
    """(row, ranks, per-rank batch) of every run: each row on `world` ranks, then in one process
    with the global batch."""
    world = preset.parallel_ranks
    if preset.batch_size % world:
        raise ValueError(f"data-parallel section: batch size {preset.batch_size} does not split over {world} "
                         "ranks; pick a batch size divisible by the rank count")
    rows = {row.name: row for row in engine_rows()}
    return [dict(row=rows[name], ranks=ranks, batch_size=preset.batch_size // ranks)
            for name in names for ranks in (world, 1)]


def traffic_summary(traffic: list[list[int]], skip: int) -> dict:
    """Median and worst bytes sent per step (steps after the first `skip`), the full-gradient
    bytes per step and their ratio; `traffic`: [sent, full-gradient] bytes of every step."""
    sent = [s for s, _ in traffic[skip:]] or [s for s, _ in traffic]
    full = [f for _, f in traffic[skip:]] or [f for _, f in traffic]
    median_sent, median_full = statistics.median(sent), statistics.median(full)
    return {"comm_bytes_median": median_sent, "comm_bytes_worst": max(sent),
            "comm_bytes_full_gradients": median_full,
            "full_over_sent": median_full / median_sent if median_sent else None}


def summarize(measured: dict, task: dict, skip: int) -> dict:
    """One run's line of the section: step times (median wall and CPU, rank 0's), bytes, val loss."""
    result = {"row": task["row"].name, "ranks": task["ranks"], "batch_per_rank": task["batch_size"]}
    if "error" in measured:
        return {**result, "error": measured["error"]}
    wall, cpu = measured["step_wall_s"], measured["step_cpu_s"]
    result.update(median_step_s=statistics.median(wall), median_step_cpu_s=statistics.median(cpu),
                  worst_step_s=max(wall), val_loss=measured["val_loss"], step_wall_s=wall,
                  comm_bytes_per_step=measured.get("traffic"))
    if measured.get("traffic"):
        result.update(traffic_summary(measured["traffic"], skip))
    return result


def data_parallel(preset: Preset, device: str, run_in_worker, log=print, names=PARALLEL_ROWS) -> dict:
    """Every run of the section (the rows `names`), each in fresh processes
    (`run_in_worker(spec, launcher)`)."""
    runs = []
    for task in parallel_tasks(preset, names):
        spec = {"kind": "time", "row": asdict(task["row"]), "device": device,
                "preset": asdict(replace(preset, batch_size=task["batch_size"]))}
        launcher = torchrun_prefix(task["ranks"]) if task["ranks"] > 1 else []
        measured = run_in_worker(spec, launcher)
        log(f"[bench] data parallel {task['row'].name} x{task['ranks']}: {measured.get('error', 'ok')}")
        runs.append(summarize(measured, task, preset.warmup_skip))
    return {"world": preset.parallel_ranks, "global_batch": preset.batch_size, "device": device,
            "backend": "nccl" if device == "cuda" else "gloo", "runs": runs}


def parallel_lines(section: dict) -> list[str]:
    """The section as Markdown: one line per run, the bytes and the step time beside one process's."""
    world, batch = section["world"], section["global_batch"]
    lines = [f"{world} ranks on {section['device']} ({section['backend']}, launched with torchrun --standalone, "
             f"Trainer's data-parallel path: reduction inside the hooks, no DDP), each with {batch // world} of "
             f"the {batch} sequences of every global batch, beside one process with the global batch (one torch "
             "thread per process: the ranks use one core each, the single process one). "
             "`sent/step`: median bytes the engine's reducer all-reduced (and broadcast) per step after the "
             "first steps; `worst`: the largest step (GaLore refreshes send the refreshing matrices' full "
             "gradients and bases); `full-gradient`: what all-reducing every full gradient would send.", "",
             "| row | ranks x batch | ms/step | CPU ms/step | vs 1 process | sent MB/step | worst MB | "
             "full-gradient MB/step | full / sent | val loss |", "|---" * 10 + "|"]
    single = {r["row"]: r for r in section["runs"] if r["ranks"] == 1 and "error" not in r}
    for r in section["runs"]:
        label = f"{r['row']} | {r['ranks']} x {r['batch_per_rank']}"
        if "error" in r:
            lines.append(f"| {label} | {r['error']} |")
            continue
        base = single.get(r["row"], {}).get("median_step_s")
        cells = [f"{r['median_step_s'] * 1e3:.1f}", f"{r['median_step_cpu_s'] * 1e3:.1f}",
                 times(r["median_step_s"] / base if base else None), megabytes(r.get("comm_bytes_median")),
                 megabytes(r.get("comm_bytes_worst")), megabytes(r.get("comm_bytes_full_gradients")),
                 times(r.get("full_over_sent")), f"{r['val_loss']:.4f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def megabytes(value) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"
