"""The memory planner: run the real model, engine and rules on fake tensors, then fit a budget.

A plan is a simulation, not a formula. The model is built on the meta device, its parameters are
materialised as fake CPU tensors, and the same `prepare_model` / `build_engine` the Trainer uses
run two logical steps under `FakeTensorMode` with the MemoryTracker counting every tensor. The
tensor peak (by category, with the phase that set it) plus the device's own overheads (device.py)
is the plan. Micro-batches 2..k-1 of a logical step repeat micro-batch 1 (same buffers, same
temporaries), so k is simulated as min(k, 2).

Depth. Fake tensors cost ~0.2-0.5 ms per op, so 32 layers x 2 steps of llama-7b take ~30-60 s.
Every per-layer quantity (weights, states, bases, buffers, saved activations) is linear in the
number of identical layers, so a model deeper than 4 layers is simulated at 2 and 3 layers (a
sharded one, deeper than 5, at 3 and 4: see SHARDED_SHALLOW_LAYERS) and
each phase's bytes are extrapolated to the full depth; phases of the middle layers lie between
those of the bottom and the top layer, which are kept. This is exact (the tests compare it with
a full-depth simulation); `full_depth=True` (--plan-full-depth) simulates every layer instead.

The search varies the knobs for the most tokens per micro-batch that fit: micro-batch size,
chunked loss, activation checkpointing and (for a GPU) accumulation buffers in host RAM (the same
math), then bf16 weights (with stochastic rounding: half the weight bytes, the usual setting for
large models), INT8 weights (half again), state precision, projector precision (GaLore's bases
in INT8, then INT4) and rank (not the same math, tried only when needed, in that order; the
search stops at the first that fits, or, when no exact setting fits, at the first that keeps the
configured micro-batch). Each candidate is simulated at two micro-batch sizes for one logical
step; each phase's bytes are affine in the micro-batch size, which gives the largest one that fits.
"""
import contextlib
import math
import re
import time
from dataclasses import replace

import psutil
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import TrainConfig, command_line
from ..models.hf_config import uniform_layers, with_layers
from ..recipe import build_run_model, model_config_of, prepare_model, sync_structure
from ..optim.lowbit_basis import PROJECTOR_PRECISIONS
from ..optim.state import PRECISIONS
from .device import communication_lines, overhead_lines, svd_workspace_bytes
from .sharded_plan import SHARDED_SHALLOW_LAYERS, bucket_ranks, sharded_world, simulated_engine, world_size_search
from .tracker import CATEGORIES, MemoryTracker
from .units import format_bytes, parse_bytes

SIMULATED_STEPS = 2
SHALLOW_LAYERS = (2, 3)
SEARCH_LOSS_CHUNK = 1024       # tokens per loss chunk when the search turns chunking on
LOW_RANK_METHODS = ("galore", "adarankgrad", "lora", "relora")
PROJECTOR_METHODS = ("galore", "adarankgrad")
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")  # the search's order: each saves memory over the one before
WEIGHT_NAMES = {"bfloat16": "bf16", "int8": "int8"}
CATEGORY_NOTES = {
    "weights": "parameters (and adapters; INT8 layers: codes + group scales)",
    "gradients": "full gradients in flight + accumulation buffers",
    "optimizer_states": "Adam moments (and their 8-bit scales)",
    "projectors": "GaLore bases (the weight dtype, bf16 for INT8 weights, or INT8/INT4 codes + scales)",
    "activations": "saved for backward (recomputed blocks included)",
    "loss": "final norm, logits, fp32 upcast, cross-entropy",
    "temporaries": "backward and update-rule scratch",
}


class PlanRefused(ValueError):
    """The run does not fit its budget; the message names the smallest budget that would."""


