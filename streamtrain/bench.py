"""`python -m streamtrain.bench`: speed, memory and quality of every update path, side by side.

Each configuration (a row) trains the same preset, data, seed and token budget, measured in two
fresh processes of its own so that its peaks are its own:
  time:   Trainer.run() as a user runs it: median step time after warm-up, tokens/s, the final
          validation loss (and the allocator's and NVML's peaks on CUDA);
  memory: a short run of the same row under the memory tracker (peak live tensor bytes, and what
          made the peak) with the process's peak RSS; glibc is told to return freed blocks at
          once (MALLOC_MMAP_THRESHOLD_) so RSS follows the tensors. The tracker and that setting
          both slow every op, so they stay out of the timed process.
Rows that are not the engine (torch.optim.AdamW, galore-torch) drive Trainer's own loop through
`TorchOptimizers`, so every row shares the data pipeline, forward, timing and evaluation code.

    python -m streamtrain.bench                   # quick preset: a smoke check of every row
    python -m streamtrain.bench --preset full     # the published table (profiles/bench-cpu.md)
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import TrainConfig
from .engine import Engine, StepReport
from .memory.profiler import RunProfiler
from .methods import METHODS, is_low_rank_target
from .train import Trainer

BASELINE = "torch-adamw"
MB = 1e6


@dataclass(frozen=True)
class Preset:
    model: str
    model_overrides: dict
    steps: int
    batch_size: int
    seq_len: int
    warmup_skip: int          # first steps left out of the step-time median
    tracked_steps: int        # steps of the memory run (Trainer's profiler tracks the first 2)
    rank: int
    gap: int
    activation_checkpointing: bool = False
    threads: int = 1          # torch intra-op threads per worker (0: torch's default); one thread keeps
                              # timings steady when other work shares the machine and makes CPU time exact
    repeats: int = 1          # timing rounds over all rows
    lr: float = 2e-3
    eval_batches: int = 8
    max_data_bytes: int = 4_000_000
    svd_shape: tuple = (4096, 11008)
    svd_rank: int = 1024


PRESETS = {
    # a smoke check of every row (about a minute on an idle 2-core CPU, mostly process start-up)
    "quick": Preset("byte-tiny", {}, steps=8, batch_size=8, seq_len=128, warmup_skip=3, tracked_steps=2,
                    rank=32, gap=4, eval_batches=4, max_data_bytes=1_000_000,
                    svd_shape=(1024, 2752), svd_rank=256),
    # the published numbers: a 10.6M-parameter model with activation checkpointing, so weights,
    # gradients and optimizer states rather than activations set the peak (as they do at 7B)
    "full": Preset("byte-small", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=6),
                   steps=20, batch_size=4, seq_len=128, warmup_skip=4, tracked_steps=2, rank=96, gap=20,
                   activation_checkpointing=True, repeats=2),
}


@dataclass(frozen=True)
class Row:
    name: str
    driver: str               # "engine", or a recipe of optimizer_recipe(): "torch", "fused-hooks", ...
    method: str = "adamw"
    states: str = "fp32"
    dtype: str = "float32"
    note: str = ""


# -- rows ----------------------------------------------------------------------------------------
def discover_rows(device: str = "cpu") -> tuple[list[Row], list[str]]:
    """Every row this installation can run on `device`, and one line for each it cannot."""
    rows = [Row(BASELINE, "torch", note="torch.optim.AdamW, plain loop: backward, step, zero_grad"),
            Row("torch-adamw-fused-hooks", "fused-hooks",
                note="torch.optim.AdamW(fused=True) per parameter, stepped in post-accumulate-grad hooks"),
            Row("engine-adamw", "engine"),
            Row("engine-adamw-bf16-states", "engine", states="bf16"),
            Row("engine-adamw-8bit", "engine", states="8bit"),
            Row("engine-adamw-bf16-weights", "engine", dtype="bfloat16",
                note="streamtrain Engine, AdamW, fp32 states, bf16 weights with stochastic rounding"),
            Row("engine-galore", "engine", method="galore"),
            Row("engine-galore-8bit", "engine", method="galore", states="8bit")]
    rows += [Row(f"engine-{m}", "engine", method=m) for m in METHODS if m not in ("adamw", "galore")]
    skipped = []
    if importlib.util.find_spec("streamtrain.optim.quant8") is None:
        skipped.append("engine 8-bit rows: streamtrain.optim.quant8 is not present yet")
        rows = [r for r in rows if r.states != "8bit"]
    try:
        import galore_torch  # noqa: F401
        rows.append(Row("galore-torch-per-layer", "galore-torch", method="galore",
                        note="galore_torch.GaLoreAdamW, one per parameter, stepped in hooks"))
        if device == "cuda":  # GaLoreAdamW8bit calls torch.cuda.synchronize() in every step
            rows.append(Row("galore-torch-8bit-per-layer", "galore-torch-8bit", method="galore", states="8bit",
                            note="GaLoreAdamW8bit + bnb Adam8bit per parameter (the authors' recipe)"))
        else:
            skipped.append("galore-torch-8bit-per-layer: GaLoreAdamW8bit calls torch.cuda.synchronize(), "
                           "so it runs on CUDA only")
    except Exception as e:  # any import failure (missing transformers/bitsandbytes) means: skip
        skipped.append(f"galore-torch rows: `import galore_torch` failed ({type(e).__name__}: {e})")
    return rows, skipped


def train_config(row: Row, preset: Preset, device: str, steps: int, out: str) -> TrainConfig:
    values = dict(model=preset.model, model_overrides=dict(preset.model_overrides), data="builtin",
                  max_data_bytes=preset.max_data_bytes, steps=steps, batch_size=preset.batch_size,
                  seq_len=preset.seq_len, method=row.method, lr=preset.lr, rank=preset.rank,
                  galore_gap=preset.gap, states=row.states, dtype=row.dtype, device=device, seed=0,
                  activation_checkpointing=preset.activation_checkpointing, out=out, eval_every=0,
                  eval_batches=preset.eval_batches, progress=False)
    if row.driver != "engine":  # Trainer builds an engine that BenchTrainer then drops: any method does
        values.update(method="adamw", states="fp32")
    return TrainConfig(**values)


# -- torch.optim rows through Trainer's loop -----------------------------------------------------
class TorchOptimizers:
    """torch.optim optimizers behind the part of the Engine interface that Trainer and its
    memory profiler use (backward -> StepReport, step, micro_index, nonfinite_total, states,
    listeners, detach), with the engine's LR schedule.
    `per_parameter`: one optimizer per parameter, stepped in its post-accumulate-grad hook
    the moment its gradient is complete (the gradient is freed right after)."""

    def __init__(self, model, schedule, make_optimizer, per_parameter: bool):
        self.schedule, self.step, self.micro_index, self.nonfinite_total = schedule, 0, 0, 0
        self.listeners = []  # as the engine's: on_step_end(self, report)
        self.reducer = None  # one process: no data-parallel reduction
        self.rules = {}      # no streamtrain rules: nothing for Trainer to ask about ranks
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if per_parameter:
            self.optimizers = {p: make_optimizer(n, p) for n, p in self.named}
            self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for _, p in self.named]
        else:
            self.optimizers = {None: make_optimizer(None, [p for _, p in self.named])}
            self.handles = []

    @property
    def states(self) -> dict:
        """{parameter name: its torch.optim state}, so the tracker files it as optimizer state."""
        return {n: self.optimizers.get(p, self.optimizers.get(None)).state.get(p, {}) for n, p in self.named}

    def _step_one(self, param):
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> StepReport:
        lr = self.schedule(self.step)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss.backward()
        if not self.handles:
            self.optimizers[None].step()
            self.optimizers[None].zero_grad(set_to_none=True)
        report = StepReport(self.step, float(loss.detach()), lr, math.nan, False, 0)
        self.step += 1
        for listener in self.listeners:
            listener.on_step_end(self, report)
        return report

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def optimizer_recipe(driver: str, config: TrainConfig):
    """(make_optimizer(name, params), per_parameter) for a non-engine row."""
    adam = dict(lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    galore = dict(rank=config.rank, update_proj_gap=config.galore_gap, scale=config.galore_scale,
                  proj_type="std")
    if driver == "torch":
        return (lambda name, params: torch.optim.AdamW(params, **adam)), False
    if driver == "fused-hooks":
        return (lambda name, p: torch.optim.AdamW([p], fused=True, **adam)), True
    if driver == "galore-torch":
        from galore_torch import GaLoreAdamW

        def make(name, p):  # the authors' param groups: GaLore on attention/MLP matrices, Adam elsewhere
            group = {"params": [p], **(galore if is_low_rank_target(name, p) else {})}
            return GaLoreAdamW([group], no_deprecation_warning=True, **adam)
        return make, True
    if driver == "galore-torch-8bit":
        import bitsandbytes as bnb
        from galore_torch import GaLoreAdamW8bit

        def make(name, p):
            if is_low_rank_target(name, p):
                return GaLoreAdamW8bit([{"params": [p], **galore}], **adam)
            return bnb.optim.Adam8bit([p], **adam)
        return make, True
    raise ValueError(f"unknown bench driver {driver!r}")


class StepClock:
    """Engine listener: wall and process CPU time at the end of every logical step. CPU time
    counts only this process's work, so it stays put when other work shares the machine (with
    one torch thread; with more, threads waiting on each other count too)."""

    def __init__(self):
        self.stamps = []

    def on_step_end(self, engine, report):
        self.stamps.append((time.perf_counter(), time.process_time()))

    def step_times(self) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of each step after the first (end to end of consecutive steps)."""
        pairs = list(zip(self.stamps, self.stamps[1:]))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


