"""Memory reports: JSON for programs, Markdown for people, a PNG timeline when matplotlib exists.

A report is one dict: the run's config, the plan (breakdown at the peak, device overheads, the
per-phase timeline, the search), and for a real run what was measured, next to the plan as a
ratio. `write_report(folder, report)` writes memory.json, memory.md and memory.png.
"""
import json
from pathlib import Path

from .planner import PlanRefused, fitting_command, flags_of, plan_config, plan_run, search_knobs
from .sharded_plan import world_size_search
from .tracker import CATEGORIES
from .units import format_bytes, parse_bytes

COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer_states": "#55a868", "projectors": "#8172b3",
          "activations": "#c44e52", "loss": "#937860", "temporaries": "#da8bc3"}


def build_report(kind: str, config, plan: dict | None, measured: dict | None = None) -> dict:
    """kind: 'dry run' or 'run'. `config` is the TrainConfig; `measured` the RunProfiler's figures."""
    budget = {"text": config.budget, "bytes": parse_bytes(config.budget)} if config.budget else None
    return {"kind": kind, "config": config.to_dict(), "budget": budget, "plan": plan, "measured": measured}


def dry_run(config) -> dict:
    """Plan `config` (searching the knobs when it has a budget), write the report into its output
    folder, print the tables; nothing real is allocated. Returns a summary for the CLI, whose
    message ends with the whole command that fits when the configuration as given does not."""
    try:
        plan = plan_run(config, search=config.budget is not None, full_depth=config.plan_full_depth)
    except PlanRefused as refusal:  # nothing fits: still show what the configuration as given needs
        plan = plan_config(config, budget=parse_bytes(config.budget), full_depth=config.plan_full_depth)
        plan["refused"] = str(refusal)
        plan["search"] = search_knobs(config, plan["target"], plan["budget"])
        if config.parallel == "fsdp":
            plan["world_sizes"] = world_size_search(config, plan["target"], plan["budget"])
    report = build_report("dry run", config, plan)
    from ..runfolder import default_out
    paths = write_report(config.out or default_out(None), report)
    print("\n".join(verdict_lines(report) + [""] + breakdown_table(plan, report["budget"])
                    + ([""] + search_table(plan["search"]) if plan.get("search") else [])
                    + ([""] + world_size_table(plan["world_sizes"]) if plan.get("world_sizes") else [])))
    best = (plan.get("search") or {}).get("best")
    message = (f"dry run: {'fits' if plan['fits'] else 'does not fit'}; needs {format_bytes(plan['total'])}"
               + (f"; {plan['refused']}" if plan.get("refused") else "") + f"; report in {paths[1]}")
    fitting_ranks = [w for w in plan.get("world_sizes", []) if w["fits"]]
    if fitting_ranks:
        message += (f"\nas configured, it fits on {fitting_ranks[0]['world_size']} ranks "
                    f"({format_bytes(fitting_ranks[0]['total'])} each): --nproc-per-node {fitting_ranks[0]['world_size']}")
    if best and not plan["fits"]:  # the whole command, ready to paste
        message += f"\nwhat fits ({best['tokens_per_micro_batch']} tokens per micro-batch): {fitting_command(config, best)}"
    return {"dry_run": True, "fits": plan["fits"], "total": plan["total"], "report": str(paths[1]), "message": message}


