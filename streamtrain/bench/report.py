"""The benchmark report as Markdown: the table, the key comparisons, the hook overhead, the SVD pair."""
import torch

from .comparisons import key_comparisons, ratio, worst_key
from .parallel import parallel_lines
from .presets import PRESETS
from .quality import quality_lines
from .rows import describe

MB = 1e6


def to_markdown(report: dict) -> str:
    rows, base_name = report["rows"], report["baseline"]
    base = rows.get(base_name, {})
    columns = table_columns(report["device"], report["preset_settings"].get("memory_runs", True))
    lines = header_lines(report) + [
        "| row | " + " | ".join(header for header, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        label = f"{name} (base)" if name == base_name else name
        cells = [r["error"]] if "error" in r else [cell(r, base) for _, cell in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    skipped = [line.split(":", 1)[0] for line in report["skipped"]]
    lines += ["", "## Key comparisons", ""] + (key_comparisons(rows, report["device"], skipped) or ["none among these rows"])
    lines += ["", "## Rows", ""] + [f"- `{n}`: {r['row']['note'] or describe(r['row'])}" for n, r in rows.items()]
    lines += [f"- skipped: {line}" for line in report["skipped"]]
    if "hooks" in report:
        lines += ["", "## Hook overhead (issue item 4)", ""] + hooks_lines(report["hooks"])
    if "quality" in report:
        lines += ["", "## Low-bit weights and projectors: quality (issue 17)", ""] + quality_lines(report["quality"])
    if "parallel" in report:
        lines += ["", "## Data parallel (issue 15)", ""] + parallel_lines(report["parallel"])
    lines += ["", "## Randomized vs exact SVD (issue 7)", ""] + svd_lines(report.get("svd"))
    return "\n".join(lines) + "\n"


def memory_columns(device: str, memory_runs: bool = True) -> list[tuple[str, str]]:
    columns = [("peak_tensor_bytes", "peak tensors MB")] if memory_runs else []
    if device == "cuda":
        return columns + [("cuda_allocated_peak_bytes", "CUDA allocated MB"), ("cuda_nvml_peak_bytes", "NVML MB at the end")]
    return columns + [("rss_peak_bytes", "peak RSS MB")]


def table_columns(device: str, memory_runs: bool = True) -> list:
    """(header, cell(row, base row)) for each column after the row's name."""
    columns = [("ms/step", lambda r, b: f"{r['median_step_s'] * 1e3:.0f}"),
               ("vs base", lambda r, b: ratio(r["median_step_s"], b.get("median_step_s"))),
               ("CPU ms/step", lambda r, b: f"{r['median_step_cpu_s'] * 1e3:.0f}"),
               ("vs base", lambda r, b: ratio(r["median_step_cpu_s"], b.get("median_step_cpu_s"))),
               ("worst/median", lambda r, b: fmt(r.get(worst_key(device)), ".2f")),
               ("first step s", lambda r, b: fmt(r.get("cold_start_s"), ".2f")),
               ("tokens/s", lambda r, b: f"{r['tokens_per_s']:.0f}")]
    for key, header in memory_columns(device, memory_runs):
        columns += [(header, lambda r, b, key=key: fmt_mb(r.get(key))),
                    ("vs base", lambda r, b, key=key: ratio(r.get(key), b.get(key)))]
    states = [("states MB", lambda r, b: fmt_mb(r.get("state_bytes")))] if memory_runs else []
    return columns + states + [("mean rank", lambda r, b: fmt(r.get("mean_rank"), ".1f")),
                               ("val loss", lambda r, b: fmt(r.get("val_loss"), ".4f")),
                               ("vs base", lambda r, b: ratio(r.get("val_loss"), b.get("val_loss"))),
                               ("load", lambda r, b: fmt(r.get("load_average_1min"), ".1f"))]


def header_lines(report: dict) -> list[str]:
    machine, preset, device = report["machine"], report["preset_settings"], report["device"]
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ", no GPU"
    threads = preset["threads"] or f"default {torch.get_num_threads()}"
    default_threads = PRESETS[report["preset"]].threads if report["preset"] in PRESETS else None
    threads_flag = "" if preset["threads"] == default_threads else f" --threads {preset['threads']}"
    parameters = next((r["parameters"] for r in report["rows"].values() if "parameters" in r), 0)
    overrides = ", ".join(f"{k}={v}" for k, v in preset["model_overrides"].items())
    peers = ", ".join(f"{k} {v}" for k, v in machine.get("peers", {}).items() if v) or "none installed"
    return [
        f"# streamtrain bench: preset `{report['preset']}` on {device}", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({threads} torch threads per worker){gpu}; "
        f"torch {machine['torch']}, Python {machine['python']}; peers: {peers}; engine update backend: "
        f"{machine.get('update_backend', 'not recorded')} (STREAMTRAIN_UPDATE_BACKEND; `-reference` rows: reference).",
        f"- Workload: `{preset['model']}`{f' ({overrides})' if overrides else ''}, {parameters / 1e6:.1f}M "
        f"parameters{', activation checkpointing' if preset['activation_checkpointing'] else ''}; built-in "
        f"corpus, seed 0; {preset['steps']} steps x {preset['batch_size']} x {preset['seq_len']} tokens per "
        f"row; lr {preset['lr']}; rank {preset['rank']}, GaLore gap {preset['gap']} (refreshes fall inside the "
        "timed window).",
        *method_lines(preset, device),
        f"- Load average (1, 5, 15 min): {report['load_average_start']} at the start, "
        f"{report['load_average_end']} at the end; `load`: the 1-minute load after each row's last run.",
        f"- Reproduce: `python -m streamtrain.bench --preset {report['preset']} --device {device}{threads_flag}`",
        *([f"- Note: {report['note']}"] if report.get("note") else []),
        ""]


def method_lines(preset: dict, device: str) -> list[str]:
    together = ("memory and time measured in one process per row, "
                f"{preset['jobs']} rows at a time (a smoke check: rows share the cores)"
                if preset["one_process"] or preset["jobs"] > 1 else "each row runs in fresh processes")
    cache = ("; every row's compile caches start empty, so it includes torch.compile's work (torchao, the "
             "engine's compiled 8-bit update)"
             if preset["fresh_compile_cache"] else "; compile caches are the machine's own (warm after a first run)")
    lines = [f"- Method: {together}. `ms/step`: median wall time of the steps after the first "
             f"{preset['warmup_skip']}, pooled over {preset['repeats']} timing round(s) that visit the rows in "
             "turn; `CPU ms/step`: the same for the process's CPU time, steadier when other work shares the "
             "machine; `worst/median`: the slowest of those steps over the median (GaLore: refresh spikes), in "
             f"{'wall' if device == 'cuda' else 'CPU'} time; "
             f"`first step s`: step 0 of the row's first timed run, left out of the median{cache}."]
    if preset["memory_runs"]:
        lines.append("- Memory: `peak tensors` is the peak of live tensor bytes that Trainer's memory profiler "
                     "(streamtrain.memory.tracker) measures over the first steps of a "
                     f"{preset['tracked_steps']}-step run; `peak RSS`: the process high-water mark in that run "
                     "(MALLOC_MMAP_THRESHOLD_=65536); `states`: the tracker's largest optimizer-state bytes. "
                     "Ratios are to the base row. torch.compile does not run under the tracker: there the engine's "
                     "compiled 8-bit update runs its fused path, and torchao's rows are not tracked (RSS only).")
    else:
        lines.append("- Memory: the CUDA caching allocator's peak over the timed run and NVML's figure for the "
                     "process at its end. Ratios are to the base row.")
    return lines


def hooks_lines(hooks: dict) -> list[str]:
    if "error" in hooks:
        return [f"failed: {hooks['error']}"]
    lines = [f"{hooks['layers']} x (Linear({hooks['width']}, {hooks['width']}) + Tanh), "
             f"{hooks['hooks_per_step']} parameters, so {hooks['hooks_per_step']} hook calls per step; batch "
             f"{hooks['batch']}; {hooks['timed_steps']} timed steps per variant in interleaved rounds, on "
             f"{hooks['device']}. `us/hook`: (median step - backward-only's median step) / hooks per step.", "",
             "| variant | ms/step | CPU ms/step | us/hook | CPU us/hook |", "|---|---|---|---|---|"]
    for name, v in hooks["variants"].items():
        lines.append(f"| {name} | {v['median_step_s'] * 1e3:.2f} | {v['median_step_cpu_s'] * 1e3:.2f} | "
                     f"{fmt(v.get('us_per_hook'), '.1f')} | {fmt(v.get('us_per_hook_cpu'), '.1f')} |")
    if "engine_vs_fused_step" in hooks:
        lines += ["", "engine-adamw / torch-fused-hooks: "
                  f"step time {fmt(hooks['engine_vs_fused_step'], '.2f')}x (CPU {fmt(hooks.get('engine_vs_fused_step_cpu'), '.2f')}x), "
                  f"per hook {fmt(hooks.get('engine_vs_fused_per_hook'), '.2f')}x "
                  f"(CPU {fmt(hooks.get('engine_vs_fused_per_hook_cpu'), '.2f')}x), above the bare hook's floor "
                  f"{fmt(hooks.get('engine_vs_fused_above_floor'), '.2f')}x "
                  f"(CPU {fmt(hooks.get('engine_vs_fused_above_floor_cpu'), '.2f')}x); goal: per hook <= 1.00x. "
                  f"Same math: the two models' weights differ by at most "
                  f"{fmt(hooks.get('engine_vs_fused_max_weight_diff'), '.1e')} at the end."]
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
