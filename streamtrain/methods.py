"""Which update rule governs which parameter, for each training method.

GaLore (and the other low-rank rules) go on the attention and MLP weight matrices; embeddings,
norms and lm_head stay with full-rank AdamW, as in the GaLore paper.
"""
import re

from torch import nn

from .models.lora import has_lora
from .rules import AdamW, GaLore
from .rules.adarank import AdaRankGrad
from .rules.lora import ReLoRA

METHODS = ("adamw", "galore", "lora", "relora", "adarankgrad")
LOW_RANK_TARGET = re.compile(r"\.(self_attn|mlp)\.\w+_proj\.weight$")


def is_low_rank_target(name: str, param) -> bool:
    return param.dim() == 2 and bool(LOW_RANK_TARGET.search(name))


def assign_rules(model: nn.Module, method: str = "adamw", *, rank: int = 128, gap: int = 200,
                 scale: float = 0.25, states: str = "fp32", betas=(0.9, 0.999), eps: float = 1e-8,
                 subspace_from: str = "first_micro_batch", relora: dict | None = None,
                 adarank: dict | None = None, galore: dict | None = None) -> dict:
    """{parameter name: rule} for every trainable parameter of `model`.

    lora: the model must already carry adapters (models.lora.apply_lora); they train with AdamW.
    relora: the matrices get a ReLoRA rule (options in `relora`, see rules/lora.py, rank from
    `rank`), which wraps them with adapters after its warm start.
    adarankgrad: the matrices get an AdaRankGrad rule with r_max=`rank`, max_interval=`gap` and
    the other options (eta, r_min, svd, converge_threshold, refresh_share, ...) in `adarank`.
    galore: GaLore's refresh options (svd, refresh_share, seed, ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    adamw = AdamW(betas, eps, states)
    low_rank = adamw
    if method == "galore":
        low_rank = GaLore(rank, gap, scale, betas, eps, states, subspace_from, **(galore or {}))
    if method == "lora" and not has_lora(model):
        raise ValueError("method 'lora' needs adapters: call streamtrain.models.lora.apply_lora(model, ...) first")
    if method == "relora":
        low_rank = ReLoRA(rank, inner=adamw, **(relora or {}))
    if method == "adarankgrad":
        low_rank = AdaRankGrad(r_max=rank, max_interval=gap, scale=scale, betas=betas, eps=eps,
                               states=states, **(adarank or {}))
    return {name: (low_rank if is_low_rank_target(name, p) else adamw)
            for name, p in model.named_parameters() if p.requires_grad}
