"""What a resume must keep: the data stream and the math of the run it continues.

A checkpoint records the data position as one integer; it only means the same batches again with
the same data, tokenizer, seed, batch, sequence length and accumulation. The rules' settings, the
schedule and the engine's options decide the math. A resume that changes any of them would read
another stream (possibly its former validation split) or take other steps, and still exit 0, so
it is refused, naming the flag and both values.

Settings derived from `--steps` (warmup, ReLoRA's warm start, cycle and re-warmup, all `-1` by
default) are frozen at the values the checkpoint's run resolved, so a changed `--steps` never
shifts them. Changing `--steps` itself changes the cosine schedule; it needs `--reschedule`,
which continues from the checkpoint's learning rate with a cosine down to the floor at the new
`--steps` (optim/schedule.RescheduledCosine). Each such change is recorded in the checkpoint, so
a later resume rebuilds the same schedule.
"""
import json
from dataclasses import replace

from .checkpoint_files import CheckpointError
from .config import TrainConfig

# flags that decide which batches a position means
STREAM_FLAGS = ("seed", "batch_size", "seq_len", "accumulate", "max_data_bytes", "text_field", "token_dtype")
# flags that decide the math of a step (the rules' settings are compared again, rule by rule, on load)
# (the model and weight dtype are the checkpoint's identity, checked on load with their own message)
MATH_FLAGS = ("method", "low_rank_targets", "rank", "galore_gap", "galore_scale", "states",
              "lora_targets", "lora_alpha", "lora_dropout", "rslora", "relora_warm_start", "relora_cycle",
              "relora_restart_warmup", "relora_keep_fraction", "relora_prune", "eta", "r_min",
              "converge_threshold", "refresh_share", "svd", "lr", "warmup", "min_lr_ratio", "weight_decay",
              "clip_per_tensor", "norm_growth", "stochastic_rounding", "quant_group_size", "projector_precision")
DERIVED_FROM_STEPS = ("warmup", "relora_warm_start", "relora_cycle", "relora_restart_warmup")


class ResumeMismatch(CheckpointError):
    pass


def resolved(config: TrainConfig) -> TrainConfig:
    """`config` with the settings derived from --steps (the -1 defaults) made explicit."""
    relora = config.relora_options()
    return replace(config, warmup=config.warmup_steps, relora_warm_start=relora["warm_start_steps"],
                   relora_cycle=relora["cycle"], relora_restart_warmup=relora["restart_warmup"])


def adopt_derived(config: TrainConfig, saved: dict) -> TrainConfig:
    """`config` with every derived setting the user left at -1 taken from the checkpoint's run."""
    taken = {name: saved[name] for name in DERIVED_FROM_STEPS if getattr(config, name) == -1 and name in saved}
    return replace(config, **taken)


def check_same_run(config: TrainConfig, saved: dict, identity: dict, saved_identity: dict,
                   world_size: int = 1, saved_world_size: int = 1) -> None:
    """Refuse a resume whose flags or data differ from the checkpoint's run (`config` resolved,
    `saved` the checkpoint's resolved config; identities: data and tokenizer). Under data
    parallelism the stream is the global batch, --batch-size x ranks: another number of ranks
    with the same global batch reads the same sequences (only the order of summation differs)."""
    current = resolved(config).to_dict()
    if current["batch_size"] * world_size != saved["batch_size"] * saved_world_size:
        raise ResumeMismatch(f"--batch-size: the checkpoint's run used {saved['batch_size']} x {saved_world_size} "
                             f"rank(s), this run {current['batch_size']} x {world_size}; keep the global batch "
                             "(--batch-size x ranks) the same (or start a new --out)")
    for name in STREAM_FLAGS + MATH_FLAGS:
        if name == "batch_size":
            continue
        if name in saved and as_json(current[name]) != saved[name]:
            raise ResumeMismatch(f"--{name.replace('_', '-')}: the checkpoint's run used {saved[name]!r}, this "
                                 f"run {current[name]!r}; resume with the same value (or start a new --out)")
    for key in ("tokenizer", "data"):  # the tokenizer first: another tokenizer also changes the data's tokens
        if key in saved_identity and saved_identity[key] != as_json(identity[key]):
            raise ResumeMismatch(f"--{key}: this run's {key} differs from the checkpoint's "
                                 f"({differences(saved_identity[key], as_json(identity[key]))}); resume with "
                                 "the same data and tokenizer (or start a new --out)")


def schedule_changes(config: TrainConfig, saved: dict, changes: list, step: int, reschedule: bool) -> list:
    """The schedule changes a resume at `step` runs under: the checkpoint's, plus one when --steps
    differs from where the checkpoint's schedule ends (only with --reschedule)."""
    if config.steps < step:
        raise ResumeMismatch(f"--steps {config.steps} is below the checkpoint's step {step}; pass --steps >= {step}")
    planned = changes[-1][1] if changes else saved["steps"]
    if config.steps == planned:
        return list(changes)
    if not reschedule:
        raise ResumeMismatch(f"--steps: the checkpoint's schedule ends at step {planned}, this run asks for "
                             f"{config.steps}; pass --steps {planned}, or add --reschedule to continue from the "
                             f"current learning rate with a cosine down to the floor at step {config.steps}")
    return list(changes) + [[step, config.steps]]


def differences(saved: dict, current: dict) -> str:
    """The keys on which two identities differ, with both values (long digests shortened)."""
    def short(value):
        return value[:12] if isinstance(value, str) and len(value) > 24 else value
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return ", ".join(f"{k}: {short(saved.get(k))!r} there, {short(current.get(k))!r} here" for k in keys)


def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))
