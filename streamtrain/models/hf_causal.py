"""Any transformers causal LM behind streamtrain's model interface: a thin adapter.

transformers' model code is the well-kept library; nothing here re-implements an architecture.
`HFCausalLM` only exposes what the engine, trainer, planner and tracker need:

  forward(input_ids, targets)  the mean next-token loss (targets already shifted), computed from
                               the base model's final hidden states and the output head, in
                               chunks of tokens when asked (models/loss.py); logits without targets
  blocks                       the decoder layers (the memory tracker hooks them, rules and LoRA
                               find their linear layers inside them)
  get_output_embeddings()      the head (tied to the input embedding when the config says so)

Names. The adapter registers the transformers model's top-level children as its own, so every
parameter keeps its HF name (`model.layers.0.self_attn.q_proj.weight`, `transformer.h.0.attn.c_attn.weight`)
in checkpoints, rules, LoRA paths and exports; the transformers object itself (`.hf`) is held
outside the module tree and shares those children, so LoRA surgery inside a block changes both.

Loading. `build_hf_model` builds from the folder's config.json: from its safetensors weights
(single or sharded) when present -- strict, a missing or unexpected tensor is refused -- or with
transformers' own random init (seeded, drawn on the CPU) when the folder has a config only. On
the meta device nothing is allocated (the planner). Activation checkpointing is transformers'
own, non-reentrant (the engine refuses a hook that fires twice).
"""
from pathlib import Path

import torch
from torch import nn

from .hf_config import ModelConfigError, first_line, require_transformers
from .loss import next_token_loss

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


class HFCausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module, loss_chunk_tokens: int = 0):
        super().__init__()
        object.__setattr__(self, "hf", hf_model)  # outside the module tree: its children are ours
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self.config = hf_model.config
        self.loss_chunk_tokens = loss_chunk_tokens
        self.train(hf_model.training)

    @property
    def body(self) -> nn.Module:
        """The base model: embeddings, blocks, final norm (LlamaModel, GPT2Model, ...)."""
        return getattr(self.hf, self.hf.base_model_prefix)

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_layers(self.hf)

    def get_output_embeddings(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode  # the top-level object is not one of our children
        return self

    def forward(self, input_ids, targets=None):
        """Logits (B, T, V) when targets is None; otherwise the mean next-token loss."""
        h = self.body(input_ids=input_ids, use_cache=False).last_hidden_state  # after the final norm
        head = self.get_output_embeddings()
        if targets is None:
            return head(h)
        return next_token_loss(h, targets, head.weight, head.bias, self.loss_chunk_tokens)


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The ModuleList of repeated blocks: the one holding the classes transformers never splits
    across devices (`_no_split_modules`: LlamaDecoderLayer, GPT2Block, ...), else the one as long
    as the config's layer count."""
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    layers = hf_model.config.num_hidden_layers
    lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    for candidates in ([m for m in lists if type(m[0]).__name__ in names], [m for m in lists if len(m) == layers]):
        if candidates:
            return candidates[0]
    raise ModelConfigError(f"cannot find the decoder layers of {type(hf_model).__name__}")


# -- building ------------------------------------------------------------------------------------
def weights_in(path) -> bool:
    """True when the folder holds safetensors weights; a folder with only pickled weights is refused."""
    path = Path(path)
    if any((path / name).is_file() for name in SAFETENSORS):
        return True
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise ModelConfigError(f"--model {path} holds {pickles[0]} (a pickle, which runs code when loaded); streamtrain "
                               "loads safetensors only: convert it once where you trust the file, e.g. "
                               "AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(PATH)")
    return False


def build_hf_model(path, config, device="cpu", dtype=torch.float32, seed: int = 0, weights: bool = True,
                   activation_checkpointing: bool = False, loss_chunk_tokens: int = 0) -> HFCausalLM:
    """The model of `config` (transformers' config of the folder `path`): its weights when
    `weights` and the folder has them, else random init; on 'meta' shapes only."""
    transformers = require_transformers()
    if str(device) == "meta":
        with torch.device("meta"):
            hf_model = from_config(transformers, config, dtype)
    elif weights and weights_in(path):
        hf_model = from_pretrained(transformers, path, config, dtype).to(device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf_model = from_config(transformers, config, dtype).to(device)
    hf_model.config.architectures = [type(hf_model).__name__]
    if activation_checkpointing:
        enable_checkpointing(hf_model)
    model = HFCausalLM(hf_model, loss_chunk_tokens).train()
    if str(device) != "meta":
        check_head_path(model)
    return model


def from_config(transformers, config, dtype):
    try:
        return transformers.AutoModelForCausalLM.from_config(config, **{dtype_keyword(transformers): dtype})
    except ValueError as e:
        raise ModelConfigError(f"transformers has no causal LM for model_type {config.model_type!r} "
                               f"({first_line(e)})") from None


def from_pretrained(transformers, path, config, dtype):
    """Strict: every tensor of the model is in the files, every tensor of the files in the model,
    each with the shape config.json gives it."""
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), config=config, local_files_only=True, use_safetensors=True, output_loading_info=True,
            **{dtype_keyword(transformers): dtype})
    except (RuntimeError, ValueError, OSError) as e:  # transformers refuses mismatched shapes by raising
        mismatched = shape_mismatches(transformers, path, config)
        raise ModelConfigError(f"--model {path}: the weights do not match config.json ("
                               f"{'; '.join(mismatched[:2]) or first_line(e)}); check the folder") from None
    problems = {k: sorted(v)[:3] for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ModelConfigError(f"--model {path}: the weights do not match config.json "
                               f"({problems or info['error_msgs'][:1]}); check the folder")
    return model


def shape_mismatches(transformers, path, config) -> list[str]:
    """'name: (shape) in the files, (shape) in config.json' for each tensor whose shapes differ
    (read from the safetensors headers, nothing loaded)."""
    from safetensors import safe_open
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in from_config(transformers, config, torch.float32).state_dict().items()}
    found = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in shapes and shape != shapes[key]:
                    found.append(f"{key}: {shape} in the files, {shapes[key]} in config.json")
    return found


def dtype_keyword(transformers) -> str:
    """transformers 5 calls it `dtype`; 4.x `torch_dtype`."""
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def enable_checkpointing(hf_model) -> None:
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ModelConfigError(f"{type(hf_model).__name__} does not support activation checkpointing; "
                               "drop --activation-checkpointing")
    enable = getattr(hf_model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def check_head_path(model: HFCausalLM, tokens: int = 8) -> None:
    """The adapter computes logits as head(base model output); refuse an architecture whose own
    forward does more (a scale, a cap) rather than train it on a different loss."""
    was_training = model.training
    model.train(False)
    ids = torch.arange(tokens, device=model.get_output_embeddings().weight.device)[None] % model.config.vocab_size
    ours, theirs = model(ids).float(), model.hf(input_ids=ids, use_cache=False).logits.float()
    model.train(was_training)
    scale = theirs.abs().max().item() + 1e-6
    if (ours - theirs).abs().max().item() > 1e-3 * scale:
        raise ModelConfigError(f"{type(model.hf).__name__}'s forward changes the logits after its output head; "
                               "streamtrain's loss would differ from the model's, so it is refused")