def write_report(folder, report: dict) -> list[Path]:
    """Write the report's three forms into `folder`; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "memory.json", folder / "memory.md"]
    paths[0].write_text(json.dumps(report, separators=(",", ":"), default=str))  # compact: the timeline is long
    paths[1].write_text(markdown(report))
    png = plot_timeline(report, folder / "memory.png")
    return paths + ([png] if png else [])


# -- Markdown ------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    plan, config = report["plan"], report["config"]
    if plan is None:  # a run whose planning failed (no budget, so it trained anyway)
        return f"# Memory report: {describe(config)}\n\nNo plan.\n\n" + "\n".join(measured_only(report["measured"])) + "\n"
    lines = [f"# Memory {'plan' if report['kind'] == 'dry run' else 'report'}: {describe(config)}", ""]
    lines += verdict_lines(report) + [""]
    lines += [f"Step: {config['batch_size']} sequences x {config['seq_len']} tokens x {config['accumulate']} "
              f"micro-batches = {config['batch_size'] * config['seq_len'] * config['accumulate']} tokens per "
              f"logical step; activation checkpointing {'on' if config['activation_checkpointing'] else 'off'}; "
              f"loss {'in chunks of ' + str(config['loss_chunk_tokens']) + ' tokens' if config['loss_chunk_tokens'] else 'unchunked'}.",
              f"Simulation: {plan['simulated'].get('method', '')}; {plan['simulated']['logical_steps']} logical steps "
              f"of {plan['simulated']['micro_batches_per_step']} micro-batches on fake tensors "
              f"({plan['simulated']['seconds']} s).", ""]
    lines += breakdown_table(plan, report.get("budget"))
    if report.get("measured"):
        lines += [""] + measured_lines(report)
    source = report.get("measured") or plan
    lines += [""] + phase_table(source["timeline"], source["peak"]["step"])
    if plan.get("search"):
        lines += [""] + search_table(plan["search"])
    if plan.get("world_sizes"):
        lines += [""] + world_size_table(plan["world_sizes"])
    return "\n".join(lines) + "\n"


def describe(config: dict) -> str:
    method = config["method"] + (f" rank {config['rank']}" if config["method"] != "adamw" else "")
    text = f"{config['model']}, {method}, {config['states']} states, {config['dtype']} weights"
    if config.get("parallel") == "fsdp":
        text += f", one of {config.get('world_size') or 'the launch’s'} FSDP2 ranks (weights, gradients, states sharded)"
    return text


def world_size_table(tried: list[dict]) -> list[str]:
    rows = ["## More ranks: the configuration as given, per rank", "", "| ranks | needs per rank | fits |",
            "|---:|---:|---|"]
    rows += [f"| {w['world_size']} | {w['total'] / 1e9:.2f} GB | {'yes' if w['fits'] else 'no'} |" for w in tried]
    return rows


def verdict_lines(report: dict) -> list[str]:
    plan, budget = report["plan"], report.get("budget")
    what = "Dry run (nothing allocated)" if report["kind"] == "dry run" else "Training run"
    target = f"planned for {plan['target']}"
    if budget is None:
        return [f"{what}, {target}, no budget: needs **{format_bytes(plan['total'])}**."]
    fits = "fits" if plan["fits"] else "does NOT fit"
    line = (f"{what}, {target}, budget {budget['text']} = {format_bytes(budget['bytes'])}: **{fits}**, "
            f"needs {format_bytes(plan['total'])} ({plan['total'] / budget['bytes']:.0%} of the budget).")
    if plan["target"] == "cpu":
        line += " On CPU the budget applies to tracked tensor bytes."
    return [line] + ([f"Refused: {plan['refused']}."] if plan.get("refused") else [])


def breakdown_table(plan: dict, budget: dict | None) -> list[str]:
    peak = plan["peak"]
    where = f"{peak['phase']}, step {peak['step']}, micro-batch {peak['micro']}"
    whole = budget["bytes"] if budget else plan["total"]
    unit = units_for(whole)
    rows = [f"## Breakdown at the peak ({where})", "",
            f"| | {unit[0]} | {unit[2]} | share | what |", "|---|---:|---:|---:|---|"]
    for line in plan["categories"]:
        rows.append(row(line["label"], line["bytes"], whole, line["note"], unit))
    rows.append(row("**tensor peak**", plan["tensor_peak"], whole, "what the tracker counts", unit))
    for line in plan["overheads"]:
        rows.append(row(line["label"], line["bytes"], whole, line["note"], unit))
    rows.append(row("**total**", plan["total"], whole, "the figure compared with the budget", unit))
    if plan.get("host_bytes"):
        rows.append(row("host RAM", plan["host_bytes"], whole, "accumulation buffers in host RAM "
                        "(--offload-accumulation): not device memory, not in the total", unit))
    rows += ["", "Largest value of each category at any moment: " +
             ", ".join(f"{c} {plan['max_by_category'].get(c, 0) / unit[1]:.3f} {unit[0]}" for c in CATEGORIES) + "."]
    return rows


def units_for(size: float) -> tuple:
    """GB/GiB columns for large figures, MB/MiB for small models."""
    return ("GB", 1e9, "GiB", 2**30) if size >= 1e9 else ("MB", 1e6, "MiB", 2**20)


def row(label, size, whole, note, unit) -> str:
    return (f"| {label} | {size / unit[1]:.3f} | {size / unit[3]:.3f} | {size / whole:.1%} | {note} |")


def phase_table(timeline: list[dict], step: int = 0) -> list[str]:
    """The phases of one logical step that a reader needs: forward ends, loss, the start of
    backward, the five highest hooks, and the peak of each micro-batch."""
    records = [r for r in timeline if r["step"] == step] or [r for r in timeline if r["step"] == 0]
    if not records:
        return []
    step = records[0]["step"]
    chosen = {}
    for micro in sorted({r["micro"] for r in records}):
        mine = [r for r in records if r["micro"] == micro]
        forward = [r for r in mine if r["phase"].startswith("forward")]
        hooks = sorted((r for r in mine if r["phase"].startswith("hook")), key=lambda r: -r["peak"])
        picks = forward[:1] + forward[-2:] + [r for r in mine if r["phase"] == "backward"] + hooks[:5]
        picks.append(max(mine, key=lambda r: r["peak"]))
        for r in picks:
            chosen[id(r)] = r
    unit = units_for(max(r["peak"] for r in records))
    rows = [f"## Phases of step {step} (peak bytes within each phase)", "",
            f"| micro-batch | phase | peak {unit[0]} | largest categories ({unit[0]}) |", "|---:|---|---:|---|"]
    for r in sorted(chosen.values(), key=lambda r: records.index(r)):
        top = sorted(r["at_peak"].items(), key=lambda kv: -kv[1])[:3]
        rows.append(f"| {r['micro']} | {r['phase']} | {r['peak'] / unit[1]:.3f} | "
                    + ", ".join(f"{c} {b / unit[1]:.2f}" for c, b in top) + " |")
    return rows


def search_table(search: dict) -> list[str]:
    rows = ["## Search: the most tokens per micro-batch that fit", "",
            f"Logical step: {search['sequences_per_step']} sequences. Candidates {search['method']}.", "",
            "| setting | same math | largest micro-batch | tokens / micro-batch | needs at 1 sequence | flags |",
            "|---|---|---:|---:|---:|---|"]
    for r in search["rungs"]:
        rows.append(f"| {r['name']} | {'yes' if r['exact'] else 'no'} | {r['max_batch_size']} | "
                    f"{r.get('tokens_per_micro_batch', '')} | {r['min_budget'] / 1e9:.2f} GB | `{flags_of(r)}` |")
    best = search.get("best")
    rows += ["", f"Best: `{flags_of(best)}`" if best else "Nothing in the search space fits."]
    return rows


def measured_lines(report: dict) -> list[str]:
    plan, measured = report["plan"], report["measured"]
    unit = units_for(plan["total"])
    rows = ["## Planned vs measured", "",
            f"| | planned {unit[0]} | measured {unit[0]} | measured / planned |", "|---|---:|---:|---:|"]
    for line in plan["categories"]:
        got = measured["peak"]["by_category"].get(line["label"], 0)
        rows.append(ratio_row(line["label"] + " (at the peak)", line["bytes"], got, unit))
    rows.append(ratio_row("**tensor peak**", plan["tensor_peak"], measured["peak"]["total"], unit))
    if plan.get("host_bytes"):
        rows.append(ratio_row("host RAM (accumulation buffers)", plan["host_bytes"], measured.get("host_peak", 0), unit))
    device = measured.get("cuda")
    if device:
        rows.append(ratio_row("allocator peak (reserved)", plan["total"] - overhead(plan, "CUDA context"),
                              device["reserved_peak"], unit))
        if device.get("nvml_peak"):
            rows.append(ratio_row("process on the device (NVML)", plan["total"], device["nvml_peak"], unit))
        rows += ["", f"Device: {device['name']}; CUDA context measured at {format_bytes(device['context'])}; "
                     f"allocator capped at {format_bytes(device['cap'])}." if device.get("cap") else
                 f"Device: {device['name']}."]
    rows += ["", f"Measured over {len(measured['step_peaks'])} logical steps "
                 f"(the timeline covers the first {measured['timeline_steps']})."]
    return rows


def measured_only(measured: dict) -> list[str]:
    peak = measured["peak"]
    unit = units_for(peak["total"])
    rows = [f"## Measured peak ({peak['phase']}, step {peak['step']})", "", f"| | {unit[0]} |", "|---|---:|"]
    rows += [f"| {c} | {peak['by_category'].get(c, 0) / unit[1]:.3f} |" for c in CATEGORIES]
    return rows + [f"| **tensor peak** | {peak['total'] / unit[1]:.3f} |"]


def ratio_row(label, planned, measured, unit) -> str:
    ratio = f"{measured / planned:.3f}" if planned else "-"
    return f"| {label} | {planned / unit[1]:.3f} | {measured / unit[1]:.3f} | {ratio} |"


def overhead(plan: dict, label: str) -> int:
    return next((o["bytes"] for o in plan["overheads"] if o["label"] == label), 0)


# -- the plot ------------------------------------------------------------------------------------
def plot_timeline(report: dict, path: Path) -> Path | None:
    """Stacked bytes by category at each phase's peak (measured when there is a measurement);
    None when matplotlib is not installed (pip install streamtrain[plot])."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    source = report.get("measured") or report["plan"]
    if source is None:
        return None
    timeline = source["timeline"]
    if not timeline:
        return None
    unit = units_for(max([r["peak"] for r in timeline] + [(report.get("budget") or {}).get("bytes", 0)]))
    x = range(len(timeline))
    stacks = [[r["at_peak"].get(c, 0) / unit[1] for r in timeline] for c in CATEGORIES]
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.stackplot(x, *stacks, labels=CATEGORIES, colors=[COLORS[c] for c in CATEGORIES], step="post")
    if report.get("budget"):
        ax.axhline(report["budget"]["bytes"] / unit[1], color="black", linestyle="--", label="budget (device total)")
        if report["plan"]:  # what is left for tensors once the device's own overheads are paid
            room = report["budget"]["bytes"] - (report["plan"]["total"] - report["plan"]["tensor_peak"])
            ax.axhline(room / unit[1], color="black", linestyle=":", label="budget minus device overheads")
    starts = [i for i, r in enumerate(timeline) if r["phase"] == "forward embed"]
    for i in starts:
        ax.axvline(i, color="grey", linewidth=0.5)
    ax.set_xlabel("phase (forward blocks, backward, each parameter's hook); grey lines: micro-batch starts")
    ax.set_ylabel(f"{unit[0]} at the phase's peak")
    ax.set_title(f"{'Planned' if source is report['plan'] else 'Measured'} memory: {describe(report['config'])}")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
