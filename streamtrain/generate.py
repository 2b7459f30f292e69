"""`streamtrain generate FOLDER`: sample text from a trained model folder (a run's `<out>/final`).

Loading is one small interface, so other kinds of model folders can join: `load_for_generation`
reads `config.json`, picks the loader registered for its `model_type` in MODEL_LOADERS (a
function folder, device -> model whose call on token ids (1, T) gives logits (1, T, V), or an
object with `.logits`), and finds the tokenizer: `--tokenizer`, else a `tokenizer.json` in the
folder, else the tokenizer the run that wrote the folder trained with (its `run_config.json` one
level up), else bytes. Sampling is plain: the whole context each token (no KV cache; the models
this trains on a CPU are small), temperature, top-k, a seeded torch.Generator. A document starts
after the end-of-text token in training, so the prompt is conditioned on it when there is one.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import make_tokenizer
from .data.errors import DataError
from .hf import config_from_hf, load_hf_weights
from .models.llama import build_model


class GenerateError(ValueError):
    pass


@dataclass
class Loaded:
    model: torch.nn.Module   # model(ids (1, T)) -> logits (1, T, V)
    tokenizer: object        # encode(text) -> ids, decode(ids) -> text, vocab_size, eos_id
    max_positions: int       # the longest context the model takes
    device: torch.device


def load_llama(folder: Path, device) -> torch.nn.Module:
    """Our LLaMA from an HF-format folder (streamtrain.hf.save_hf), in float32 for sampling."""
    model = build_model(config_from_hf(folder), device="meta")
    model = model.to_empty(device=device)
    load_hf_weights(model, folder)
    return model.eval()


MODEL_LOADERS = {"llama": load_llama}  # config.json's model_type -> loader


def load_for_generation(folder, tokenizer: str | None = None, device="cpu") -> Loaded:
    """The model and tokenizer of `folder`; a one-line GenerateError when either is missing."""
    folder, device = Path(folder), torch.device(device)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise GenerateError(f"{folder} holds no config.json; pass a model folder such as a run's <out>/final")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_LOADERS:
        raise GenerateError(f"{folder}: model_type {model_type!r} is not supported; supported: "
                            f"{', '.join(MODEL_LOADERS)}")
    model = MODEL_LOADERS[model_type](folder, device)
    vocab, positions = model.config.vocab_size, model.config.max_position_embeddings
    return Loaded(model, find_tokenizer(folder, tokenizer, vocab), positions, device)


def find_tokenizer(folder: Path, explicit: str | None, vocab_size: int):
    """The tokenizer to use with the model in `folder` (see the module docstring for the order)."""
    path = explicit
    if path is None and (folder / "tokenizer.json").is_file():
        path = str(folder / "tokenizer.json")
    run_config = folder.parent / "run_config.json"
    if path is None and run_config.is_file():
        path = json.loads(run_config.read_text()).get("tokenizer")
    try:
        tokenizer = make_tokenizer(path)
    except DataError as e:
        raise GenerateError(f"{e}; pass --tokenizer with the tokenizer.json the model was trained with") from None
    if path is None and vocab_size != tokenizer.vocab_size:
        raise GenerateError(f"{folder}: found no tokenizer for a model of vocabulary {vocab_size} (bytes have "
                            f"{tokenizer.vocab_size}); pass --tokenizer tokenizer.json")
    if tokenizer.vocab_size > vocab_size:
        raise GenerateError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
                            "pass the tokenizer the model was trained with")
    return tokenizer


# -- sampling ------------------------------------------------------------------------------------
def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token from a (V,) logits vector: the argmax at temperature 0, else a draw from the
    softmax of logits / temperature over the top_k largest (all when top_k is 0)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def sample(loaded: Loaded, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0) -> str:
    """The text that follows `prompt` (without it): up to max_new_tokens tokens, stopping early at
    the end-of-text token."""
    generator = torch.Generator().manual_seed(seed)
    eos = loaded.tokenizer.eos_id
    ids = ([] if eos is None else [eos]) + [int(i) for i in loaded.tokenizer.encode(prompt)]
    if not ids:
        raise GenerateError("--prompt: an empty prompt needs a tokenizer with an end-of-text token; pass a prompt")
    new = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-loaded.max_positions:]], device=loaded.device)
        output = loaded.model(context)
        # a model's vocabulary may be padded beyond its tokenizer's: never sample an id it cannot decode
        logits = getattr(output, "logits", output)[0, -1, :loaded.tokenizer.vocab_size]
        token = next_token(logits, temperature, top_k, generator)
        if token == eos:
            break
        ids.append(token)
        new.append(token)
    return loaded.tokenizer.decode(new)


# -- the command ---------------------------------------------------------------------------------
def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a trained model folder.")
    p.add_argument("folder", help="model folder: a run's <out>/final (model.safetensors + config.json)")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = all (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the folder's, else the run's, "
                                                     "else bytes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    return p


def check_arguments(args) -> None:
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise GenerateError(f"--temperature: must be a finite number >= 0, got {args.temperature}; 0 is greedy")
    if args.top_k < 0:
        raise GenerateError(f"--top-k: must be >= 0, got {args.top_k}; 0 samples among all tokens")
    if not Path(args.folder).is_dir():
        raise GenerateError(f"{args.folder} is not a folder; pass a model folder such as a run's <out>/final")


def main(argv=None, prog: str = "streamtrain generate") -> int:
    args = parser(prog).parse_args(argv)
    try:
        check_arguments(args)
        from .recipe import resolve_device
        loaded = load_for_generation(args.folder, args.tokenizer, resolve_device(args.device))
        text = sample(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m streamtrain.generate"))
