"""Which update rule governs which parameter, for each training method.

Decided by structure, not by names (models/structure.py), so it means the same on our LLaMA and
on any transformers model:

  low-rank rule   the 2-D weights of the linear layers inside the transformer blocks (nn.Linear,
                  and GPT-2's Conv1D with its transposed layout; a fused q/k/v is one matrix):
                  GaLore, AdaRankGrad or ReLoRA. `targets` (--low-rank-targets: module names or
                  regexes) picks other linear layers instead.
  AdamW           every other matrix (an untied output head, linear layers outside the blocks),
                  with the engine's weight decay
  AdamW, no decay norms, biases and embeddings (a tied output head is the embedding matrix: one
                  parameter, governed once), the nanoGPT / HF convention

Each rule object is a parameter group (rules/base.py: Rule.weight_decay, Rule.lr_scale). A
low-rank method whose targets hold no matrix is an error, never a silent full-rank run.
"""
import re

from torch import nn

from .models.lora import has_lora
from .models.structure import block_linear_paths, embedding_weights, linear_layers, match_paths
from .rules import AdamW, GaLore
from .rules.adarank import AdaRankGrad
from .rules.lora import ReLoRA

METHODS = ("adamw", "galore", "lora", "relora", "adarankgrad")
LOW_RANK_RULES = ("galore", "relora", "adarankgrad")   # methods whose rule replaces AdamW on matrices
# Our LLaMA's attention/MLP matrices by name; kept for callers that only have a name (bench.py).
LOW_RANK_TARGET = re.compile(r"\.(self_attn|mlp)\.\w+_proj\.weight$")


def is_low_rank_target(name: str, param) -> bool:
    return param.dim() == 2 and bool(LOW_RANK_TARGET.search(name))


def low_rank_names(model: nn.Module, targets=None) -> list[str]:
    """Names (as model.named_parameters() gives them) of the matrices a low-rank rule governs: the
    weights of the linear layers inside the blocks, or of those `targets` names. A weight shared
    with an embedding (tied) stays full-rank."""
    layers = dict(linear_layers(model))
    targets = None if targets in ("all-linear", ["all-linear"]) else targets
    paths = block_linear_paths(model) if targets is None else match_paths(
        list(layers), targets, "nn.Linear or Conv1D layer (--low-rank-targets)")
    chosen = {id(layers[p].weight) for p in paths} - embedding_weights(model)
    return [n for n, p in model.named_parameters() if id(p) in chosen and p.dim() == 2]


def undecayed_names(model: nn.Module) -> set[str]:
    """Norms, biases (every parameter below 2-D) and embedding matrices."""
    embeddings = embedding_weights(model)
    return {n for n, p in model.named_parameters() if p.dim() < 2 or id(p) in embeddings}


def assign_rules(model: nn.Module, method: str = "adamw", *, rank: int = 128, gap: int = 200,
                 scale: float = 0.25, states: str = "fp32", betas=(0.9, 0.999), eps: float = 1e-8,
                 subspace_from: str = "first_micro_batch", relora: dict | None = None,
                 adarank: dict | None = None, galore: dict | None = None, targets=None) -> dict:
    """{parameter name: rule} for every trainable parameter of `model`.

    lora: the model must already carry adapters (models.lora.apply_lora); they train with AdamW.
    relora: the matrices get a ReLoRA rule (options in `relora`, see rules/lora.py, rank from
    `rank`), which wraps them with adapters after its warm start.
    adarankgrad: the matrices get an AdaRankGrad rule with r_max=`rank`, max_interval=`gap` and
    the other options (eta, r_min, svd, converge_threshold, refresh_share, ...) in `adarank`.
    galore: GaLore's refresh options (svd, refresh_share, seed, ...).
    targets: module names or regexes of the linear layers the low-rank rule governs (default:
    those inside the transformer blocks)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "lora" and not has_lora(model):
        raise ValueError("method 'lora' needs adapters: call streamtrain.models.lora.apply_lora(model, ...) first")
    adamw, undecayed = AdamW(betas, eps, states), AdamW(betas, eps, states)
    undecayed.weight_decay = 0.0
    low_rank = low_rank_rule(method, adamw, rank=rank, gap=gap, scale=scale, states=states, betas=betas,
                             eps=eps, subspace_from=subspace_from, relora=relora, adarank=adarank, galore=galore)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    matrices = set(low_rank_names(model, targets)) & set(trainable) if low_rank is not None else set()
    if low_rank is not None and not matrices:
        raise ValueError(f"--method {method} governs no trainable matrix in this model (its low-rank targets "
                         "are the linear layers inside the blocks); name them with --low-rank-targets")
    no_decay = undecayed_names(model)
    return {n: low_rank if n in matrices else undecayed if n in no_decay else adamw for n in trainable}


def low_rank_rule(method: str, adamw: AdamW, *, rank, gap, scale, states, betas, eps, subspace_from,
                  relora, adarank, galore=None):
    """The rule object of a low-rank method (None for adamw and lora: AdamW everywhere)."""
    if method == "galore":
        return GaLore(rank, gap, scale, betas, eps, states, subspace_from, **(galore or {}))
    if method == "relora":
        return ReLoRA(rank, inner=adamw, **(relora or {}))
    if method == "adarankgrad":
        return AdaRankGrad(r_max=rank, max_interval=gap, scale=scale, betas=betas, eps=eps,
                           states=states, **(adarank or {}))
    return None


def rule_summary(model: nn.Module, rules: dict) -> list[dict]:
    """One row per rule object: what it governs (tensors, matrices) and its share of the
    trainable parameters."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in rules) or 1
    rows = {}
    for name, rule in rules.items():
        row = rows.setdefault(id(rule), {"rule": rule_label(rule), "tensors": 0, "matrices": 0, "parameters": 0})
        row["tensors"] += 1
        row["matrices"] += params[name].dim() == 2
        row["parameters"] += params[name].numel()
    ordered = sorted(rows.values(), key=lambda row: -row["parameters"])
    return [{**row, "share": round(row["parameters"] / total, 4)} for row in ordered]


def rule_label(rule) -> str:
    return rule.name + (" (no weight decay)" if rule.weight_decay == 0.0 else "")


def format_rule_summary(rows: list[dict]) -> str:
    """'rules: galore on 14 matrices (83.1% of trainable parameters); adamw ...' on one line."""
    parts = [f"{r['rule']} on {r['tensors']} tensor{'s' * (r['tensors'] != 1)}, {r['matrices']} "
             f"matri{'ces' if r['matrices'] != 1 else 'x'} ({100 * r['share']:.1f}% of trainable parameters)"
             for r in rows]
    return "rules: " + "; ".join(parts)
