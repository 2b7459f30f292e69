"""LoRA adapters on linear layers, with merge/unmerge and export in peft's and HF's layouts.

A wrapped layer computes  y = x W^T + scale * (dropout(x) A^T) B^T  with the base W frozen,
A (r x in) and B (out x r) trainable, scale = alpha / r (rsLoRA: alpha / sqrt(r)). The base may
be an nn.Linear or transformers' Conv1D (GPT-2), whose weight is stored transposed, (in x out):
the adapter is the same, and merging adds (B A)^T to it (peft's `fan_in_fan_out`).

Targets. 'all-linear' wraps the linear layers inside the transformer blocks (models/structure.py):
attention and MLP projections, never the embeddings or the output head; a tied head is an
embedding. A list picks layers by path, last components or regex.

Names. The wrapper replaces the nn.Linear at the same module path and keeps the frozen base as
its own `weight`, so `model.layers.0.self_attn.q_proj.weight` keeps its HF name (checkpoints,
`merged_state_dict`, `load_hf_weights` all see HF names) and the adapters are
`...q_proj.lora_A` / `...q_proj.lora_B`. peft's file names them
`base_model.model.<path>.lora_A.weight` (no adapter name); `save_peft_adapter` maps to that.

Initialisation. peft's default (A kaiming-uniform, B = 0) gives A a zero gradient on the first
step (dL/dA = scale * B^T dL/dy^T x = 0), and zeroing A instead starves B. The default here,
"split", keeps the output exactly equal to the base while giving both matrices a gradient:
the first half of the rank is standard LoRA (A rows kaiming-uniform, B columns zero) and the
second half is its mirror (A rows zero, B columns uniform with A's bound). B @ A is then an exact
zero (every product has a zero factor), so the forward adds exact zeros, and
    dL/dB[:, :h] = scale * dL/dy^T (x A[:h]^T) != 0,   dL/dA[h:] = scale * B[:, h:]^T dL/dy^T x != 0.
The base weight is untouched, so the exported adapter is an ordinary peft LoRA for the original
checkpoint. B's half uses A's bound 1/sqrt(in) so both halves move W by the same amount under
Adam. init="standard" gives peft's init. "split" needs rank >= 2.

Fine-tuning an HF checkpoint: build the model, `streamtrain.hf.load_hf_weights(model, path)`
(strict about names), THEN `apply_lora(...)`. Export with `save_peft_adapter` (adapter only) or
`streamtrain.hf.save_hf(merged_state_dict(model), config, out_dir)` (merged model).
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .structure import block_linear_paths, is_conv1d, linear_layers, match_paths, output_head

LORA_INITS = ("split", "standard")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "split", generator: torch.Generator | None = None):
        super().__init__()
        check_lora_settings(rank, alpha, dropout, init)
        self.fan_in_fan_out = is_conv1d(base)  # weight stored (in, out)
        self.in_features, self.out_features = (
            (base.nx, base.nf) if self.fan_in_fan_out else (base.in_features, base.out_features))
        self.rank, self.alpha, self.rslora, self.init = rank, float(alpha), rslora, init
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        # the base's own Parameter objects: same tensors, same names, now frozen
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        self.merged = False
        self.reset_adapters(generator)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in nn.Linear's (out, in) layout (a view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x):
        y = F.linear(x, self.base_weight(), self.bias)
        if self.merged:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise A and B so that B @ A == 0 exactly (see the module docstring).
        Drawn on the CPU in fp32 so a seed gives the same adapters on every device."""
        if self.lora_A.is_meta:   # a planning dry run: shapes only
            return
        a = torch.empty(self.rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)   # peft's init of A
        b = torch.zeros(self.out_features, self.rank)
        if self.init == "split":
            half = (self.rank + 1) // 2
            bound = 1 / math.sqrt(self.in_features)   # = kaiming_uniform_(a=sqrt(5))'s bound for A
            a[half:] = 0
            b[:, half:] = torch.empty(self.out_features, self.rank - half).uniform_(
                -bound, bound, generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 for fp32/bf16 weights (fp64 ones stay fp64)."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, in the stored weight's layout (transposed for Conv1D)."""
        dtype = self.compute_dtype
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).mul_(self.scale)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, summed in fp32 and cast to the weight's dtype."""
        return (self.weight.to(self.compute_dtype) + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        self.weight.copy_((self.weight.to(self.compute_dtype) + sign * self.delta_weight()).to(self.weight.dtype))

    def merge(self) -> None:
        """W += scale * B @ A (fp32, then cast); the forward then skips the adapter."""
        if self.merged:
            raise ValueError("adapter is already merged; call unmerge() first")
        self._add_delta(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge() (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            raise ValueError("adapter is not merged; nothing to unmerge")
        self._add_delta(-1.0)
        self.merged = False

    def fold_and_reset(self, generator: torch.Generator | None = None) -> None:
        """ReLoRA's restart: W += scale * B @ A, then fresh adapters (B @ A == 0 again), so the
        layer's output is unchanged up to rounding of the merge."""
        if self.merged:
            raise ValueError("cannot fold a merged adapter; call unmerge() first")
        self._add_delta(1.0)
        self.reset_adapters(generator)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, init={self.init}, merged={self.merged}"
                + (", conv1d" if self.fan_in_fan_out else ""))


def check_lora_settings(rank: int, alpha: float, dropout: float, init: str) -> None:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; choose one of {LORA_INITS}")
    if init == "split" and rank < 2:
        raise ValueError("LoRA init 'split' needs rank >= 2 (half standard, half mirrored); "
                         "raise the rank or use init='standard'")


# -- wrapping a model ---------------------------------------------------------------------------
def target_paths(model: nn.Module, targets) -> list[str]:
    """Module paths of the linear layers (nn.Linear, Conv1D) named by `targets`: 'all-linear'
    (those inside the transformer blocks), or a list whose entries match a path exactly, as its
    last components ('q_proj', 'self_attn.q_proj'; peft's rule), or as a regular expression."""
    if targets == "all-linear":
        paths = block_linear_paths(model)
        if not paths:
            raise ValueError("LoRA 'all-linear' found no linear layer inside the model's blocks; "
                             "name the layers to wrap (--lora-targets)")
        return paths
    linear = linear_layers(model)
    chosen = match_paths([p for p, _ in linear], targets, "nn.Linear or Conv1D layer")
    head = output_head(model)
    for path, m in linear:
        if m is head and path in chosen:  # the loss reads the head's weight directly: an adapter would be ignored
            raise ValueError(f"LoRA cannot wrap the output head {path} (the loss reads its weight directly); "
                             "train it full-rank instead")
    return chosen


def apply_lora(model: nn.Module, targets="all-linear", rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False, init: str = "split", seed: int = 0,
               freeze_others: bool = True) -> list[str]:
    """Replace the targeted linear layers of `model` by LoRALinear, in place; returns their
    paths. Base weights are frozen; with `freeze_others` (LoRA fine-tuning) every other parameter
    is frozen too, while ReLoRA keeps embeddings, norms and the output head trainable. Apply it after
    loading base weights (`streamtrain.hf.load_hf_weights` is strict about names)."""
    check_lora_settings(rank, alpha, dropout, init)
    paths = target_paths(model, targets)
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout, rslora, init,
                                         generator))
    return paths


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


