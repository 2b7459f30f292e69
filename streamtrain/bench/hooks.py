"""Hook overhead alone: per-parameter updates on a model whose matmuls cost next to nothing.

The model is a stack of `layers` tiny Linear(width, width) layers (2 x layers parameter tensors of
a few hundred elements each), so a step's time is autograd's plus whatever runs per hook. Four
variants train their own copy (same seed, input and learning rate) with a plain loss.backward():

    backward-only      no hooks; gradients set to None after backward (the reference)
    bare-hook          a post-accumulate-grad hook that only frees the gradient (the floor of any hook)
    torch-fused-hooks  torch.optim.AdamW(fused=True) per parameter, stepped in its hook
    engine-adamw       the streamtrain Engine with its AdamW rule on every parameter

Rounds visit the variants in turn, so a drift in the machine's load falls on all of them. A
variant's cost per hook is (its median step - backward-only's median step) / hooks per step.
Engine and fused AdamW do the same math, so their weights must agree at the end (reported).
"""
import statistics
import time

import torch
from torch import nn

from ..engine import Engine
from ..methods import assign_rules

VARIANTS = ("backward-only", "bare-hook", "torch-fused-hooks", "engine-adamw")
LR = 1e-3


def tiny_linears(layers: int, width: int, seed: int = 0, device="cpu") -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())]
        return nn.Sequential(*blocks).to(device)


class Variant:
    """One way of updating `model`: step(x) runs forward, backward and (inside it) the updates."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model, self.handles, self.engine = name, model, [], None
        params = list(model.parameters())
        if name == "bare-hook":
            self.handles = [p.register_post_accumulate_grad_hook(free_grad) for p in params]
        elif name == "torch-fused-hooks":
            optimizers = {p: torch.optim.AdamW([p], lr=LR, weight_decay=0.0, fused=True) for p in params}
            self.handles = [p.register_post_accumulate_grad_hook(fused_step(optimizers[p])) for p in params]
        elif name == "engine-adamw":
            self.engine = Engine(model, assign_rules(model, "adamw"), lr=LR).attach()
        elif name != "backward-only":
            raise ValueError(f"unknown hook-overhead variant {name!r}; choose one of {VARIANTS}")

    def step(self, x: torch.Tensor) -> None:
        self.model(x).square().mean().backward()
        if self.name == "backward-only":
            self.model.zero_grad(set_to_none=True)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.engine is not None:
            self.engine.detach()


def free_grad(param) -> None:
    param.grad = None


def fused_step(optimizer):
    def hook(param):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return hook


def time_steps(variant: Variant, x, steps: int, device) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each of `steps` steps."""
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        variant.step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def hook_overhead(layers: int = 200, width: int = 16, batch: int = 4, steps: int = 10, rounds: int = 3,
                  warmup: int = 3, device: str = "cpu", variants=VARIANTS) -> dict:
    """Median step time and microseconds per hook call of each variant, and the engine's ratios."""
    device = torch.device(device)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1)).to(device)
    runs = [Variant(name, tiny_linears(layers, width, device=device)) for name in variants]
    times = {v.name: [] for v in runs}
    for v in runs:
        time_steps(v, x, warmup, device)
    for _ in range(rounds):
        for v in runs:
            times[v.name] += time_steps(v, x, steps, device)
    hooks = sum(1 for _ in runs[0].model.parameters())
    result = {"layers": layers, "width": width, "batch": batch, "hooks_per_step": hooks,
              "timed_steps": steps * rounds, "device": device.type,
              "variants": variant_figures(times, hooks)}
    result.update(engine_ratios(result["variants"]))
    result["engine_vs_fused_max_weight_diff"] = weight_difference(runs, "engine-adamw", "torch-fused-hooks")
    for v in runs:
        v.close()
    return result


def variant_figures(times: dict, hooks: int) -> dict:
    medians = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
               for name, t in times.items()}
    reference = medians.get("backward-only")
    figures = {}
    for name, (wall, cpu) in medians.items():
        figures[name] = {"median_step_s": wall, "median_step_cpu_s": cpu}
        if reference is not None:
            figures[name]["us_per_hook"] = (wall - reference[0]) / hooks * 1e6
            figures[name]["us_per_hook_cpu"] = (cpu - reference[1]) / hooks * 1e6
    return figures


def engine_ratios(figures: dict) -> dict:
    """engine / torch-fused-hooks, in wall and CPU time: the step, the cost per hook (above
    backward-only) and the cost per hook above the bare hook's floor."""
    engine, fused, bare = (figures.get(n) for n in ("engine-adamw", "torch-fused-hooks", "bare-hook"))
    if not engine or not fused:
        return {}
    ratios = {}
    for clock in ("", "_cpu"):
        ratios[f"engine_vs_fused_step{clock}"] = safe_ratio(engine[f"median_step{clock}_s"],
                                                            fused[f"median_step{clock}_s"])
        per_hook = f"us_per_hook{clock}"
        if per_hook in engine:
            ratios[f"engine_vs_fused_per_hook{clock}"] = safe_ratio(engine[per_hook], fused[per_hook])
        if per_hook in engine and bare:
            ratios[f"engine_vs_fused_above_floor{clock}"] = safe_ratio(engine[per_hook] - bare[per_hook],
                                                                       fused[per_hook] - bare[per_hook])
    return ratios


def safe_ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def weight_difference(runs: list[Variant], a: str, b: str) -> float | None:
    models = {v.name: v.model for v in runs}
    if a not in models or b not in models:
        return None
    pairs = zip(models[a].parameters(), models[b].parameters())
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)
