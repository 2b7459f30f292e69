"""The run configuration: one dataclass, each field with its help text and a validation that
names the flag and the fix. The CLI builds its flags from these fields; library users fill the
dataclass directly."""
import argparse
import contextlib
import difflib
import importlib.util
import json
import math
import shlex
import sys
import typing
from pathlib import Path
from dataclasses import MISSING, asdict, dataclass, field, fields

from .methods import METHODS
from .models.int8 import GROUP_SIZES
from .models.presets import DEFAULT_PRESET, PRESETS
from .optim.lowbit_basis import PROJECTOR_PRECISIONS
from .optim.state import PRECISIONS

DTYPES = ("float32", "bfloat16", "int8")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("dp", "fsdp")
SHARDED_METHODS = ("adamw", "galore")  # distributed/fsdp.py


# float flag -> (low, high, low bound open?, the fix): every range a value may take
FLOAT_RANGES = {
    "lr": (0.0, 1.0, True, "pass a learning rate such as 1e-3 (Adam-family rates above 1 diverge)"),
    "min_lr_ratio": (0.0, 1.0, False, "pass a fraction of --lr such as 0.1"),
    "weight_decay": (0.0, 100.0, False, "pass 0 or a small decay such as 0.1"),
    "galore_scale": (0.0, 100.0, True, "pass a positive scale such as 0.25"),
    "lora_alpha": (0.0, 1e6, True, "pass a positive alpha such as 32"),
    "lora_dropout": (0.0, 0.99, False, "pass a probability such as 0.05"),
    "relora_keep_fraction": (0.0, 1.0, False, "pass a fraction such as 0.1"),
    "eta": (0.0, 1.0, True, "pass a fraction of the gradient energy such as 0.9"),
    "converge_threshold": (0.0, 1.0, False, "pass a fraction such as 0.5 (0 disables convergence refreshes)"),
    "refresh_share": (0.0, 1.0, True, "pass a fraction such as 0.25"),
    "clip_per_tensor": (0.0, 1e12, True, "pass a positive norm such as 1.0, or leave it unset"),
    "norm_growth": (1.0, 100.0, False, "pass a factor >= 1 such as 1.01 (below 1 the updates shrink to zero)"),
}