# -- export -------------------------------------------------------------------------------------
def is_adapter_name(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors (HF names), adapters left out and not merged in."""
    return {n: t for n, t in model.state_dict().items() if not is_adapter_name(n)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors of the model with every adapter merged in (fp32 sum, cast to the weight's
    dtype). The model itself is not changed; unchanged tensors share its storage."""
    state = base_state_dict(model)
    for path, m in lora_modules(model):
        if not m.merged:
            state[f"{path}.weight"] = m.merged_weight()
    return state


def peft_target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """peft's `target_modules`: the leaf names when they pick out exactly the wrapped layers,
    else the full paths (peft matches a list entry by equality or '.'-suffix)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    candidates = {path for path, _ in model.named_modules() if path.rsplit(".", 1)[-1] in leaves}
    return leaves if candidates == set(paths) else sorted(paths)


def peft_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under peft's saved key names."""
    state = {}
    for path, m in lora_modules(model):
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    return state


def save_peft_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` as peft saves a LoRA for a
    causal LM; `PeftModel.from_pretrained(hf_model, out_dir)` then reproduces this model, given
    the base weights it was trained on (`base_state_dict`)."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters; call apply_lora(model, ...) first")
    settings = {(m.rank, m.alpha, m.rslora, m.dropout_p, m.fan_in_fan_out) for _, m in modules}
    if len(settings) != 1:
        raise ValueError(f"adapters differ in (rank, alpha, rslora, dropout, conv1d) {sorted(settings)}; "
                         "peft export needs one setting for all")
    trained_outside = [n for n, p in model.named_parameters()
                       if p.requires_grad and not is_adapter_name(n)]
    if trained_outside:
        raise ValueError(f"parameters outside the adapters are trainable ({trained_outside[:3]}); "
                         "an adapter file cannot carry them: export merged_state_dict(model) instead")
    rank, alpha, rslora, dropout, fan_in_fan_out = settings.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora, "bias": "none",
        "target_modules": peft_target_modules(model, [p for p, _ in modules]),
        "fan_in_fan_out": fan_in_fan_out, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_adapter_state(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