def plan_target(config: TrainConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_offload(config: TrainConfig, target: str) -> None:
    """Offloaded accumulation buffers are planned as host RAM, which only means something beside a GPU."""
    if config.offload_accumulation and target != "cuda":
        raise ValueError("--offload-accumulation: this run is on CPU, where host RAM is the device memory; "
                         "drop the flag (or plan for a GPU with --device cuda --dry-run)")


# -- one simulation ------------------------------------------------------------------------------
def simulate(config: TrainConfig, model_config=None, *, steps: int = SIMULATED_STEPS, round_to: int = 1,
             fake: bool = True) -> dict:
    """`steps` logical steps of `config` on fake tensors; the tracker's summary plus timing.
    fake=False runs the very same steps on real CPU tensors (what the planner is tested against)."""
    from ..optim.quant8 import code_map
    started = time.perf_counter()
    model_config = model_config or model_config_of(config)
    config = replace(config, accumulate=min(config.accumulate, 2))
    for signed in (True, False):  # real, cached constant tables: a fake one must never be cached
        code_map(signed, "cpu")
    model = build_run_model(config, "meta" if fake else "cpu", model_config)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        mode.cache_enabled = False  # its cache costs more than it saves on these op mixes
    tracker = MemoryTracker(round_to=round_to, timeline_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    with sharded_world(config, fake) as mesh, mode:
        if fake:
            materialize(model)
        prepare_model(model, config)
        engine = simulated_engine(model, config, mesh, fake)
        sync_structure(engine)
        with tracker:
            tracker.watch(model, engine)
            for _ in range(steps * config.accumulate):
                shape = (config.batch_size, config.seq_len)
                inputs = torch.randint(0, model_config.vocab_size, shape, generator=None if fake else generator)
                targets = torch.randint(0, model_config.vocab_size, shape, generator=None if fake else generator)
                engine.backward(model(inputs, targets))
            tracker.unwatch()
    summary = tracker.summary()
    summary["simulated"] = {"layers": model_config.num_hidden_layers, "logical_steps": steps,
                            "micro_batches_per_step": config.accumulate, "fake": fake,
                            "seconds": round(time.perf_counter() - started, 2)}
    return summary


def materialize(model: nn.Module) -> None:
    """Replace meta parameters and buffers by (fake, under FakeTensorMode) CPU tensors; a
    parameter shared by two modules (a tied head) stays one parameter. Strides and attributes are
    kept: an INT8 layer's gradient handle (models/int8.py) stays one element with its storage link."""
    made = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype),
                                               requires_grad=p.requires_grad)
                    made[id(p)].__dict__.update(p.__dict__)
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


# -- a plan --------------------------------------------------------------------------------------
def breakdown(target: str, peak: dict, timeline: list[dict], budget: int | None, world_size: int = 1) -> dict:
    """Category lines of the tensor peak, the device's overhead lines, the total and the verdict."""
    categories = [{"label": c, "bytes": int(peak["by_category"].get(c, 0)), "note": CATEGORY_NOTES[c]}
                  for c in CATEGORIES]
    overheads = (overhead_lines(target, peak, svd_extra(timeline, peak["total"]))
                 + communication_lines(world_size, peak["by_category"].get("weights", 0)))
    total = peak["total"] + sum(o["bytes"] for o in overheads)
    return {"categories": categories, "overheads": overheads, "tensor_peak": peak["total"],
            "total": total, "fits": budget is None or total <= budget}


def plan_config(config: TrainConfig, target: str | None = None, budget: int | None = None,
                full_depth: bool = False) -> dict:
    """The plan of `config` exactly as given: simulated at full depth when asked (or when the
    model is shallow anyway), else at 2 and 3 layers (3 and 4 sharded) and extrapolated phase by phase."""
    target = target or plan_target(config)
    model_config = model_config_of(config)
    depth = model_config.num_hidden_layers
    round_to = 512 if target == "cuda" else 1
    if full_depth or not extrapolates(model_config, config):
        summary = simulate(config, model_config, round_to=round_to)
        summary["simulated"]["method"] = f"all {depth} layers simulated"
    else:
        shallow = {L: simulate(config, with_layers(model_config, L), round_to=round_to)
                   for L in shallow_layers(config)}
        summary = extrapolate_summary(shallow, depth)
    return {"target": target, "budget": budget, "peak": summary["peak"],
            **breakdown(target, summary["peak"], summary["timeline"], budget, bucket_ranks(config)),
            "max_by_category": summary["max_by_category"], "host_bytes": summary["host_peak"],
            "step_peaks": summary["step_peaks"],
            "timeline": summary["timeline"], "simulated": summary["simulated"]}


def plan_run(config: TrainConfig, *, search: bool = False, full_depth: bool = False) -> dict:
    """Plan `config` for its budget (if any); nothing real is allocated. Raises PlanRefused when
    nothing in the search space fits; otherwise returns the plan, with the search's candidates
    when `search` is set or the configuration as given does not fit."""
    target = plan_target(config)
    check_offload(config, target)
    budget = parse_bytes(config.budget) if config.budget else None
    if budget is not None:  # cheap (one step, one sequence, shallow): refuse a hopeless budget first
        hopeless = frugal_check(config, target, budget)
        if hopeless is not None:
            raise PlanRefused(hopeless)
    plan = plan_config(config, target, budget, full_depth)
    if budget is not None and (search or not plan["fits"]):
        plan["search"] = search_knobs(config, target, budget)
    if budget is not None and not plan["fits"] and config.parallel == "fsdp":
        plan["world_sizes"] = world_size_search(config, target, budget)
    return plan


