"""The recipe: model, tokenizer, rules and engine built from a TrainConfig.

The Trainer (train.py) and the memory planner (memory/planner.py) both build through these
functions, so a plan simulates exactly what a run will train; neither imports the other.

Models. `--model` is a preset name (streamtrain's own LLaMA, no transformers needed) or a local
Hugging Face model folder: its config.json sets the architecture and transformers builds it
(models/hf_causal.py), from the folder's weights when it has them (fine-tuning), else randomly
initialised (pretraining). The tokenizer follows the model: --tokenizer, else the folder's
tokenizer.json, else the byte tokenizer (refused when the folder has weights: they were trained
with a tokenizer the run must use).
"""
import sys
from pathlib import Path

import torch

from .config import TrainConfig
from .data import make_tokenizer
from .engine import Engine, unique
from .hf import check_init_from, is_model_folder, load_hf_weights
from .methods import assign_rules, format_rule_summary, rule_summary
from .models.hf_config import is_llama_config, load_auto_config, max_positions
from .models.int8 import quantize_linears
from .models.llama import build_model
from .models.lora import apply_lora
from .models.presets import get_config
from .optim.schedule import CosineSchedule, RescheduledCosine
from .rules.lora import ReLoRA

# the dtype models are built in; int8 is the storage of the block linears, which compute in bf16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def model_config_of(config: TrainConfig):
    """The architecture a run trains: a preset with the config's overrides (our LlamaConfig), or
    a model folder's config.json (transformers' config object)."""
    if is_model_folder(config.model):
        return load_auto_config(config.model, config.model_overrides)
    return get_config(config.model, **config.model_overrides)


def build_run_model(config: TrainConfig, device, model_config=None, weights: bool = False):
    """The model of `config` on `device` ('meta': shapes only, nothing allocated or initialised).
    With `weights`: a model folder's own weights, or --init-from's; else random init."""
    model_config = model_config or model_config_of(config)
    options = dict(activation_checkpointing=config.activation_checkpointing, loss_chunk_tokens=config.loss_chunk_tokens)
    if config.dtype == "int8":
        model = build_int8_model(config, device, model_config, weights, options)
    elif not is_llama_config(model_config):
        from .models.hf_causal import build_hf_model
        model = build_hf_model(config.model, model_config, device, DTYPES[config.dtype], seed=config.seed,
                               weights=weights and not config.init_from, **options)
    else:
        model = build_model(model_config, device, DTYPES[config.dtype], seed=config.seed, **options)
        if weights and config.init_from:
            check_init_from(config.init_from, model_config)
    if weights and config.init_from:
        load_hf_weights(model, config.init_from)
    return model


def build_int8_model(config: TrainConfig, device, model_config, weights: bool, options: dict):
    """The model with its block linears as Int8Linear (models/int8.py), never dense on `device`:
    our LLaMA is built on meta, converted, then allocated and initialised in place (the same init
    stream as a dense build, quantized); a transformers model is built on the CPU, converted, moved."""
    meta = str(device) == "meta"
    if is_llama_config(model_config):
        model = build_model(model_config, "meta", DTYPES["int8"], seed=config.seed, **options)
        quantize_linears(model, config.quant_group_size, config.seed)
        if not meta:
            model.to_empty(device=device).reset_parameters(config.seed)
        if weights and config.init_from:
            check_init_from(config.init_from, model_config)
        return model
    from .models.hf_causal import build_hf_model
    model = build_hf_model(config.model, model_config, "meta" if meta else "cpu", DTYPES["int8"], seed=config.seed,
                           weights=weights and not config.init_from, **options)
    quantize_linears(model, config.quant_group_size, config.seed)
    return model.to(device)


def has_own_weights(config: TrainConfig) -> bool:
    from .models.hf_causal import weights_in
    return is_model_folder(config.model) and weights_in(config.model)


def describe_model(config: TrainConfig, model) -> str:
    """One line: what is trained, from where."""
    count = sum(p.numel() for p in model.parameters())
    kind = type(getattr(model, "hf", model)).__name__
    if config.init_from:
        source = f"weights from {config.init_from}"
    elif has_own_weights(config):
        source = f"weights from {config.model} (fine-tuning)"
    else:
        source = "random init (pretraining)"
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
    return f"model: {config.model} ({kind}, {size} parameters), {source}"


def tokenizer_path(config: TrainConfig) -> str | None:
    """The tokenizer.json a run uses: --tokenizer, else a model folder's own, else None (bytes)."""
    if config.tokenizer or not is_model_folder(config.model):
        return config.tokenizer
    own = Path(config.model, "tokenizer.json")
    if own.is_file():
        return str(own)
    if has_own_weights(config):
        raise ValueError(f"--model {config.model} has weights but no tokenizer.json; pass the tokenizer it was "
                         "trained with as --tokenizer FILE (AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH) "
                         "writes one)")
    return None


def build_tokenizer(config: TrainConfig, model_config):
    """The run's tokenizer, checked against the model: sequence length and vocabulary."""
    limit = max_positions(model_config)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"--seq-len {config.seq_len} exceeds {config.model}'s maximum {limit}; lower --seq-len")
    path = tokenizer_path(config)
    if path is None and is_model_folder(config.model):
        print(f"--model {config.model} has no tokenizer.json: using the byte tokenizer (256 tokens)", file=sys.stderr)
    tokenizer = make_tokenizer(path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {config.model}'s vocabulary only "
                         f"{model_config.vocab_size}; pass a model whose vocab_size covers the tokenizer")
    return tokenizer


def build_rules(model, config: TrainConfig) -> dict:
    return assign_rules(model, config.method, rank=config.rank, gap=config.galore_gap,
                        scale=config.galore_scale, states=config.states,
                        relora=config.relora_options(), adarank=config.adarank_options(),
                        galore=config.galore_options(), targets=low_rank_targets(config))


def low_rank_targets(config: TrainConfig) -> list[str] | None:
    return config.low_rank_targets.split(",") if config.low_rank_targets else None


def lora_targets(config: TrainConfig):
    """LoRA's targets: --low-rank-targets when given (the one flag for every low-rank method),
    else --lora-targets ('all-linear': the linear layers inside the blocks)."""
    if config.low_rank_targets:
        if config.lora_targets != "all-linear":
            raise ValueError("--lora-targets and --low-rank-targets both name LoRA's layers; pass one")
        return low_rank_targets(config)
    return "all-linear" if config.lora_targets == "all-linear" else config.lora_targets.split(",")


def prepare_model(model, config: TrainConfig) -> None:
    """Method-specific model surgery, after any base weights are loaded: LoRA adapters."""
    if config.method == "lora":
        apply_lora(model, lora_targets(config), rank=config.rank, alpha=config.lora_alpha,
                   dropout=config.lora_dropout, rslora=config.rslora, seed=config.seed)


def rules_line(engine: Engine) -> tuple[list[dict], str]:
    """The rule summary (rows for logs) and its one printed line."""
    rows = rule_summary(engine.model, engine.rules)
    return rows, format_rule_summary(rows)


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
                  projected_backward=config.projected_backward, **engine_options)
