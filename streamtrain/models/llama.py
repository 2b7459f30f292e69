"""LLaMA in plain PyTorch, with Hugging Face parameter names.

RMSNorm, rotary embeddings (HF's rotate-half convention and frequencies, with linear and llama3
scaling, so HF checkpoints give the same logits), SwiGLU MLP, causal attention through
scaled_dot_product_attention, optional grouped-query attention, an explicit head_dim, lm_head
untied or tied to the embeddings, optional per-block activation checkpointing, and a
cross-entropy that can run in chunks of tokens so the full (tokens x vocab) logits never exist
at once. `blocks` is the list of decoder layers (the memory tracker hooks them).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .int8 import set_weight
from .loss import next_token_loss
from .presets import LlamaConfig
from .rope import inverse_frequencies, rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 like HF, then cast back before the (possibly bf16) weight
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.kv_heads, c.head_size
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv != self.n_heads:
            repeat = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, activation_checkpointing: bool = False,
                 loss_chunk_tokens: int = 0):
        super().__init__()
        self.config = config.validate()
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # one Parameter under two names, as in HF
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def reset_parameters(self, seed: int | None = None, std: float = 0.02):
        """HF-style init: normal(0, std) for matrices, ones for norms."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.is_meta:
                    continue
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:  # (an INT8 layer's weight: quantized into its codes, models/int8.py)
                    set_weight(p, torch.randn(p.shape, generator=gen) * std)
        return self

    def hidden_states(self, input_ids):
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        c = self.config
        cos, sin = rotary_tables(T, inverse_frequencies(c.head_size, c.rope_theta, c.rope_scaling, x.device), x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids, targets=None):
        """Logits (B, T, V) when targets is None; otherwise the mean next-token loss."""
        h = self.hidden_states(input_ids)
        if targets is None:
            return self.lm_head(h)
        return self.loss(h, targets)

    def loss(self, h, targets):
        return next_token_loss(h, targets, self.lm_head.weight, chunk=self.loss_chunk_tokens)


def build_model(config: LlamaConfig, device="cpu", dtype=torch.float32, seed: int | None = 0,
                activation_checkpointing=False, loss_chunk_tokens=0) -> Llama:
    """Build on `device`; on the meta device nothing is allocated and nothing is initialised."""
    with torch.device(device):
        model = Llama(config, activation_checkpointing, loss_chunk_tokens)
    model.to(dtype)
    if str(device) != "meta":
        model.reset_parameters(seed)
    return model


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
