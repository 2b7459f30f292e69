"""Hugging Face model folders on disk: weights, config.json, tokenizer files.

A folder transformers loads with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`: `model.safetensors` (or shards with
`model.safetensors.index.json`), `config.json`, optionally `generation_config.json`, and the
tokenizer's files. Parameter names are HF's for both our LLaMA and the transformers adapter, so
saving is a straight write (a tied head, one tensor under two names, is written once as
transformers does) and loading a checked copy.

Tokenizers in an export: a model folder's own tokenizer files are copied; a `--tokenizer` file
becomes tokenizer.json; the byte tokenizer is written as a byte-level BPE tokenizer.json with no
merges whose 256 tokens have ids equal to the byte values, so `AutoTokenizer` encodes and
decodes exactly as streamtrain's ByteTokenizer does (id 0, NUL, separates documents).
"""
import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models.hf_config import config_from_hf, is_llama_config, llama_hf_config  # noqa: F401 (re-exported)
from .models.int8 import set_weight
from .models.presets import LlamaConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def is_model_folder(path) -> bool:
    return Path(path, "config.json").is_file()


def save_hf(state: dict[str, torch.Tensor], config, out_dir, max_shard_bytes: int | None = None):
    """Write `state` (HF names) and config.json: one weights file, or shards of at most
    `max_shard_bytes` plus an index. `config` is our LlamaConfig or a transformers config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unique_tensors(state).items()}
    dtype = next(iter(state.values())).dtype
    write_config(config, dtype, out)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(state, str(out / SINGLE_NAME), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def unique_tensors(state: dict) -> dict:
    """Drop later names of a tensor already present (a tied head): transformers writes it once
    and ties it again on load."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def write_config(config, dtype: torch.dtype, out: Path) -> None:
    if is_llama_config(config):
        (out / "config.json").write_text(json.dumps(llama_hf_config(config, dtype), indent=2))
        return
    from .models.hf_causal import dtype_keyword, require_transformers
    config = copy.deepcopy(config)
    setattr(config, dtype_keyword(require_transformers()), dtype)  # the weights' dtype, as written
    config.save_pretrained(str(out))


def read_hf(path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (single or sharded) or of one .safetensors file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif (path / SINGLE_NAME).is_file():
        files = [path / SINGLE_NAME]
    else:
        raise ValueError(f"{path} holds no {SINGLE_NAME} or {INDEX_NAME}; point to an HF model folder")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read weights from {f}: {e}") from None
    return state


def load_hf_weights(model: torch.nn.Module, path) -> None:
    """Copy HF-format weights into `model`, refusing missing, unexpected or mis-shaped tensors.
    A tied head may be absent from the files (transformers writes it once)."""
    state = read_hf(path)
    own = dict(model.named_parameters())
    tied = set(model.state_dict()) - set(own)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own) - tied)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; check --model against the checkpoint")
    with torch.no_grad():
        for name, p in own.items():
            if state[name].shape != p.shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)} in {path} but "
                                 f"{tuple(p.shape)} in the model; to train the folder's own architecture "
                                 f"pass it as --model {Path(path).parent if Path(path).is_file() else path}")
            set_weight(p, state[name])  # (an INT8 layer quantizes it into its codes)


def check_init_from(path, config: LlamaConfig) -> None:
    """--init-from with a preset: the folder's config.json (if any) must describe the preset's
    architecture exactly (read strictly, models/hf_config.py), else say to use --model PATH."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not is_model_folder(folder):
        return
    theirs = config_from_hf(folder)
    if theirs.identity() != config.identity():
        differing = sorted(k for k, v in theirs.identity().items() if config.identity().get(k) != v)
        raise ValueError(f"--init-from {path}: its config.json differs from the preset in {', '.join(differing)}; "
                         f"to train the folder's own architecture pass --model {folder}")


# -- tokenizer files -----------------------------------------------------------------------------
def save_tokenizer_files(out_dir, tokenizer_file: str | None = None, model_folder: str | None = None) -> list[str]:
    """Write the tokenizer a run used into `out_dir` for AutoTokenizer: a --tokenizer file, the
    model folder's own tokenizer files, or (neither) the byte tokenizer. Returns the files written."""
    out = Path(out_dir)
    if tokenizer_file is not None and not (model_folder and Path(tokenizer_file) == Path(model_folder, "tokenizer.json")):
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    elif model_folder is not None and Path(model_folder, "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if Path(model_folder, name).is_file():
                shutil.copyfile(Path(model_folder, name), out / name)
        if not (out / "tokenizer_config.json").is_file():
            write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    else:
        write_json(out / "tokenizer.json", byte_tokenizer_json())
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)


def copy_generation_config(model_folder: str | None, out_dir) -> None:
    if model_folder and Path(model_folder, "generation_config.json").is_file():
        shutil.copyfile(Path(model_folder, "generation_config.json"), Path(out_dir, "generation_config.json"))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False))


def byte_tokenizer_json() -> dict:
    """A tokenizers-format tokenizer whose token ids are the UTF-8 byte values (streamtrain's
    ByteTokenizer): byte-level pre-tokenizer (GPT-2's byte-to-character map), BPE without merges."""
    chars = byte_characters()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {chars[b]: b for b in range(256)}, "merges": []}}


def byte_characters() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
