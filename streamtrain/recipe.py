"""The recipe: model, rules and engine built from a TrainConfig.

The Trainer (train.py) and the memory planner (memory/planner.py) both build through these
functions, so a plan simulates exactly what a run will train; neither imports the other.
"""
import torch

from .config import TrainConfig
from .engine import Engine, unique
from .methods import assign_rules
from .models.llama import build_model
from .models.lora import apply_lora
from .models.presets import get_config
from .optim.schedule import CosineSchedule, RescheduledCosine
from .rules.lora import ReLoRA

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def model_config_of(config: TrainConfig):
    """The architecture a run trains (a preset with the config's overrides)."""
    return get_config(config.model, **config.model_overrides)


def build_run_model(config: TrainConfig, device, model_config=None):
    """The model of `config` on `device` ('meta': shapes only, nothing allocated or initialised),
    with random weights (base weights, if any, are loaded by the caller before prepare_model)."""
    return build_model(model_config or model_config_of(config), device, DTYPES[config.dtype], seed=config.seed,
                       activation_checkpointing=config.activation_checkpointing,
                       loss_chunk_tokens=config.loss_chunk_tokens)


def build_rules(model, config: TrainConfig) -> dict:
    return assign_rules(model, config.method, rank=config.rank, gap=config.galore_gap,
                        scale=config.galore_scale, states=config.states,
                        relora=config.relora_options(), adarank=config.adarank_options(),
                        galore=config.galore_options())


def prepare_model(model, config: TrainConfig) -> None:
    """Method-specific model surgery, after any base weights are loaded: LoRA adapters."""
    if config.method == "lora":
        targets = "all-linear" if config.lora_targets == "all-linear" else config.lora_targets.split(",")
        apply_lora(model, targets, rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   rslora=config.rslora, seed=config.seed)


def sync_structure(engine: Engine) -> None:
    """Let rules that change the model's structure (ReLoRA's wrap) match the engine's clock:
    at the start (a zero-step warm start) and after a resume (before weights are loaded)."""
    for rule in unique(engine.rules.values()):
        rule.sync(engine)


def build_schedule(config: TrainConfig, history: dict | None = None):
    """The cosine of `config`; after resumes that changed the run's length (resume.py), the cosine
    of the first run's `steps`, then each [start, total] change in `history['changes']`."""
    steps = history["steps"] if history else config.steps
    schedule = CosineSchedule(config.lr, steps, config.warmup_steps, config.min_lr_ratio)
    for start, total in (history or {}).get("changes", []):
        schedule = RescheduledCosine(schedule, start, total, config.lr * config.min_lr_ratio)
    return schedule


def build_engine(model, config: TrainConfig, schedule_history: dict | None = None, **engine_options) -> Engine:
    schedule = build_schedule(config, schedule_history)
    rules = build_rules(model, config)
    relora = next((r for r in rules.values() if isinstance(r, ReLoRA)), None)
    if relora is not None:  # ReLoRA's jagged cosine restarts the LR after every merge
        schedule = relora.schedule(schedule)
    return Engine(model, rules, schedule=schedule, accumulate=config.accumulate,
                  weight_decay=config.weight_decay, clip_per_tensor=config.clip_per_tensor,
                  norm_growth=config.norm_growth, stochastic_rounding=config.stochastic_rounding,
                  offload_accumulation=config.offload_accumulation,
                  **engine_options)
