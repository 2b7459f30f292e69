"""Hugging Face model configs: every question streamtrain asks of a config.json, in one place.

Two readers:
  config_from_hf(path)    a LlamaConfig for streamtrain's own LLaMA, read from the raw JSON
                          (no transformers needed). Exact or refused: every key is either read
                          (shape, rope_theta from `rope_parameters` or the legacy top level, rope
                          scaling linear/llama3, head_dim, tied embeddings), checked to hold the
                          one value our LLaMA implements (silu, no biases, no sliding window, no
                          dropout), or known to be metadata. Anything else is refused in one line
                          naming the key, with the way out: train it through transformers.
  load_auto_config(path)  transformers' own config object, for the adapter (models/hf_causal.py);
                          needs the [hf] extra, reads local files only.

and what the recipe, checkpoints and planner ask of either kind: architecture_identity (what a
resume must match), with_layers (the same model at another depth, for the planner's shallow
simulations), uniform_layers (whether extrapolating in depth is exact), max_positions.
"""
import copy
import json
import os
from dataclasses import replace
from pathlib import Path

from .presets import LlamaConfig
from .rope import ROPE_KEYS, ROPE_TYPES

READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "head_dim", "tie_word_embeddings", "sliding_window"}
ONLY_VALUES = {"model_type": ("llama", "mistral"), "hidden_act": ("silu",), "attention_bias": (False,),
               "mlp_bias": (False,), "attention_dropout": (0, 0.0)}
METADATA = {"architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
            "pad_token_id", "initializer_range", "use_cache", "_name_or_path", "pretraining_tp",
            "output_attentions", "output_hidden_states", "return_dict"}
# config keys that change the logits after the output head: the adapter's loss (final hidden
# states through the head, in chunks) would silently differ from the model's own forward
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures"}


class ModelConfigError(ValueError):
    """A model config streamtrain cannot train exactly; the message names the key."""


# -- our own LLaMA ---------------------------------------------------------------------------
def read_config_json(path) -> dict:
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{file} does not exist; point to a Hugging Face model folder") from None
    except (ValueError, OSError) as e:
        raise ModelConfigError(f"{file} is not a readable JSON config ({e})") from None


def config_from_hf(path) -> LlamaConfig:
    """The LlamaConfig of an HF LLaMA config.json, exactly, or ModelConfigError naming the key."""
    cfg = read_config_json(path)
    refuse = lambda key, why="": unsupported(path, key, cfg.get(key), why)  # noqa: E731
    for key in cfg:
        if key not in READ | METADATA | set(ONLY_VALUES):
            refuse(key)
    for key, allowed in ONLY_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            refuse(key, f" (supported: {', '.join(map(repr, allowed))})")
    max_positions = cfg.get("max_position_embeddings", 2048)
    if cfg.get("sliding_window") is not None and cfg["sliding_window"] < max_positions:
        refuse("sliding_window", " (attention over the whole sequence only)")
    theta, scaling = rope_settings(path, cfg)
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg.get("num_key_value_heads"), cfg.get("head_dim")
    kv_heads = None if kv_heads == heads else kv_heads  # derived values keep the preset form
    head_dim = None if head_dim == cfg["hidden_size"] // heads else head_dim
    try:
        return LlamaConfig(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                           heads, kv_heads, max_positions, cfg.get("rms_norm_eps", 1e-6),
                           theta, head_dim, bool(cfg.get("tie_word_embeddings", False)), scaling).validate()
    except KeyError as e:
        raise ModelConfigError(f"{path}: config.json lacks {e.args[0]!r}") from None


def rope_settings(path, cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from transformers 5's `rope_parameters` or the legacy
    top-level `rope_theta` / `rope_scaling` (whose type key may be 'type')."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        unsupported(path, "rope_type", kind, f" (supported: {', '.join(ROPE_TYPES)})")
    for key in params:
        if key not in ROPE_KEYS[kind]:
            unsupported(path, f"rope {key}", params[key], f" (rope_type {kind!r} reads {list(ROPE_KEYS[kind]) or 'nothing'})")
    missing = [k for k in ROPE_KEYS[kind] if params.get(k) is None]
    if missing:
        raise ModelConfigError(f"{path}: rope_type {kind!r} needs {', '.join(missing)}")
    return float(theta), ({"rope_type": kind, **params} if kind != "default" else None)


def unsupported(path, key: str, value, why: str = ""):
    raise ModelConfigError(f"{path}: {key} = {value!r} is not supported by streamtrain's own LLaMA{why}; "
                           f"train this model through transformers with --model {path}")


def llama_hf_config(config: LlamaConfig, dtype) -> dict:
    """config.json for our LLaMA, in the legacy keys both transformers 4 and 5 read."""
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
           "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.kv_heads,
           "head_dim": config.head_size, "max_position_embeddings": config.max_position_embeddings,
           "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
           "hidden_act": "silu", "tie_word_embeddings": config.tie_word_embeddings,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).replace("torch.", "")}
    return out


# -- transformers' configs -------------------------------------------------------------------
def require_transformers():
    """transformers, imported offline; one line naming the extra when it is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: nothing is ever downloaded
    try:
        import transformers
    except ImportError:
        raise ModelConfigError("a Hugging Face model folder is trained through transformers, which is not "
                               "installed: pip install -e '.[hf]'") from None
    return transformers


def load_auto_config(path, overrides: dict | None = None):
    """transformers' config of the model folder `path` (local files only), with `overrides`."""
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises ValueError, OSError, KeyError ...
        raise ModelConfigError(f"--model {path}: transformers cannot read its config.json "
                               f"({first_line(e)})") from None
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ModelConfigError(f"model override {key!r} is not a field of {type(config).__name__}")
        setattr(config, key, value)
    for key in LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ModelConfigError(f"--model {path}: {key} = {getattr(config, key)} rescales the logits after "
                                   "the output head, which streamtrain's loss does not reproduce yet")
    return config


def is_llama_config(model_config) -> bool:
    return isinstance(model_config, LlamaConfig)


def architecture_identity(model_config) -> dict:
    """What a checkpoint records of the architecture, and a resume must match."""
    if is_llama_config(model_config):
        return model_config.identity()
    diff = {k: v for k, v in model_config.to_diff_dict().items() if k not in VOLATILE and not k.startswith("_")}
    return {"model_type": model_config.model_type, **json.loads(json.dumps(diff, default=str))}


def with_layers(model_config, layers: int):
    """The same architecture with `layers` blocks (the planner's shallow simulations)."""
    if is_llama_config(model_config):
        return replace(model_config, num_hidden_layers=layers)
    shallow = copy.deepcopy(model_config)
    shallow.num_hidden_layers = layers
    if getattr(shallow, "layer_types", None):
        shallow.layer_types = list(shallow.layer_types[:layers])
    return shallow


def uniform_layers(model_config) -> bool:
    """True when every block is declared the same kind (no per-layer attention types)."""
    return len(set(getattr(model_config, "layer_types", None) or ["same"])) == 1


def max_positions(model_config) -> int | None:
    return getattr(model_config, "max_position_embeddings", None)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
