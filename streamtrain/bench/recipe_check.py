"""`python -m streamtrain.bench.recipe_check`: a few real steps of a planned recipe, its measured
memory next to the plan; no checkpoint and no final weights.

Takes the flags of `python -m streamtrain.run` (the same TrainConfig). The run is planned (with
--budget: refused when the plan does not fit), trained for --steps with the allocator capped to
the budget, and writes into --out the memory report (memory.md/.json/.png: planned vs measured)
and recipe.json (step times, tokens/s, losses, the planned and measured peaks and their ratios).
Nothing else is written: a 7B checkpoint and its final weights are tens of GB and minutes of
I/O that a memory check does not need.

--cap-from-start caps the allocator to the budget before the model is built, as a card of the
budget's size would (the run itself caps it only when training starts).
"""
import argparse
import json
import statistics
import sys

import torch

from ..config import ConfigError, add_config_arguments, config_from_args
from ..memory.units import format_bytes, parse_bytes
from ..train import RunStopped
from .rows import Row
from .trainer import BenchTrainer


class RecipeTrainer(BenchTrainer):
    """BenchTrainer with Trainer's own memory profiler (the tracker over the first steps, the
    allocator cap, the budget check every step) and the memory report at the end."""

    def __init__(self, config):
        super().__init__(config, Row("recipe", "engine"), track_tensors=True)
        self.setup_peak = None
        if self.device.type == "cuda":
            # what building the model and the engine's states took (the model is made in fp32, then cast);
            # its freed blocks are released so that they do not count as training's
            self.setup_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.empty_cache()

    def finish(self) -> dict:
        summary = super().finish()
        print(f"memory report: {self.write_memory_report()}", flush=True)
        return self.write_result(summary)

    def write_result(self, summary: dict) -> dict:
        """recipe.json; also after a stop (over budget, out of memory), with the reason."""
        result = recipe_result(self, summary)
        (self.out / "recipe.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def recipe_result(trainer: RecipeTrainer, summary: dict) -> dict:
    """Step times, tokens/s, losses and the plan's totals next to what was measured."""
    config, plan, measured = trainer.config, trainer.plan or {}, trainer.profiler.measured()
    wall, _ = trainer.clock.step_times()
    tokens = config.batch_size * config.seq_len * config.accumulate
    later = wall[1:] or wall  # step 0 takes every matrix's first subspace
    result = {**summary, "step_s": wall, "tokens_per_step": tokens,
              "tokens_per_s_after_first": tokens / statistics.median(later) if later else None,
              "losses": [r["loss"] for r in trainer.history],
              "setup_peak_bytes": trainer.setup_peak, "planned_total_bytes": plan.get("total"),
              "planned_tensor_peak_bytes": plan.get("tensor_peak"),
              "measured_tensor_peak_bytes": measured.get("peak", {}).get("total")}
    cuda = measured.get("cuda")
    if cuda:
        device_total = max(cuda["reserved_peak"] + (cuda["context"] or 0), cuda.get("nvml_peak") or 0)
        result.update(device=cuda["name"], cuda_context_bytes=cuda["context"], allocator_cap_bytes=cuda["cap"],
                      cuda_allocated_peak_bytes=cuda["allocated_peak"], cuda_reserved_peak_bytes=cuda["reserved_peak"],
                      nvml_peak_bytes=cuda.get("nvml_peak"), measured_device_total_bytes=device_total)
    for key, (got, want) in {"tensor_peak_ratio": ("measured_tensor_peak_bytes", "planned_tensor_peak_bytes"),
                             "device_total_ratio": ("measured_device_total_bytes", "planned_total_bytes")}.items():
        if result.get(got) and result.get(want):
            result[key] = result[got] / result[want]
    return result


def write_memory_report_if_measured(trainer: RecipeTrainer) -> None:
    """The memory report of a stopped run (after a signal Trainer writes none), when at least
    one step was measured."""
    if trainer.engine.step > 0:
        trainer.write_memory_report()


def cap_from_start(config) -> None:
    """Cap the caching allocator to the budget now, before anything is allocated."""
    if not config.budget or not torch.cuda.is_available() or config.device == "cpu":
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(config.budget) / total), 0)


def summary_line(result: dict) -> str:
    """One line: steps, tokens/s, the plan next to what the device and the tracker measured."""
    gb = lambda key: format_bytes(result[key])  # noqa: E731
    parts = [f"recipe check: {result['steps']} steps on {result.get('device', 'cpu')}"]
    if result.get("tokens_per_s_after_first"):
        parts.append(f"{result['tokens_per_s_after_first']:.0f} tokens/s after step 0")
    if result.get("planned_total_bytes"):
        parts.append(f"planned {gb('planned_total_bytes')}")
    if result.get("device_total_ratio"):
        parts.append(f"measured on the device {gb('measured_device_total_bytes')} "
                     f"({result['device_total_ratio']:.3f}x the plan)")
    if result.get("tensor_peak_ratio"):
        parts.append(f"tensor peak measured / planned {result['tensor_peak_ratio']:.3f}")
    if result.get("setup_peak_bytes"):
        parts.append(f"model and states set up at a peak of {gb('setup_peak_bytes')}")
    if result.get("stopped"):
        parts.append(f"stopped: {result['stopped']}")
    return ", ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamtrain.bench.recipe_check", description=__doc__.splitlines()[0])
    add_config_arguments(p)
    p.add_argument("--cap-from-start", action="store_true",
                   help="cap the CUDA allocator to --budget before the model is built, as a card of that size would")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if config.dry_run:
            raise ConfigError("--dry-run: a recipe check trains; plan only with python -m streamtrain.run --dry-run")
        if args.cap_from_start:
            cap_from_start(config)
        trainer = RecipeTrainer(config)
    except (ConfigError, ValueError, OSError) as e:  # a bad flag, or a plan that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except RunStopped as e:  # over budget, out of memory or a signal: report what was measured
        trainer.write_result({"steps": trainer.engine.step, "stopped": str(e)})
        write_memory_report_if_measured(trainer)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