def opt(default, help, choices=None, **extra):
    metadata = {"help": help, "choices": choices, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # what to train
    model: str = opt(DEFAULT_PRESET, "model preset name ('list' prints them), or a local Hugging Face model folder "
                                     "(its config.json; weights loaded when present, else random init; needs the "
                                     "[hf] extra)")
    model_overrides: dict = opt({}, "preset field overrides (library only), e.g. {'num_hidden_layers': 2}", cli=False)
    init_from: str | None = opt(None, "HF-format folder or .safetensors file to start from")
    data: str = opt("builtin", "text file, folder, .jsonl, token .bin, or 'builtin' (Python stdlib sources)")
    tokenizer: str | None = opt(None, "tokenizer.json path (needs the 'tokenizers' package); default: bytes")
    text_field: str = opt("text", "JSONL field holding the text")
    token_dtype: str | None = opt(None, "dtype of a token .bin that has no .bin.json sidecar and no .u16.bin/.u32.bin "
                                        "suffix", choices=("uint16", "uint32"))
    max_data_bytes: int = opt(8_000_000, "bytes of the built-in corpus to read (0 = all)")
    # the step
    steps: int = opt(200, "logical optimizer steps")
    batch_size: int = opt(16, "sequences per micro-batch")
    seq_len: int = opt(128, "tokens per sequence")
    accumulate: int = opt(1, "micro-batches per logical step (gradient accumulation)")
    # the update
    method: str = opt("adamw", "update rule for attention/MLP matrices", choices=METHODS)
    low_rank_targets: str | None = opt(None, "comma-separated module names or regexes of the linear layers the "
                                             "low-rank method governs (default: every linear layer inside the "
                                             "transformer blocks)")
    lr: float = opt(2e-3, "peak learning rate")
    warmup: int = opt(-1, "linear warmup steps (-1: 10%% of --steps)")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of --lr")
    weight_decay: float = opt(0.0, "decoupled weight decay")
    rank: int = opt(128, "low rank of the method: GaLore projection rank, LoRA/ReLoRA adapter rank, "
                         "AdaRankGrad's largest rank (clamped to each matrix's smaller side)")
    galore_gap: int = opt(200, "GaLore subspace refresh interval in logical steps (AdaRankGrad: the longest)")
    galore_scale: float = opt(0.25, "GaLore update scale")
    # lora / relora (--rank is the adapter rank)
    lora_targets: str = opt("all-linear", "LoRA targets: 'all-linear' or comma-separated module names/regexes")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale alpha/rank)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapter input")
    rslora: bool = opt(False, "rank-stabilised LoRA scale alpha/sqrt(rank)")
    relora_warm_start: int = opt(-1, "ReLoRA full-rank warm-start steps (-1: 25%% of --steps)")
    relora_cycle: int = opt(-1, "ReLoRA steps between merges (-1: 25%% of --steps)")
    relora_restart_warmup: int = opt(-1, "ReLoRA LR re-warmup steps after each merge (-1: 10%% of the cycle)")
    relora_keep_fraction: float = opt(0.1, "fraction of adapter optimizer state kept at each merge")
    relora_prune: str = opt("magnitude", "how ReLoRA prunes adapter state", choices=("magnitude", "random"))
    # adarankgrad (--rank is r_max, --galore-gap the maximum refresh interval)
    eta: float = opt(0.9, "AdaRankGrad: fraction of gradient energy the chosen rank keeps")
    r_min: int = opt(8, "AdaRankGrad: smallest rank")
    converge_threshold: float = opt(0.5, "AdaRankGrad: refresh when the projected gradient norm falls "
                                         "below this fraction of its value at the last refresh")
    refresh_share: float = opt(0.25, "GaLore/AdaRankGrad: at most this share of the matrices refresh their subspace "
                                     "on one step (GaLore staggers each matrix's refresh phase; 1 = all together)")
    svd: str = opt("randomized", "GaLore/AdaRankGrad subspace: randomized range finder (its basis keeps the exact "
                                 "SVD's energy to 1e-5, in 0.17x the time at 4096 x 11008) or exact SVD",
                   choices=("randomized", "exact"))
    states: str = opt("fp32", "optimizer state storage precision", choices=PRECISIONS)
    dtype: str = opt("float32", "weight dtype (bfloat16 uses stochastic rounding; int8: the linear layers inside "
                                "the blocks stored as INT8 codes with a scale per --quant-group-size elements, "
                                "dequantized one layer at a time, updates rounded stochastically; embeddings, "
                                "norms and head in bf16)", choices=DTYPES)
    quant_group_size: int = opt(256, "elements per scale of INT8 weights (--dtype int8) and of low-bit GaLore "
                                     "projectors (256 as in Q-GaLore, 128 as in Q-APOLLO)",
                                choices=GROUP_SIZES)
    projector_precision: str = opt("dense", "GaLore/AdaRankGrad basis storage: dense (the weight's dtype; bf16 for "
                                            "int8 weights), or int8/int4 codes with group-wise scales (as Q-GaLore), "
                                            "dequantized for each projection", choices=PROJECTOR_PRECISIONS)
    export_int8: bool = opt(False, "--dtype int8: also write the INT8 codes and scales as stored into final/ "
                                   "(model.int8.safetensors, quantization.json) beside the bf16 export")
    stochastic_rounding: bool = opt(True, "stochastic rounding of bf16 and int8 weight updates")
    clip_per_tensor: float | None = opt(None, "clip each tensor's step gradient to this L2 norm")
    norm_growth: float | None = opt(None, "limit update-norm growth per step to this factor (e.g. 1.01)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward")
    projected_backward: bool = opt(True, "GaLore/AdaRankGrad matrices of nn.Linear layers get their gradient projected "
                                         "in backward from the layer's input and output gradient, dY^T (X P), "
                                         "never as the m x n gradient (0.34-0.5x the weight-gradient matmul at rank "
                                         "128 of 512-1376; same math to rounding); off: the full gradient, then "
                                         "projected")
    offload_accumulation: bool = opt(False, "keep gradient-accumulation buffers in host RAM instead of GPU memory "
                                            "(CUDA only; exact): frees the r x n fp32 sum of every GaLore matrix "
                                            "(7.5 GB at llama-7b rank 1024) for one device-to-host copy per "
                                            "parameter per micro-batch")
    loss_chunk_tokens: int = opt(0, "compute the loss in chunks of this many tokens (0 = all at once)")
    # where and how
    budget: str | None = opt(None, "memory budget, e.g. 24GB (10^9 bytes) or 22.5GiB (2^30): the run is planned "
                                   "first and refused if it does not fit; on CUDA it covers the whole process "
                                   "(allocator capped, context included), on CPU it applies to tracked tensor bytes")
    dry_run: bool = opt(False, "plan memory only: write memory.json/.md/.png into --out (with --budget: search "
                               "the largest micro-batch that fits), allocate nothing, train nothing")
    plan_full_depth: bool = opt(False, "plan by simulating every layer (slower) instead of 2 and 3 layers "
                                       "extrapolated (exact for identical layers)")
    device: str = opt("auto", "device: auto picks cuda when present", choices=DEVICES)
    world_size: int = opt(0, "data-parallel ranks a --dry-run plans for (0: the launch's: torchrun's WORLD_SIZE, "
                             "else 1); each rank holds the whole model, so the plan is per rank")
    parallel: str = opt("dp", "under torchrun: 'dp' keeps the whole model on every rank and averages gradients in "
                              "the hooks; 'fsdp' shards weights, optimizer states and gradients over the ranks "
                              "(FSDP2; --method adamw or galore); a --dry-run plans one rank of --world-size",
                        choices=PARALLEL)
    check_replicas: int = opt(0, "under torchrun: compare a fingerprint of the weights across ranks every N steps "
                                 "and stop with an error if a replica diverged (0: never)")
    seed: int = opt(0, "seed for weights, data order and sampling")
    out: str | None = opt(None, "output folder: metrics, checkpoints, reports, final weights (default: a new "
                                "runs/<date>_<time>; with --resume auto, the newest run under runs/)")
    overwrite: bool = opt(False, "start a fresh run in an --out that holds another run, deleting that run's "
                                 "files first (without it such a run is refused)")
    eval_every: int = opt(50, "validation every N steps (0 = only at the end)")
    eval_batches: int = opt(8, "validation micro-batches per evaluation")
    progress: bool = opt(True, "show a progress bar (only when stderr is a terminal; otherwise, and with "
                               "--no-progress, a log line every --log-every steps)")
    log_every: int = opt(10, "print a log line every N steps when there is no progress bar")
    tensorboard: bool = opt(False, "write TensorBoard event files to <out>/tensorboard (loss, lr, grad norm, val "
                                   "loss, tokens/s, memory; needs the extra: pip install -e '.[tensorboard]')")
    # checkpoints
    save_every: int = opt(200, "save a checkpoint every N steps (0: only at the end and on a stop signal)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints in <out>/checkpoints")
    resume: str | None = opt(None, "continue from a checkpoint folder, or 'auto': the latest in --out "
                                   "(none there: start fresh)")
    reschedule: bool = opt(False, "on resume, accept a changed --steps: the LR continues from the checkpoint's "
                                  "value with a cosine down to the floor at the new --steps (without it a changed "
                                  "--steps is refused)")

    def validate(self) -> "TrainConfig":
        if self.model not in PRESETS and not Path(self.model, "config.json").is_file():
            problem = (f"{self.model} has no config.json" if Path(self.model).is_dir() else
                       f"{self.model!r} is neither a preset nor a model folder")
            fail("--model", problem, f"choose a preset ({', '.join(PRESETS)}; 'list' shows them) or a local "
                 "Hugging Face model folder")
        for name in ("steps", "batch_size", "accumulate", "rank", "galore_gap", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                fail(flag(name), f"must be >= 1, got {getattr(self, name)}", "pass a positive integer")
        if self.seq_len < 2:
            fail("--seq-len", f"must be >= 2, got {self.seq_len}", "pass a longer sequence length")
        self._validate_floats()
        if self.warmup < -1 or self.warmup > self.steps:
            fail("--warmup", f"{self.warmup} is outside [-1, --steps]", "pass -1 for 10% or a step count")
        for name, allowed in (("method", METHODS), ("states", PRECISIONS), ("dtype", DTYPES), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                fail(flag(name), f"unknown value {getattr(self, name)!r}", f"choose one of {', '.join(allowed)}")
        self._validate_low_bit()
        if self.init_from is not None and not Path(self.init_from).exists():
            fail("--init-from", f"{self.init_from} does not exist", "pass an HF model folder or a .safetensors file")
        if self.r_min < 1:
            fail("--r-min", f"must be >= 1, got {self.r_min}", "pass a positive rank")
        if self.save_every < 0:
            fail("--save-every", f"must be >= 0, got {self.save_every}", "pass 0 (only at the end) or a step count")
        if self.keep_checkpoints < 1:
            fail("--keep-checkpoints", f"must be >= 1, got {self.keep_checkpoints}", "pass a positive integer")
        if self.budget is not None:
            from .memory.units import parse_bytes
            try:
                parse_bytes(self.budget)
            except ValueError as e:
                raise ConfigError(f"--budget: {e}") from None
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            fail("--tensorboard", "the 'tensorboard' package is not installed", "pip install -e '.[tensorboard]'")
        if self.world_size < 0 or self.check_replicas < 0:
            fail("--world-size/--check-replicas", "must be >= 0", "pass 0 or a positive integer")
        self._validate_parallel()
        if self.eval_every < 0 or self.loss_chunk_tokens < 0 or self.max_data_bytes < 0:
            fail("--eval-every/--loss-chunk-tokens/--max-data-bytes", "must be >= 0", "pass 0 or a positive integer")
        return self

    def _validate_low_bit(self) -> None:
        """INT8 weights and low-bit projectors only where the code path exists."""
        if self.dtype == "int8" and self.method in ("lora", "relora"):
            fail("--dtype int8", f"--method {self.method} merges into or wraps frozen dense weights",
                 "use --dtype int8 with adamw, galore or adarankgrad (or --dtype bfloat16)")
        if self.projector_precision != "dense" and self.method not in ("galore", "adarankgrad"):
            fail("--projector-precision", f"{self.projector_precision} needs a projector (--method galore or "
                 f"adarankgrad), got --method {self.method}", "drop the flag or change --method")
        if self.export_int8 and self.dtype != "int8":
            fail("--export-int8", f"there are no INT8 weights with --dtype {self.dtype}", "add --dtype int8")
        if self.quant_group_size not in GROUP_SIZES:
            fail("--quant-group-size", f"{self.quant_group_size} is not a supported group",
                 f"choose one of {', '.join(map(str, GROUP_SIZES))}")

    def _validate_parallel(self) -> None:
        if self.parallel not in PARALLEL:
            fail("--parallel", f"unknown value {self.parallel!r}", f"choose one of {', '.join(PARALLEL)}")
        if self.parallel == "fsdp" and self.method not in SHARDED_METHODS:
            fail("--parallel fsdp", f"--method {self.method} is not supported sharded (its rule changes the "
                 "model's structure or a matrix's rank)", f"use --method {' or '.join(SHARDED_METHODS)}, or "
                 "--parallel dp")
        if self.parallel == "fsdp" and self.check_replicas:
            fail("--check-replicas", "compares replicas, and under --parallel fsdp every rank holds another shard",
                 "drop --check-replicas")
        if self.parallel == "fsdp" and (self.dtype == "int8" or self.projector_precision != "dense"):
            fail("--parallel fsdp", "INT8 weights and low-bit projectors are not sharded yet (their codes and "
                 "group scales are not FSDP2 parameters)", "use --dtype bfloat16 with dense projectors, or "
                 "--parallel dp")

    def _validate_floats(self) -> None:
        """Every float flag is finite and inside the range where the math means something: a NaN
        or an absurd value must be refused here, not end as a NaN model with exit status 0."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(flag(f.name), f"must be a finite number, got {value}", "pass a real number")
        for name, (low, high, low_open, hint) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            below = value <= low if low_open else value < low
            if below or value > high:
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
                fail(flag(name), f"{value:g} is outside {interval}", hint)
        if self.lr * self.weight_decay >= 1:
            fail("--weight-decay", f"--lr x --weight-decay = {self.lr * self.weight_decay:g} >= 1 flips the "
                 "weights' sign every step", "lower --weight-decay (0.0-0.1 is usual)")

    def relora_options(self) -> dict:
        quarter = max(1, self.steps // 4)
        cycle = quarter if self.relora_cycle == -1 else self.relora_cycle
        return {"alpha": self.lora_alpha, "dropout": self.lora_dropout, "rslora": self.rslora,
                "warm_start_steps": quarter if self.relora_warm_start == -1 else self.relora_warm_start,
                "cycle": cycle, "keep_fraction": self.relora_keep_fraction, "prune": self.relora_prune,
                "restart_warmup": max(1, cycle // 10) if self.relora_restart_warmup == -1 else self.relora_restart_warmup,
                "seed": self.seed}

    def galore_options(self) -> dict:
        return {"svd": self.svd, "refresh_share": self.refresh_share, "seed": self.seed, **self.projector_options()}

    def projector_options(self) -> dict:
        """GaLore's basis storage (nothing when dense, so older rule configs stay the same)."""
        if self.projector_precision == "dense":
            return {}
        return {"projector": self.projector_precision, "projector_group": self.quant_group_size}

    def adarank_options(self) -> dict:
        return {"eta": self.eta, "r_min": min(self.r_min, self.rank), "svd": self.svd,
                "converge_threshold": self.converge_threshold, "refresh_share": self.refresh_share,
                "seed": self.seed, **self.projector_options()}

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup == -1 else self.warmup

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    pass


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fail(flag_name: str, problem: str, fix: str):
    raise ConfigError(f"{flag_name}: {problem}; {fix}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed and documented from the field itself, plus --config
    and --recipe. A flag not given is absent from the parsed namespace (argparse.SUPPRESS), so
    config_from_args can tell the flags a user typed from the defaults."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="read settings from a YAML or JSON file (a run writes <out>/run_config.json: pass it "
                             "back to replay the run); flags on the command line override the file. The file's "
                             "resume and overwrite are ignored: they act on one invocation only")
    parser.add_argument("--recipe", metavar="NAME", default=argparse.SUPPRESS,
                        help="named settings ('list' prints them), e.g. llama-7b-24gb; a --config file and "
                             "flags override its values")
    for f in fields(TrainConfig):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        default = f.default if f.default is not MISSING else None
        help_text = meta["help"] + ("" if default is None else f" (default: {default})")
        if kinds_of(f) == {"bool"}:
            parser.add_argument(flag(f.name), default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        kind = int if "int" in kinds_of(f) else float if "float" in kinds_of(f) else str
        parser.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, choices=meta.get("choices"),
                            help=help_text, metavar=f.name.upper() if not meta.get("choices") else None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of a command line: the defaults, overridden by the recipe (--recipe, else the
    file's `recipe` key), then by the --config file, then by the flags typed."""
    typed = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    recipe = getattr(args, "recipe", None) or from_file.get("recipe")
    from_file.pop("recipe", None)
    from .recipes import recipe_values
    values = {**(recipe_values(recipe) if recipe else {}), **from_file, **typed}
    return TrainConfig(**values).validate()


# -- config files --------------------------------------------------------------------------------
SESSION_FIELDS = ("resume", "overwrite")  # what one invocation does to a run folder, never read from a file


def read_config_file(path: str) -> dict:
    """The settings of a YAML (.yaml/.yml, needs PyYAML) or JSON file (any other name), checked
    against TrainConfig's fields and types; keys may be written as flags (seq-len) or fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist; pass a YAML or JSON file (a run writes "
                          "<out>/run_config.json)")
    values = parse_config_text(path, path.read_text(errors="replace"))
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings (field: value), got "
                          f"{type(values).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    ignored = {k: values.pop(k) for k in SESSION_FIELDS if k in values}
    ignored = {k: v for k, v in ignored.items() if v not in (None, False)}
    if ignored:
        print(f"note: --config {path}: ignored {', '.join(f'{k}={v!r}' for k, v in ignored.items())} (taken from "
              f"the command line only: pass {' '.join(flag_pairs(ignored))} to act on a run)", file=sys.stderr)
    return {key: checked_value(key, value, path) for key, value in values.items()}


def parse_config_text(path: Path, text: str):
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install -e '.[yaml]'); or "
                              "write the settings as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            raise ConfigError(f"--config {path}: not valid YAML ({getattr(e, 'problem', None) or 'parse error'}"
                              f"{f' at line {where.line + 1}' if where else ''})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno}); YAML files need a "
                          ".yaml name") from None


FIELDS = {f.name: f for f in fields(TrainConfig)}


def checked_value(key: str, value, path: Path):
    """`value` for field `key` when its type is the field's (an int is a float too), else a
    one-line error naming the file, the key and the type expected."""
    if key == "recipe":
        if not isinstance(value, str):
            raise ConfigError(f"--config {path}: recipe: expected a recipe name, got {value!r}")
        return value
    if key not in FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS) + ["recipe"], n=1)
        raise ConfigError(f"--config {path}: unknown setting {key!r}"
                          + (f"; did you mean {close[0]!r}?" if close else "; see --help for the settings"))
    kinds = kinds_of(FIELDS[key])
    if isinstance(value, str) and "float" in kinds:  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if not type_matches(value, kinds):
        raise ConfigError(f"--config {path}: {key}: expected {' or '.join(sorted(kinds))}, got {value!r}")
    return float(value) if "float" in kinds and type(value) is int else value


def type_matches(value, kinds: set[str]) -> bool:
    """Whether `value` (from JSON or YAML) has one of the type names in `kinds` (an int is a float too)."""
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):  # before int: a bool is an int to Python, not to a config
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    return type(value).__name__ in kinds


def kinds_of(f) -> set[str]:
    """The type names a field accepts: {'int'}, {'float', 'None'}, {'str', 'None'} ..."""
    kinds = typing.get_args(f.type) or (f.type,)
    return {"None" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds}


def flag_pairs(values: dict) -> list[str]:
    """Settings as command-line words: --seq-len 256, --activation-checkpointing, --no-progress."""
    words = []
    for name, value in values.items():
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif value is not None:
            words.append(f"{flag(name)} {shlex.quote(str(value))}")
    return words


def command_line(config: TrainConfig, program: str = "streamtrain train") -> str:
    """The command that trains `config`: every setting that differs from the default, as flags
    (the run folder, --out/--resume/--overwrite, and --dry-run are left to the user;
    model_overrides has no flag)."""
    default = TrainConfig()
    changed = {f.name: getattr(config, f.name) for f in fields(TrainConfig)
               if f.metadata.get("cli") is not False and f.name not in SESSION_FIELDS + ("dry_run", "out")
               and getattr(config, f.name) != getattr(default, f.name)}
    return " ".join([program] + flag_pairs(changed))
