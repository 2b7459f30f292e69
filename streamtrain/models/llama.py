"""LLaMA in plain PyTorch, with Hugging Face parameter names.

RMSNorm, rotary embeddings (HF's rotate-half convention, so HF checkpoints give the same logits),
SwiGLU MLP, causal attention through scaled_dot_product_attention, optional grouped-query
attention, untied lm_head, optional per-block activation checkpointing, and a cross-entropy that
can run in chunks of tokens so the full (tokens x vocab) logits never exist at once.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .presets import LlamaConfig


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


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.kv_heads, c.head_dim
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
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        self.hooks = None  # optional per-block callbacks (the memory profiler sets this)

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
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def hidden_states(self, input_ids):
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_tables(T, self.config.head_dim, self.config.rope_theta, x.device, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
            if self.hooks is not None:
                self.hooks.after_block(i)
        return self.model.norm(x)

    def forward(self, input_ids, targets=None):
        """Logits (B, T, V) when targets is None; otherwise the mean next-token loss."""
        h = self.hidden_states(input_ids)
        if targets is None:
            return self.lm_head(h)
        return self.loss(h, targets)

    def loss(self, h, targets):
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        chunk = self.loss_chunk_tokens
        if chunk <= 0 or chunk >= h.shape[0]:
            return _chunk_loss_sum(h, targets, self.lm_head.weight) / targets.numel()
        # Each chunk's logits are recomputed in backward (checkpoint), so at most one chunk of
        # (chunk x vocab) logits, their fp32 upcast and their gradient exist at any moment.
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            total = total + checkpoint(_chunk_loss_sum, h[sl], targets[sl], self.lm_head.weight,
                                       use_reentrant=False)
        return total / targets.numel()


def _chunk_loss_sum(h, targets, weight):
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


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
