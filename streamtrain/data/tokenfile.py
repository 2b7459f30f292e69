"""Pre-tokenized `.bin` files: a flat array of uint16 or uint32 ids, read as a memory map.

The dtype is declared, never guessed (a uint32 file read as uint16 turns every other token into 0):
by the sidecar `<name>.bin.json` that `python -m streamtrain.data tokenize` writes
({"dtype", "vocab_size", "tokens", ...}), by the suffix `.u16.bin` / `.u32.bin`, or by
`--token-dtype`. All that are given must agree; a file with none is refused. The length (a whole
number of tokens, the sidecar's count) and `max id < vocab` are checked once, when loaded, in
chunks, so a multi-GB file costs one read and bounded memory.
"""
import json
from pathlib import Path

import numpy as np

from .errors import DataError
from .tokenizer import first_line

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
CHECK_CHUNK = 1 << 24  # tokens per read when range-checking


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_sidecar(path: Path) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"token sidecar {side} is not readable JSON ({first_line(e)}); rewrite it with "
                        "python -m streamtrain.data tokenize") from None
    if (not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES
            or not isinstance(meta.get("vocab_size"), int) or not isinstance(meta.get("tokens"), int)):
        raise DataError(f'token sidecar {side} needs {{"dtype": "uint16" or "uint32", "vocab_size": N, '
                        '"tokens": count}; rewrite it with python -m streamtrain.data tokenize')
    return meta


def token_file_dtype(path: Path, token_dtype: str | None = None) -> tuple[np.dtype, dict | None]:
    """The dtype of a token .bin, from --token-dtype, the suffix and the sidecar (all that are
    given must agree), and the sidecar itself (None without one)."""
    if token_dtype is not None and token_dtype not in TOKEN_DTYPES:
        raise DataError(f"--token-dtype {token_dtype!r} is not supported; pass uint16 or uint32")
    sidecar = read_sidecar(path)
    declared = {"--token-dtype": token_dtype,
                "the suffix .u16.bin": "uint16" if path.name.endswith(".u16.bin") else None,
                "the suffix .u32.bin": "uint32" if path.name.endswith(".u32.bin") else None,
                sidecar_path(path).name: sidecar["dtype"] if sidecar else None}
    declared = {who: dtype for who, dtype in declared.items() if dtype}
    if not declared:
        raise DataError(f"token file {path} has no declared dtype: write it with python -m streamtrain.data "
                        "tokenize (adds a .bin.json sidecar), name it .u16.bin/.u32.bin, or pass --token-dtype")
    if len(set(declared.values())) > 1:
        says = ", ".join(f"{who} says {dtype}" for who, dtype in declared.items())
        raise DataError(f"token file {path}: the dtypes disagree ({says}); fix the wrong one")
    return np.dtype(TOKEN_DTYPES[next(iter(declared.values()))]), sidecar


def load_token_file(path: Path, token_dtype: str | None = None, vocab_size: int | None = None) -> np.memmap:
    """A token .bin as a read-only memmap, once its length is whole and every id is below
    `vocab_size` (the model's) and below the sidecar's vocabulary."""
    dtype, sidecar = token_file_dtype(path, token_dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if size % dtype.itemsize:
        raise DataError(f"token file {path} has {size} bytes, not a multiple of {dtype.itemsize} "
                        f"({dtype.name}): it is truncated or does not hold {dtype.name} tokens")
    count = size // dtype.itemsize
    if sidecar and sidecar["tokens"] != count:
        raise DataError(f"token file {path} holds {count} tokens but {sidecar_path(path).name} says "
                        f"{sidecar['tokens']}: truncated or overwritten; tokenize it again")
    if sidecar and vocab_size and sidecar["vocab_size"] > vocab_size:
        raise DataError(f"token file {path} was made with a {sidecar['vocab_size']}-token vocabulary but the "
                        f"model has {vocab_size} embeddings; pick a preset with a larger vocab")
    limits = [v for v in (vocab_size, sidecar and sidecar["vocab_size"]) if v]
    if limits:
        check_token_ids(path, dtype, min(limits))
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(path: Path, dtype: np.dtype, vocab_size: int) -> None:
    """Every id below vocab_size, read in chunks with plain reads (not through the memmap, so the
    check leaves no mapped pages behind): a multi-GB file costs one pass and bounded memory."""
    start = 0
    with open(path, "rb") as fh:
        while (chunk := np.fromfile(fh, dtype=dtype, count=CHECK_CHUNK)).size:
            if int(chunk.max()) >= vocab_size:
                at = int(np.argmax(chunk >= vocab_size))
                raise DataError(f"token file {path} holds id {int(chunk[at])} at token {start + at}, beyond the "
                                f"vocabulary of {vocab_size}: it was made with another tokenizer or its dtype is wrong")
            start += chunk.size