class BenchTrainer(Trainer):
    """Trainer for one row: swaps in torch optimizers (and a memory profiler that follows them)
    where the row asks for them, clocks every step, reads the peak RSS when training ends (before
    finish() saves the weights), and saves no checkpoints (I/O outside the step)."""

    def __init__(self, config: TrainConfig, row: Row):
        super().__init__(config)
        if row.driver != "engine":
            schedule = self.engine.schedule
            self.engine.detach()
            self.engine = None   # its states are freed before any peak is read
            make, per_parameter = optimizer_recipe(row.driver, config)
            self.engine = TorchOptimizers(self.model, schedule, make, per_parameter)
            self.profiler = RunProfiler(self.model, self.engine, self.device)
        self.clock = StepClock()
        self.engine.listeners.append(self.clock)
        reset_peak_rss()

    def finish(self):
        self.rss_peak_bytes = peak_rss()
        return super().finish()

    def save_checkpoint(self):
        return None


def reset_peak_rss() -> None:
    """Restart the RSS high-water mark, so a row's peak is its training's, not its setup's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
    except OSError:
        pass


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: the current RSS is the best there is
    return psutil.Process().memory_info().rss


# -- one row, in its own process ----------------------------------------------------------------
def timed_run(row: Row, preset: Preset, device: str) -> dict:
    """The full run: step times, tokens/s, validation loss (and the allocator's peaks on CUDA)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = BenchTrainer(train_config(row, preset, device, preset.steps, out), row)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        summary = trainer.run()
        (wall, cpu), ranks = trainer.clock.step_times(), low_ranks(trainer.engine)
        cuda = trainer.profiler.measured().get("cuda", {})
        del trainer
    skip = max(0, preset.warmup_skip - 1)  # interval i ends at step i + 1: leave out the warm-up steps
    return {"steps": summary["steps"], "val_loss": summary["val_loss"],
            "initial_val_loss": summary["initial_val_loss"],
            "parameters": parameters, "trainable_parameters": trainable,
            "step_wall_s": wall[skip:], "step_cpu_s": cpu[skip:],
            "mean_rank": statistics.fmean(ranks) if ranks else None,
            **{f"cuda_{key}_bytes": cuda[key] for key in ("allocated_peak", "reserved_peak", "nvml_peak")
               if key in cuda}}


def low_ranks(engine) -> list[int]:
    """The current rank of every low-rank projected matrix (GaLore, AdaRankGrad) at the end."""
    states = engine.states.values() if isinstance(engine, Engine) else []
    return [s["rank"] for s in states if isinstance(s.get("rank"), int)]


def memory_run(row: Row, preset: Preset, device: str) -> dict:
    """A short run of the same row: what Trainer's memory profiler measured over its first steps
    (peak live tensor bytes, what made the peak, the largest optimizer-state bytes) and the
    process's peak RSS in training."""
    with tempfile.TemporaryDirectory() as out:
        trainer = BenchTrainer(train_config(row, preset, device, preset.tracked_steps, out), row)
        trainer.run()
        measured, rss = trainer.profiler.measured(), trainer.rss_peak_bytes
        del trainer
    peak = measured["peak"]
    return {"peak_tensor_bytes": peak["total"], "peak_phase": peak["phase"],
            "peak_by_category": peak["by_category"], "rss_peak_bytes": rss,
            "state_bytes": measured["max_by_category"]["optimizer_states"]}


def run_svd_comparison(preset: Preset, device: str) -> dict:
    """Issue 7's pair: exact vs randomized SVD basis of one m x n fp32 matrix at rank r, with the
    share of the matrix's energy (squared Frobenius norm) each basis captures."""
    from .optim.projector import projection_side, randomized_basis, svd_basis
    (m, n), r = preset.svd_shape, preset.svd_rank
    gen = torch.Generator().manual_seed(0)
    # a gradient-like spectrum: mixing factors with power-law weights (1 / i), then fp32 noise
    weights = 1.0 / torch.arange(1, m + 1, dtype=torch.float32)
    left = torch.randn(m, m, generator=gen) * weights
    matrix = (left @ torch.randn(m, n, generator=gen) / math.sqrt(m * n)).to(device)
    matrix += 1e-3 * matrix.std() * torch.randn(m, n, generator=gen).to(device)
    side = projection_side(matrix.shape)
    total = float(matrix.square().sum())
    result = {"shape": [m, n], "rank": r, "side": side, "matrix": "power-law 1/i mixture plus 0.1% noise"}
    for name, basis_fn in (("exact", svd_basis), ("randomized", randomized_basis)):
        synchronize(device)
        started = time.perf_counter()
        basis = basis_fn(matrix, r, side)
        synchronize(device)
        elapsed = time.perf_counter() - started
        projected = basis.T @ matrix if side == "left" else matrix @ basis
        result[name] = {"seconds": elapsed, "energy_captured": float(projected.square().sum()) / total}
    return result


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def worker_main(spec: dict) -> None:
    preset, device = Preset(**spec["preset"]), spec["device"]
    if preset.threads:
        torch.set_num_threads(preset.threads)
    if spec["kind"] == "svd":
        result = run_svd_comparison(preset, device)
    else:
        measure = {"time": timed_run, "memory": memory_run}[spec["kind"]]
        result = measure(Row(**spec["row"]), preset, device)
    Path(spec["result_path"]).write_text(json.dumps(result))


# -- the parent: one process per row, then the table --------------------------------------------
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc returns freed large blocks at once


def measure_rows(rows: list[Row], preset: Preset, device: str, log) -> dict:
    """Memory once per row, then `preset.repeats` rounds of timing that visit every row in turn,
    so slow drifts in the machine's load fall on all rows alike; step times are pooled."""
    results = {row.name: {"row": asdict(row), "step_wall_s": [], "step_cpu_s": []} for row in rows}

    def run(row, kind, env=None):
        result = results[row.name]
        if "error" not in result:
            spec = {"row": asdict(row), "preset": asdict(preset), "device": device, "kind": kind}
            measured = run_in_worker(spec, timeout_s=1200, env=env)
            for key in ("step_wall_s", "step_cpu_s"):
                result[key] += measured.pop(key, [])
            result.update(measured, load_average_1min=(load_average() or [None])[0])
            log(f"[bench] {kind:6s} {row.name}: {measured.get('error', 'ok')}")

    for row in rows:
        run(row, "memory", MEMORY_ENV)
    for _ in range(preset.repeats):
        for row in rows:
            run(row, "time")
    for result in results.values():
        if "error" not in result:
            result.update(step_statistics(result, preset))
    return results


def step_statistics(result: dict, preset: Preset) -> dict:
    median = statistics.median(result["step_wall_s"])
    return {"median_step_s": median, "mean_step_s": statistics.fmean(result["step_wall_s"]),
            "median_step_cpu_s": statistics.median(result["step_cpu_s"]),
            "tokens_per_s": preset.batch_size * preset.seq_len / median}


def run_in_worker(spec: dict, timeout_s: float, env: dict | None = None) -> dict:
    env = dict(os.environ, **(env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result_path": str(Path(tmp) / "result.json")}
        done = subprocess.run([sys.executable, "-m", "streamtrain.bench", "--worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
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
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "peers": {name: package_version(name) for name in PEER_PACKAGES}}


PEER_PACKAGES = ("galore-torch", "transformers", "bitsandbytes")  # galore_torch imports the other two


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def benchmark(preset: Preset, device: str, only=None, baseline: str = BASELINE, svd: bool = True,
              name: str = "custom", log=print) -> dict:
    """Run every available row (or those in `only`), each in its own processes; the report."""
    rows, skipped = discover_rows(device)
    if only:
        unknown = set(only) - {r.name for r in rows}
        if unknown:
            raise ValueError(f"--only: unknown or unavailable row(s) {sorted(unknown)}; see --list")
        rows = [r for r in rows if r.name in only]
    if baseline not in {r.name for r in rows}:
        raise ValueError(f"--baseline {baseline} is not among the rows to run; add it to --only or "
                         "pick another")
    report = {"preset": name, "preset_settings": asdict(preset), "device": device, "baseline": baseline,
              "machine": machine_description(device), "load_average_start": load_average(),
              "skipped": skipped}
    report["rows"] = measure_rows(rows, preset, device, log)
    if svd:
        report["svd"] = svd_section(preset, device, log)
    report["load_average_end"] = load_average()
    return report


def svd_section(preset: Preset, device: str, log) -> dict:
    from .optim import projector
    if not hasattr(projector, "randomized_basis"):
        return {"skipped": "streamtrain.optim.projector has no randomized_basis yet"}
    log(f"[bench] svd {preset.svd_shape} rank {preset.svd_rank} ...")
    return run_in_worker({"kind": "svd", "preset": asdict(preset), "device": device}, timeout_s=1200)


# -- the report ----------------------------------------------------------------------------------
COMPARISONS = (("engine-adamw", BASELINE), ("engine-adamw", "torch-adamw-fused-hooks"),
               ("engine-galore", "galore-torch-per-layer"),
               ("engine-galore-8bit", "galore-torch-8bit-per-layer"))


def memory_columns(device: str) -> list[tuple[str, str]]:
    columns = [("peak_tensor_bytes", "peak tensors MB")]
    if device == "cuda":
        return columns + [("cuda_allocated_peak_bytes", "CUDA allocated MB"),
                          ("cuda_nvml_peak_bytes", "NVML MB")]
    return columns + [("rss_peak_bytes", "peak RSS MB")]


def table_columns(device: str) -> list:
    """(header, cell(row, base row)) for each column after the row's name."""
    columns = [("ms/step", lambda r, b: f"{r['median_step_s'] * 1e3:.0f}"),
               ("vs base", lambda r, b: ratio(r["median_step_s"], b.get("median_step_s"))),
               ("CPU ms/step", lambda r, b: f"{r['median_step_cpu_s'] * 1e3:.0f}"),
               ("vs base", lambda r, b: ratio(r["median_step_cpu_s"], b.get("median_step_cpu_s"))),
               ("tokens/s", lambda r, b: f"{r['tokens_per_s']:.0f}")]
    for key, header in memory_columns(device):
        columns += [(header, lambda r, b, key=key: fmt_mb(r.get(key))),
                    ("vs base", lambda r, b, key=key: ratio(r.get(key), b.get(key)))]
    return columns + [("states MB", lambda r, b: fmt_mb(r.get("state_bytes"))),
                      ("mean rank", lambda r, b: fmt(r.get("mean_rank"), ".1f")),
                      ("val loss", lambda r, b: f"{r['val_loss']:.4f}"),
                      ("vs base", lambda r, b: ratio(r["val_loss"], b.get("val_loss"))),
                      ("load", lambda r, b: fmt(r.get("load_average_1min"), ".1f"))]


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def to_markdown(report: dict) -> str:
    rows, base_name = report["rows"], report["baseline"]
    base = rows.get(base_name, {})
    columns = table_columns(report["device"])
    lines = header_lines(report) + [
        "| row | " + " | ".join(header for header, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        label = f"{name} (base)" if name == base_name else name
        cells = [r["error"]] if "error" in r else [cell(r, base) for _, cell in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Key comparisons", ""] + key_comparisons(rows)
    lines += ["", "## Rows", ""] + [f"- `{n}`: {r['row']['note'] or describe(r['row'])}" for n, r in rows.items()]
    lines += [f"- skipped: {line}" for line in report["skipped"]]
    lines += ["", "## Randomized vs exact SVD (issue 7)", ""] + svd_lines(report.get("svd"))
    return "\n".join(lines) + "\n"


def header_lines(report: dict) -> list[str]:
    machine, preset, device = report["machine"], report["preset_settings"], report["device"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"
    threads = preset["threads"] or f"default {torch.get_num_threads()}"
    default_threads = PRESETS[report["preset"]].threads if report["preset"] in PRESETS else None
    threads_flag = "" if preset["threads"] == default_threads else f" --threads {preset['threads']}"
    parameters = next((r["parameters"] for r in report["rows"].values() if "parameters" in r), 0)
    overrides = ", ".join(f"{k}={v}" for k, v in preset["model_overrides"].items())
    return [
        f"# streamtrain bench: preset `{report['preset']}` on {device}", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({threads} torch threads per worker){gpu}; "
        f"torch {machine['torch']}, Python {machine['python']}; peers: "
        + (", ".join(f"{k} {v}" for k, v in machine.get("peers", {}).items() if v) or "none installed") + ".",
        f"- Workload: `{preset['model']}`{f' ({overrides})' if overrides else ''}, {parameters / 1e6:.1f}M "
        f"parameters{', activation checkpointing' if preset['activation_checkpointing'] else ''}; built-in "
        f"corpus, seed 0; {preset['steps']} steps x {preset['batch_size']} x {preset['seq_len']} tokens per "
        f"row; lr {preset['lr']}; rank {preset['rank']} (GaLore gap {preset['gap']}).",
        "- Each row runs in fresh processes. `ms/step`: median wall time of the steps after the first "
        f"{preset['warmup_skip']}, pooled over {preset['repeats']} timing round(s) that visit the rows in turn; "
        "`CPU ms/step`: the same for the process's CPU time, steadier when other work shares the machine. "
        "`peak tensors`: the peak of live tensor bytes that Trainer's memory profiler "
        f"(streamtrain.memory.tracker) measures over the first steps of a {preset['tracked_steps']}-step run; "
        "`peak RSS`: the process high-water mark in that run (MALLOC_MMAP_THRESHOLD_=65536); `states`: the "
        "tracker's largest optimizer-state bytes. Ratios are to the base row.",
        f"- Load average (1, 5, 15 min): {report['load_average_start']} at the start, "
        f"{report['load_average_end']} at the end; `load`: the 1-minute load after each row's last run.",
        f"- Reproduce: `python -m streamtrain.bench --preset {report['preset']} --device {device}{threads_flag}`",
        ""]


def describe(row: dict) -> str:
    dtype = "bf16 weights" if row["dtype"] == "bfloat16" else "fp32 weights"
    return f"streamtrain Engine, method {row['method']}, {row['states']} states, {dtype}"


def key_comparisons(rows: dict) -> list[str]:
    lines = []
    for name, other in COMPARISONS:
        a, b = rows.get(name), rows.get(other)
        if not a or not b or "error" in a or "error" in b:
            lines.append(f"- {name} vs {other}: not measured (a row was skipped or failed, see below)")
            continue
        lines.append(f"- {name} vs {other}: step time {ratio(a['median_step_s'], b['median_step_s'])} "
                     f"(CPU time {ratio(a['median_step_cpu_s'], b['median_step_cpu_s'])}), "
                     f"peak tensors {ratio(a['peak_tensor_bytes'], b['peak_tensor_bytes'])}, "
                     f"peak RSS {ratio(a.get('rss_peak_bytes'), b.get('rss_peak_bytes'))}, "
                     f"val loss {a['val_loss']:.4f} vs {b['val_loss']:.4f}")
    return lines


def svd_lines(svd) -> list[str]:
    if not svd:
        return ["not run (--no-svd)"]
    if "skipped" in svd or "error" in svd:
        return [f"skipped: {svd.get('skipped') or svd.get('error')}"]
    exact, randomized = svd["exact"], svd["randomized"]
    return [f"{svd['shape'][0]}x{svd['shape'][1]} fp32 ({svd['matrix']}), rank {svd['rank']}, basis on the "
            f"{svd['side']} side", "", "| method | seconds | energy captured |", "|---|---|---|",
            f"| exact | {exact['seconds']:.2f} | {exact['energy_captured']:.6f} |",
            f"| randomized | {randomized['seconds']:.2f} | {randomized['energy_captured']:.6f} |", "",
            f"randomized / exact: time {ratio(randomized['seconds'], exact['seconds'])}, "
            f"energy {ratio(randomized['energy_captured'], exact['energy_captured'])}"]


def fmt_mb(value) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# -- CLI -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamtrain.bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=PRESETS, help="quick (a smoke check) or full (published)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for every row")
    p.add_argument("--baseline", default=BASELINE, help=f"row the ratios are taken against ({BASELINE})")
    p.add_argument("--only", default=None, help="comma-separated row names to run (see --list)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per worker (default: the preset's, 1; 0: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds over all rows (default: the preset's)")
    p.add_argument("--no-svd", dest="svd", action="store_false", help="leave out the SVD comparison")
    p.add_argument("--out", default=None, help="output path without suffix (default: profiles/bench-DEVICE "
                                               "for --preset full, runs/bench-PRESET-DEVICE otherwise)")
    p.add_argument("--list", action="store_true", help="list the rows this installation can run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    rows, skipped = discover_rows(args.device)
    if args.list:
        print("\n".join([f"{r.name}: {r.note or describe(asdict(r))}" for r in rows]
                        + [f"skipped: {line}" for line in skipped]))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else None
    try:
        chosen = {k: v for k, v in (("threads", args.threads), ("repeats", args.repeats)) if v is not None}
        preset = replace(PRESETS[args.preset], **chosen)
        report = benchmark(preset, args.device, only, args.baseline, args.svd, args.preset,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or (f"profiles/bench-{args.device}" if args.preset == "full"
                            else f"runs/bench-{args.preset}-{args.device}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    Path(f"{out}.md").write_text(markdown)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
