"""Named LLaMA presets: one table of plain data, loaded by name with overrides.

The llama-9m ... llama-7b shapes are the GaLore paper's (its configs/llama_*.json, vocab 32000).
The byte-* presets use the 256-symbol byte tokenizer so they train on the built-in corpus.
"""
from dataclasses import asdict, dataclass, fields, replace

from .rope import check_rope_scaling


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as attention heads (no GQA)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # read from HF configs (hf_config.py); the presets keep the defaults
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False       # lm_head shares the embedding matrix
    rope_scaling: dict | None = None        # {'rope_type': 'linear' | 'llama3', ...} (models/rope.py)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head (HF's head_dim, derived when the config leaves it out)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> "LlamaConfig":
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim {self.head_size} must be even for rotary embeddings")
        check_rope_scaling(self.rope_scaling)
        return self

    def identity(self) -> dict:
        """The architecture as a checkpoint records it; fields added later are left out while at
        their default, so checkpoints written before they existed still match."""
        defaults = LlamaConfig()
        return {k: v for k, v in asdict(self).items()
                if k not in LATER_FIELDS or v != getattr(defaults, k)}


LATER_FIELDS = ("head_dim", "tie_word_embeddings", "rope_scaling")


PRESETS: dict[str, LlamaConfig] = {
    # GaLore paper shapes
    "llama-9m": LlamaConfig(32000, 128, 352, 4, 4, max_position_embeddings=1024),
    "llama-20m": LlamaConfig(32000, 256, 688, 4, 4, max_position_embeddings=1024),
    "llama-35m": LlamaConfig(32000, 384, 1024, 6, 8, max_position_embeddings=1024),
    "llama-60m": LlamaConfig(32000, 512, 1376, 8, 8, max_position_embeddings=1024),
    "llama-130m": LlamaConfig(32000, 768, 2048, 12, 12, max_position_embeddings=1024),
    "llama-350m": LlamaConfig(32000, 1024, 2736, 24, 16, max_position_embeddings=1024),
    "llama-1b": LlamaConfig(32000, 2048, 5461, 24, 32, max_position_embeddings=1024),
    "llama-3b": LlamaConfig(32000, 2560, 6848, 32, 32, max_position_embeddings=1024),
    "llama-7b": LlamaConfig(32000, 4096, 11008, 32, 32, max_position_embeddings=2048),
    # byte-level presets for the built-in corpus (vocab = 256 byte symbols)
    "byte-tiny": LlamaConfig(256, 128, 352, 2, 4, max_position_embeddings=512),
    "byte-small": LlamaConfig(256, 256, 688, 4, 4, max_position_embeddings=1024),
}

DEFAULT_PRESET = "byte-tiny"


def get_config(name: str, **overrides) -> LlamaConfig:
    """Preset by name, with field overrides (e.g. num_hidden_layers=2 for tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(LlamaConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; known fields: {sorted(known)}")
    return replace(PRESETS[name], **overrides).validate()


def parameter_count(config: LlamaConfig) -> int:
    h, i, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_size, config.kv_heads * config.head_size
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    return (1 if config.tie_word_embeddings else 2) * v * h + L * per_layer + h


def describe_presets() -> str:
    rows = [f"{'name':<12} {'params':>8} {'hidden':>6} {'inter':>6} {'layers':>6} {'heads':>5} {'vocab':>6}"]
    for name, c in PRESETS.items():
        n = parameter_count(c)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        rows.append(f"{name:<12} {size:>8} {c.hidden_size:>6} {c.intermediate_size:>6} "
                    f"{c.num_hidden_layers:>6} {c.num_attention_heads:>5} {c.vocab_size:>6}")
    return "\n".join(rows)
