"""Where things are in a model, found by structure rather than by parameter names.

Every causal LM streamtrain trains (our LLaMA, any transformers model through the adapter, a
library user's own module) is a stack of repeated blocks between an embedding and an output head.
Update rules, LoRA targets and the memory tracker all ask the same questions:

  transformer_blocks(model)  the repeated blocks: `model.blocks` when the model says (our LLaMA,
                             the transformers adapter), else the longest nn.ModuleList
  linear_layers(model)       (path, module) of every linear layer: nn.Linear, and transformers'
                             Conv1D (GPT-2's), which stores its weight transposed as (in, out)
  block_linear_paths(model)  the linear layers inside the blocks: the default low-rank targets
  embedding_weights(model)   ids of the nn.Embedding weights (a tied output head shares one)
  match_paths(paths, ...)    user targets: a module path, its last components, or a regex
"""
import re

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def is_linear_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        return list(blocks)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if is_linear_layer(m)]


def block_linear_paths(model: nn.Module) -> list[str]:
    """Module paths of the linear layers inside the transformer blocks, in model order."""
    inside = {id(m) for block in transformer_blocks(model) for m in block.modules()}
    return [path for path, m in linear_layers(model) if id(m) in inside]


def output_head(model: nn.Module) -> nn.Module | None:
    """The layer that maps final hidden states to logits."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else getattr(model, "lm_head", None)


def embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def match_paths(paths: list[str], targets, what: str) -> list[str]:
    """The entries of `paths` that `targets` name: each target matches a path exactly, as its last
    components ('q_proj', 'self_attn.q_proj'; peft's rule) or as a regex (re.fullmatch). A target
    that matches nothing is an error naming `what` was searched."""
    if isinstance(targets, str):
        targets = [targets]
    chosen = set()
    for target in targets:
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"target {target!r} is not a valid name or regex: {e}") from None
        hits = [p for p in paths if p == target or p.endswith("." + target) or pattern.fullmatch(p)]
        if not hits:
            raise ValueError(f"target {target!r} matches no {what}; they are named like {paths[:3]} "
                             "(pass a name, a regex or 'all-linear')")
        chosen.update(hits)
    return [p for p in paths if p in chosen]