# -- extrapolation in depth ----------------------------------------------------------------------
def shallow_layers(config: TrainConfig) -> tuple[int, int]:
    """The two depths a deep model is simulated at."""
    return SHARDED_SHALLOW_LAYERS if config.parallel == "fsdp" else SHALLOW_LAYERS


def extrapolates(model_config, config: TrainConfig) -> bool:
    """Deep enough to gain from shallow simulations, with blocks that are all alike (a model with
    per-layer attention types is simulated at full depth)."""
    return model_config.num_hidden_layers > max(shallow_layers(config)) + 1 and uniform_layers(model_config)


def extrapolate_summary(shallow: dict, depth: int) -> dict:
    """A tracker summary at `depth` layers from summaries at the two SHALLOW_LAYERS depths: each
    phase's bytes by category, each category's maximum and the allocator rounding, linear in the
    layer count. The timeline keeps the bottom and top layer's phases (the middle ones lie between)."""
    layers = tuple(sorted(shallow))
    low, high = (shallow[L] for L in layers)
    tables = {L: phase_table(shallow[L]["timeline"], L) for L in layers}
    timeline = []
    for key in tables[layers[1]]:
        if key in tables[layers[0]]:
            at_peak = linear_in_depth(*(tables[L][key]["at_peak"] for L in layers), depth, layers)
            record = {"step": key[0], "micro": key[1], "phase": key[2], "peak": sum(at_peak.values()),
                      "at_peak": at_peak}
            if "svd" in tables[layers[1]][key]:  # matrix shapes do not change with depth
                record["svd"] = tables[layers[1]][key]["svd"]
            timeline.append(record)
    top = max(timeline, key=lambda r: r["peak"])
    rounding = linear_in_depth({"r": low["peak"]["rounded_total"] - low["peak"]["total"]},
                               {"r": high["peak"]["rounded_total"] - high["peak"]["total"]}, depth, layers)["r"]
    peak = {"total": top["peak"], "rounded_total": top["peak"] + rounding, "phase": top["phase"],
            "step": top["step"], "micro": top["micro"], "by_category": top["at_peak"]}
    step_peaks = []
    for step in sorted({r["step"] for r in timeline}):
        best = max((r for r in timeline if r["step"] == step), key=lambda r: r["peak"])
        step_peaks.append({"step": step, "total": best["peak"], "phase": best["phase"], "micro": best["micro"],
                           "by_category": best["at_peak"]})
    simulated = {**high["simulated"], "layers": depth, "seconds": low["simulated"]["seconds"] + high["simulated"]["seconds"],
                 "method": f"simulated at {layers[0]} and {layers[1]} layers, extrapolated "
                           f"per phase to {depth} (exact: every per-layer quantity is linear in depth)"}
    return {"peak": peak, "timeline": timeline, "step_peaks": step_peaks,
            "max_by_category": linear_in_depth(low["max_by_category"], high["max_by_category"], depth, layers),
            "host_peak": linear_in_depth({"host": low["host_peak"]}, {"host": high["host_peak"]}, depth,
                                         layers)["host"],
            "simulated": simulated}


def linear_in_depth(low: dict, high: dict, depth: int, layers: tuple[int, int] = SHALLOW_LAYERS) -> dict:
    """Per-key bytes at `depth` layers from the values at the two shallow depths `layers`."""
    (l0, l1), keys = layers, set(low) | set(high)
    return {k: max(0, round(low.get(k, 0) + (depth - l0) * (high.get(k, 0) - low.get(k, 0)) / (l1 - l0)))
            for k in keys}


