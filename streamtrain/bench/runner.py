"""The parent process: every row in fresh worker processes, then the report's numbers.

Memory runs first (one per row), then `repeats` timing rounds that visit every row in turn, so
slow drifts in the machine's load fall on all rows alike; step times are pooled. The quick preset
measures memory and time in one worker per row and runs two rows at once (a smoke check).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from ..optim.backend import requested_backend
from .comparisons import goal_results
from .parallel import data_parallel
from .peers import PEER_PACKAGES
from .presets import Preset
from .rows import BASELINE, Row, discover_rows

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc returns freed large blocks at once
WORKER_TIMEOUT_S = 1200


def benchmark(preset: Preset, device: str, only=None, baseline: str = BASELINE, svd: bool = True,
              hooks: bool = True, name: str = "custom", log=print, worker_timeout_s: float = WORKER_TIMEOUT_S,
              quality: bool = True) -> dict:
    """Run every available row (the preset's, or those in `only`), each in its own processes;
    then the hook-overhead, low-bit quality, data-parallel and SVD sections. Returns the report (see report.py)."""
    rows, skipped = discover_rows(device, only or preset.rows)
    if only:
        unknown = set(only) - {r.name for r in rows} - {line.split(":")[0] for line in skipped}
        if unknown:
            raise ValueError(f"--only: unknown row(s) {sorted(unknown)}; see --list")
    if baseline not in {r.name for r in rows}:
        raise ValueError(f"--baseline {baseline} is not among the rows to run; add it to --only or pick another")
    report = {"preset": name, "preset_settings": asdict(preset), "device": device, "baseline": baseline,
              "machine": machine_description(device), "load_average_start": load_average(), "skipped": skipped}
    with tempfile.TemporaryDirectory() as caches:
        report["rows"] = measure_rows(rows, preset, device, log, caches, worker_timeout_s)
        if hooks and preset.hooks:
            log(f"[bench] hook overhead: {preset.hooks['layers']} tiny linears ...")
            report["hooks"] = run_in_worker({"kind": "hooks", "preset": asdict(preset), "device": device},
                                            worker_timeout_s)
        if quality and preset.quality:
            log(f"[bench] quality: bf16 vs INT8 weights vs INT8 + INT4 projectors on {preset.quality['model']} ...")
            report["quality"] = run_in_worker({"kind": "quality", "preset": asdict(preset), "device": device},
                                              worker_timeout_s)
        if preset.parallel_ranks > 1:
            log(f"[bench] data parallel: {preset.parallel_ranks} ranks vs one process ...")
            report["parallel"] = data_parallel(preset, device, lambda spec, launcher: run_in_worker(
                spec, worker_timeout_s, launcher=launcher), log)
        if svd:
            log(f"[bench] svd {preset.svd_shape} rank {preset.svd_rank} ...")
            report["svd"] = run_in_worker({"kind": "svd", "preset": asdict(preset), "device": device},
                                          worker_timeout_s)
    report["goals"] = goal_results(report["rows"])
    report["load_average_end"] = load_average()
    return report


def worker_env(preset: Preset, kind: str, row: Row, caches: str | None) -> dict:
    """The extra environment of a row's worker: the row's own (update backend), glibc's setting
    for memory runs, and with fresh_compile_cache empty compile caches of the row's own for each
    kind of run (under `caches`), so the first timed step of a compiled update (torchao, the
    engine's 8-bit kernel) is a true cold start."""
    env = dict(MEMORY_ENV) if kind in ("memory", "both") else {}
    if preset.fresh_compile_cache and caches:
        folder = Path(caches) / kind / row.name
        env.update(TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"))
    return {**env, **row.env}


def schedule(rows: list[Row], preset: Preset) -> list[list[tuple[Row, str]]]:
    """The rounds of (row, kind) measurements, in order; a round's rows may run at once."""
    timing = [[(row, "time") for row in rows] for _ in range(preset.repeats)]
    if not preset.memory_runs:
        return timing
    if preset.one_process:
        return [[(row, "both") for row in rows]] + timing[1:]
    return [[(row, "memory") for row in rows]] + timing


def measure_rows(rows: list[Row], preset: Preset, device: str, log, caches: str | None = None,
                 worker_timeout_s: float = WORKER_TIMEOUT_S) -> dict:
    results = {row.name: {"row": asdict(row), "step_wall_s": [], "step_cpu_s": [], "first_step_s": []}
               for row in rows}

    def run(task):
        row, kind = task
        if "error" in results[row.name]:
            return
        spec = {"row": asdict(row), "preset": asdict(preset), "device": device, "kind": kind}
        measured = run_in_worker(spec, worker_timeout_s, worker_env(preset, kind, row, caches))
        merge(results[row.name], measured)
        log(f"[bench] {kind:6s} {row.name}: {measured.get('error', 'ok')}")

    for tasks in schedule(rows, preset):
        with ThreadPoolExecutor(max_workers=max(1, preset.jobs)) as pool:
            list(pool.map(run, tasks))
    for result in results.values():
        if "error" not in result and result["step_wall_s"]:
            result.update(step_statistics(result, preset))
    return results


def merge(result: dict, measured: dict) -> None:
    """Fold one worker's measurement into the row's result: step times pooled, the rest kept."""
    measured = dict(measured)
    for key in ("step_wall_s", "step_cpu_s"):
        result[key] += measured.pop(key, [])
    if "first_step_s" in measured:
        result["first_step_s"].append(measured.pop("first_step_s"))
    result.update(measured, load_average_1min=(load_average() or [None])[0])


def step_statistics(result: dict, preset: Preset) -> dict:
    """Median, mean and worst step of the pooled window (wall and CPU time: on a shared CPU the
    wall clock's worst step is often another process's), the cold start (the first step of the
    row's first timed process) and tokens/s."""
    wall, cpu = result["step_wall_s"], result["step_cpu_s"]
    median, median_cpu = statistics.median(wall), statistics.median(cpu)
    return {"median_step_s": median, "mean_step_s": statistics.fmean(wall),
            "worst_step_s": max(wall), "worst_over_median": max(wall) / median,
            "median_step_cpu_s": median_cpu,
            "worst_over_median_cpu": max(cpu) / median_cpu if median_cpu > 0 else None,
            "cold_start_s": result["first_step_s"][0] if result["first_step_s"] else None,
            "tokens_per_s": preset.batch_size * preset.seq_len / median}


def run_in_worker(spec: dict, timeout_s: float = WORKER_TIMEOUT_S, env: dict | None = None,
                  launcher: list[str] = ()) -> dict:
    """One measurement in a fresh `python -m streamtrain.bench --worker` process (`launcher`: the
    module that starts it instead, e.g. torchrun's ranks, see parallel.py); {'error': ...} with
    the worker's last line when it fails."""
    env = dict(os.environ, **(env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result_path": str(Path(tmp) / "result.json")}
        try:
            done = subprocess.run([sys.executable, "-m", *launcher, "streamtrain.bench", "--worker", json.dumps(spec)],
                                  env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"worker ran past {timeout_s:.0f} s"}
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"worker exited {done.returncode}: {last}"}
        return json.loads(Path(spec["result_path"]).read_text())


def machine_description(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "update_backend": requested_backend(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "peers": {name: package_version(name) for name in PEER_PACKAGES}}


def package_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
