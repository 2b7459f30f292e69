"""The optimizers the engine is measured against, each behind one recipe.

A recipe is (make_optimizer(name, params), per_parameter): per_parameter recipes get one
optimizer per parameter, stepped in that parameter's post-accumulate-grad hook (TorchOptimizers);
the others one optimizer over all parameters, stepped after backward. The peer packages
(galore-torch, bitsandbytes, torchao) come with `pip install -e ".[bench]"`; a row whose package
does not import is skipped with one line saying why (`missing`).
"""
import importlib

import torch

from ..config import TrainConfig

# driver -> the module it needs (None: torch alone)
PEER_MODULES = {"torch": None, "fused-hooks": None, "galore-torch": "galore_torch",
                "galore-torch-8bit": "galore_torch", "bnb-8bit": "bitsandbytes", "bnb-8bit-hooks": "bitsandbytes",
                "torchao-8bit": "torchao.optim"}
PEER_PACKAGES = ("galore-torch", "transformers", "bitsandbytes", "torchao")  # distributions named in the table
# drivers whose step the memory tracker (a TorchDispatchMode) cannot watch
UNTRACKABLE = {"torchao-8bit": "its torch.compile'd step refuses to run under the tensor tracker's dispatch mode"}


def missing(driver: str, device: str) -> str | None:
    """Why `driver` cannot run on `device` here (one line), or None when it can."""
    if driver not in PEER_MODULES:
        raise ValueError(f"unknown bench driver {driver!r}")
    if driver == "galore-torch-8bit" and device != "cuda":
        return "GaLoreAdamW8bit calls torch.cuda.synchronize(), so it runs on CUDA only"
    module = PEER_MODULES[driver]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any import failure (a missing dependency, a broken build) means: skip
        first = (str(e).splitlines() or [""])[0]
        return f"`import {module}` failed ({type(e).__name__}: {first}); pip install -e \".[bench]\""
    return None


def untrackable_reason(row) -> str | None:
    return UNTRACKABLE.get(row.driver)


def optimizer_recipe(driver: str, config: TrainConfig, low_rank=frozenset()):
    """(make_optimizer(name, params), per_parameter) for a row that is not the engine.
    `low_rank`: names of the matrices GaLore governs (the engine's choice: methods.low_rank_names)."""
    adam = dict(lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    if driver == "torch":
        return (lambda name, params: torch.optim.AdamW(as_list(params), **adam)), False
    if driver == "fused-hooks":
        return (lambda name, params: torch.optim.AdamW(as_list(params), fused=True, **adam)), True
    if driver in ("bnb-8bit", "bnb-8bit-hooks"):
        import bitsandbytes as bnb
        return (lambda name, params: bnb.optim.AdamW8bit(as_list(params), **adam)), driver == "bnb-8bit-hooks"
    if driver == "torchao-8bit":
        from torchao.optim import AdamW8bit
        return (lambda name, params: AdamW8bit(as_list(params), **adam)), False
    if driver in ("galore-torch", "galore-torch-8bit"):
        return galore_torch_recipe(driver, config, adam, low_rank), True
    raise ValueError(f"unknown bench driver {driver!r}")


def galore_torch_recipe(driver: str, config: TrainConfig, adam: dict, low_rank):
    """The authors' per-layer recipe: GaLore on the attention/MLP matrices, Adam elsewhere, one
    optimizer per parameter (8-bit: GaLoreAdamW8bit and bitsandbytes' Adam8bit)."""
    galore = dict(rank=config.rank, update_proj_gap=config.galore_gap, scale=config.galore_scale, proj_type="std")
    if driver == "galore-torch":
        from galore_torch import GaLoreAdamW

        def make(name, p):
            group = {"params": [p], **(galore if name in low_rank else {})}
            return GaLoreAdamW([group], no_deprecation_warning=True, **adam)
        return make
    import bitsandbytes as bnb
    from galore_torch import GaLoreAdamW8bit

    def make_8bit(name, p):
        if name in low_rank:
            return GaLoreAdamW8bit([{"params": [p], **galore}], **adam)
        return bnb.optim.Adam8bit([p], **adam)
    return make_8bit


def as_list(params) -> list:
    """A parameter list: per-parameter recipes are handed one tensor, the others a list."""
    return [params] if isinstance(params, torch.Tensor) else list(params)