def plan_before_training(config: TrainConfig) -> dict | None:
    """What the Trainer runs before allocating anything. With a budget: the plan, or PlanRefused
    naming what would fit. Without one the plan is only for the report, so a configuration the
    planner cannot simulate trains anyway (None)."""
    try:
        plan = plan_run(config, full_depth=config.plan_full_depth)
    except PlanRefused:
        raise
    except Exception as e:  # noqa: BLE001 -- a planner limitation must not block an unbudgeted run
        if config.budget:
            raise PlanRefused(f"--budget needs a memory plan, and planning failed ({type(e).__name__}: {e}); "
                              "run without --budget") from e
        return None
    if not plan["fits"]:
        raise PlanRefused(refusal_message(config, plan))
    free = psutil.virtual_memory().available
    if plan["host_bytes"] > free:
        raise PlanRefused(f"--offload-accumulation keeps {format_bytes(plan['host_bytes'])} of accumulation "
                          f"buffers in host RAM but only {format_bytes(free)} is available; free host memory "
                          "or drop the flag")
    return plan


def refusal_message(config: TrainConfig, plan: dict) -> str:
    """One line: what the run needs, what the budget is, and what would fit instead."""
    need = format_bytes(plan["total"])
    message = (f"{config.model} with these settings needs {need} but --budget {config.budget} is "
               f"{format_bytes(plan['budget'])}")
    best = (plan.get("search") or {}).get("best")
    if best is not None:
        message += (f"; what fits ({best['tokens_per_micro_batch']} tokens per micro-batch): "
                    f"{fitting_command(config, best)}")
    return message + f"; or raise --budget to at least {format_bytes(plan['total'])}"


