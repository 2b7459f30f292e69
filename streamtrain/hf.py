"""Hugging Face format weights: `model.safetensors` (or shards with
`model.safetensors.index.json`) plus a LlamaConfig-style `config.json`.

Our parameter names already are HF's, so saving is a straight write and loading a checked copy.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models.presets import LlamaConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def hf_config(config: LlamaConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def config_from_hf(path: str | os.PathLike) -> LlamaConfig:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return LlamaConfig(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
                       cfg["num_hidden_layers"], cfg["num_attention_heads"],
                       cfg.get("num_key_value_heads"), cfg.get("max_position_embeddings", 2048),
                       cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)).validate()


def save_hf(state: dict[str, torch.Tensor], config: LlamaConfig, out_dir, max_shard_bytes: int | None = None):
    """Write `state` (HF names) as one file, or as shards of at most `max_shard_bytes` plus an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(state, str(out / SINGLE_NAME), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def read_hf(path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (single or sharded) or of one .safetensors file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif (path / SINGLE_NAME).is_file():
        files = [path / SINGLE_NAME]
    else:
        raise ValueError(f"{path} holds no {SINGLE_NAME} or {INDEX_NAME}; point to an HF model folder")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read weights from {f}: {e}") from None
    return state


def load_hf_weights(model: torch.nn.Module, path) -> None:
    """Copy HF-format weights into `model`, refusing missing, unexpected or mis-shaped tensors."""
    state = read_hf(path)
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; check --model against the checkpoint")
    with torch.no_grad():
        for name, p in own.items():
            if state[name].shape != p.shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)} in {path} but "
                                 f"{tuple(p.shape)} in the model; check --model")
            p.copy_(state[name])
