"""Rotary position embeddings: the inverse frequencies, with the scalings our LLaMA supports.

Written to match transformers' `modeling_rope_utils` bit for bit (same fp32 arithmetic, same
order), so a checkpoint trained there gives the same logits here:

  default   inv_freq[i] = 1 / theta^(2i / head_dim)
  linear    inv_freq / factor                      (position interpolation)
  llama3    Llama 3.1's piecewise scaling: long wavelengths divided by `factor`, short ones kept,
            the band between smoothly interpolated (low_freq_factor, high_freq_factor,
            original_max_position_embeddings)

Other rope types (dynamic NTK, YaRN, LongRoPE, ...) are refused where a config is read
(hf_config.py): dynamic NTK changes its frequencies with the longest sequence seen so far, a
state our stateless tables cannot reproduce exactly.
"""
import math

import torch

ROPE_TYPES = ("default", "linear", "llama3")
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies of `scaling` (None or {'rope_type': ..., params})."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_scaled(inv_freq, **{k: scaling[k] for k in ROPE_KEYS["llama3"]})
    if kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return inv_freq


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    old_context = original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(seq_len: int, inv_freq: torch.Tensor, dtype):
    """cos, sin of shape (seq_len, head_dim) in `dtype`, computed in fp32 as transformers does."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check_rope_scaling(scaling: dict | None) -> None:
    """Refuse a scaling we do not implement exactly, naming what is wrong."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported by streamtrain's own LLaMA (supported: "
                         f"{', '.join(ROPE_TYPES)}); train this model through transformers with --model PATH")
    missing = [k for k in ROPE_KEYS[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs {', '.join(missing)}; the config gives {scaling}")