# -- the search ----------------------------------------------------------------------------------
def ladder(config: TrainConfig, target: str) -> list[dict]:
    """Cumulative memory-saving changes, least intrusive first. 'exact' rungs keep the math
    (offloading accumulation buffers to host RAM too: it costs copies, not precision)."""
    rungs, changes = [{"name": "as configured", "changes": {}, "exact": True}], {}
    if not config.loss_chunk_tokens:
        changes = {**changes, "loss_chunk_tokens": SEARCH_LOSS_CHUNK}
        rungs.append({"name": "+ chunked loss", "changes": changes, "exact": True})
    if not config.activation_checkpointing:
        changes = {**changes, "activation_checkpointing": True}
        rungs.append({"name": "+ activation checkpointing", "changes": changes, "exact": True})
    if target == "cuda" and not config.offload_accumulation and config.batch_size * config.accumulate > 1:
        changes = {**changes, "offload_accumulation": True}
        rungs.append({"name": "+ accumulation buffers in host RAM", "changes": changes, "exact": True})
    sharded = config.parallel == "fsdp"  # INT8 weights and low-bit bases are not sharded (config.py)
    for dtype in WEIGHT_DTYPES[WEIGHT_DTYPES.index(config.dtype) + 1:]:
        if sharded and dtype == "int8":
            break
        changes = {**changes, "dtype": dtype}
        rungs.append({"name": f"+ {WEIGHT_NAMES[dtype]} weights", "changes": changes, "exact": False})
    for precision in PRECISIONS[PRECISIONS.index(config.states) + 1:]:
        changes = {**changes, "states": precision}
        rungs.append({"name": f"+ {precision} states", "changes": changes, "exact": False})
    if config.method in PROJECTOR_METHODS and not sharded:
        for precision in PROJECTOR_PRECISIONS[PROJECTOR_PRECISIONS.index(config.projector_precision) + 1:]:
            changes = {**changes, "projector_precision": precision}
            rungs.append({"name": f"+ {precision} projectors", "changes": changes, "exact": False})
    if config.method in LOW_RANK_METHODS:
        for divisor in (2, 4, 8):
            if config.rank // divisor >= 8:
                changes = {**changes, "rank": config.rank // divisor}
                rungs.append({"name": f"+ rank {config.rank // divisor}", "changes": changes, "exact": False})
    return rungs


def frugal_check(config: TrainConfig, target: str, budget: int) -> str | None:
    """A quick refusal: the most frugal setting at one sequence per micro-batch. Returns the
    refusal message when even that does not fit, else None."""
    rung = ladder(config, target)[-1]
    fit = fit_rung(config, rung, target, budget, batch_sizes=(1,))
    if fit["min_budget"] <= budget:
        return None
    return (f"nothing fits in --budget {config.budget} = {format_bytes(budget)}: {config.model} needs at "
            f"least {format_bytes(fit['min_budget'])} even with {flags_of(fit)} (1 sequence per "
            f"micro-batch); raise --budget to at least {format_bytes(fit['min_budget'])}")


def search_knobs(config: TrainConfig, target: str, budget: int) -> dict:
    """Walk the ladder; for each rung the largest micro-batch that fits (extrapolated). Stops at
    the first rung that holds a whole logical step; past the exact rungs, at the first inexact
    rung that fits (when an exact one fits: it stays the answer) or else that keeps the configured
    micro-batch, so the math changes only as far as that micro-batch needs (when none keeps it:
    the inexact rung with the largest micro-batch, the earliest of equals)."""
    cap = config.batch_size * config.accumulate  # sequences per logical step
    wanted = min(cap, config.batch_size)          # the micro-batch inexact rungs try to keep
    results = []
    for rung in ladder(config, target):
        fit = fit_rung(config, rung, target, budget, cap=cap)
        results.append(fit)
        exact_fits = any(r["exact"] and r["max_batch_size"] >= 1 for r in results)
        if fit["max_batch_size"] >= cap or (not rung["exact"] and fit["max_batch_size"] >= (1 if exact_fits else wanted)):
            break
    fitting = [r for r in results if r["max_batch_size"] >= 1]
    exact = [r for r in fitting if r["exact"]]
    best = max(exact or fitting, key=lambda r: r["max_batch_size"]) if fitting else None
    return {"rungs": results, "best": best, "sequences_per_step": cap,
            "method": f"simulated at {' and '.join(map(str, shallow_layers(config)))} layers and two micro-batch "
                      "sizes, extrapolated per phase"}


def fit_rung(config, rung, target, budget, *, cap: int = 1, batch_sizes=None) -> dict:
    """The largest micro-batch (<= cap) of `rung` that fits `budget`, from shallow simulations at
    two micro-batch sizes: each phase's device total is affine in the micro-batch size. A rung
    whose first size is one sequence and does not fit needs no second simulation."""
    trial = replace(config, **rung["changes"], accumulate=2 if cap > 1 or config.accumulate > 1 else 1)
    model_config = model_config_of(config)
    if batch_sizes is None:  # the loss in two chunks or more, as at the answer: one chunk is no chunking,
        # and the step from one chunk to two is steeper than any later one (LLaMA-7B: 1.7x), which
        # would extrapolate the backward phase 0.85 GB high at 16 sequences
        first = max(1, 2 * math.ceil(trial.loss_chunk_tokens / trial.seq_len)) if trial.loss_chunk_tokens else 1
        batch_sizes = (first, 2 * first)
    totals = {key: [total] for key, total in phase_totals(trial, model_config, target, batch_sizes[0]).items()}
    if batch_sizes[0] == 1 and max(t[0] for t in totals.values()) > budget:
        batch_sizes = batch_sizes[:1]  # not even one sequence fits: the answer is 0 either way
    for B in batch_sizes[1:]:
        for key, total in phase_totals(trial, model_config, target, B).items():
            totals.setdefault(key, []).append(total)
    totals = {k: v for k, v in totals.items() if len(v) == len(batch_sizes)}
    result = {"name": rung["name"], "exact": rung["exact"], "changes": rung["changes"], "budget": budget}

    def needs(B):  # device total at micro-batch B: the largest phase
        return max(interpolate(batch_sizes, t, B) for t in totals.values())

    result["min_budget"] = int(needs(1))
    if len(batch_sizes) == 1:
        return whole_step_fit(config, trial, target, budget, cap,
                              {**result, "max_batch_size": 1 if result["min_budget"] <= budget else 0})
    largest = largest_fitting(lambda B: needs(B) <= budget, cap)
    best = dividing(largest, cap)
    if best >= cap and result["changes"].get("offload_accumulation"):  # one micro-batch a step: no buffers
        result["changes"] = {k: v for k, v in result["changes"].items() if k != "offload_accumulation"}
    result.update(largest_fitting=largest, max_batch_size=best, tokens_per_micro_batch=best * config.seq_len,
                  accumulate=max(1, round(cap / best)) if best else None,
                  predicted_total=int(needs(best)) if best else None)
    return whole_step_fit(config, trial, target, budget, cap, result)


def whole_step_fit(config, trial, target, budget: int, cap: int, result: dict) -> dict:
    """A configured step of one micro-batch (--accumulate 1) has no accumulation buffers, which the
    rung's line carries (it is simulated with two micro-batches a step, for the smaller micro-batches
    it may answer): when the line falls short of the step, the step itself is simulated."""
    if config.accumulate != 1 or result["max_batch_size"] >= cap:
        return result
    total = max(phase_totals(replace(trial, accumulate=1), model_config_of(config), target, cap).values())
    if total > budget:
        return result
    changes = {k: v for k, v in result["changes"].items() if k != "offload_accumulation"}
    return {**result, "changes": changes, "largest_fitting": cap, "max_batch_size": cap,
            "tokens_per_micro_batch": cap * config.seq_len, "accumulate": 1, "predicted_total": int(total)}


def phase_totals(trial: TrainConfig, model_config, target: str, batch_size: int) -> dict:
    """{(step, micro, phase): device bytes} of one logical step of `trial` at `batch_size`
    (simulated at two shallow depths and extrapolated when the model is deep enough)."""
    depth = model_config.num_hidden_layers
    shallow = extrapolates(model_config, trial)
    runs = {L: simulate(replace(trial, batch_size=batch_size), with_layers(model_config, L), steps=1)
            for L in (shallow_layers(trial) if shallow else (depth,))}
    table = (extrapolate_summary(runs, depth) if shallow else runs[depth])["timeline"]
    world_size = bucket_ranks(trial)
    return {(r["step"], r["micro"], r["phase"]): device_total(target, r, world_size) for r in table}


def phase_table(timeline: list[dict], layers: int) -> dict:
    """{(step, micro, phase class): the timeline record}; the layer index in a
    phase name becomes 'bottom' or 'top' (middle layers are dropped: they lie between the two)."""
    table = {}
    for record in timeline:
        phase = phase_class(record["phase"], layers)
        if phase is None:
            continue
        key = (record["step"], record["micro"], phase)
        if key not in table or record["peak"] > table[key]["peak"]:
            table[key] = record
    return table


# the block index: the first numeric component of a parameter path (model.layers.3..., transformer.h.3...)
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|(?<=block )\d+")


def phase_class(phase: str, layers: int) -> str | None:
    match = _LAYER_INDEX.search(phase)
    if match is None:
        return phase
    index = int(match.group())
    where = "bottom" if index == 0 else "top" if index == layers - 1 else None
    return None if where is None else phase[:match.start()] + where + phase[match.end():]


def svd_extra(timeline: list[dict], tensor_peak: int) -> int | None:
    """How far the largest SVD's cuSOLVER workspace lifts the peak: over the phases that ran an
    SVD, (phase peak + workspace) - tensor peak, at least 0. None when no phase ran one."""
    needs = [r["peak"] + svd_workspace_bytes(r["svd"]) for r in timeline if r.get("svd")]
    return max(0, max(needs) - tensor_peak) if needs else None


def device_total(target: str, record: dict, world_size: int = 1) -> float:
    """A phase's bytes on the device: its tensor peak plus the overheads (and the SVD workspace
    if it ran an SVD, and the all-reduce buckets under data parallelism)."""
    tensors = sum(record["at_peak"].values())
    peak = {"total": tensors, "rounded_total": tensors, "by_category": record["at_peak"]}
    svd = svd_workspace_bytes(record["svd"]) if record.get("svd") else None
    lines = overhead_lines(target, peak, svd) + communication_lines(world_size, record["at_peak"].get("weights", 0))
    return tensors + sum(o["bytes"] for o in lines)


def interpolate(xs, ys, x):
    if len(xs) == 1:
        return ys[0]
    return ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])


def largest_fitting(fits, cap: int) -> int:
    """The largest B in [0, cap] with fits(B) (fits is monotone: more sequences, more bytes)."""
    if not fits(1):
        return 0
    low, high = 1, cap
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def dividing(batch_size: int, cap: int) -> int:
    """The largest micro-batch <= batch_size that divides the logical step evenly (when one exists
    above half of it), so accumulation reaches the same tokens per step."""
    for b in range(batch_size, max(0, batch_size // 2), -1):
        if cap % b == 0:
            return b
    return batch_size


def fitted_config(config: TrainConfig, fit: dict) -> TrainConfig:
    """`config` changed as a search result says: its rung's changes and micro-batch, with the
    accumulation that keeps the sequences per logical step."""
    return replace(config, **fit["changes"], batch_size=fit["max_batch_size"], accumulate=fit["accumulate"])


def fitting_command(config: TrainConfig, fit: dict) -> str:
    """The whole command line that trains the search result `fit` of `config`."""
    return command_line(fitted_config(config, fit))


def flags_of(fit: dict) -> str:
    """The command-line flags of a search result."""
    parts = []
    if "max_batch_size" in fit and fit.get("accumulate"):
        parts.append(f"--batch-size {fit['max_batch_size']} --accumulate {fit['accumulate']}")
    for key, value in fit["changes"].items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts) or "the configuration as given"
