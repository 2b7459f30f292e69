"""Tokenizers and datasets. Nothing is downloaded: the default corpus is the Python standard
library's own source files on this machine (real text, tens of MB).

Sources for `load_tokens`: a text file, a folder of text files, JSONL with a text field, or a
pre-tokenized `.bin` memory map (uint16 or uint32, the dtype given by the suffix `.u16.bin` /
`.u32.bin` or by vocab size). Tokens are packed into fixed-length sequences, split into train and
validation deterministically, and served in a seeded order whose position is a single integer
(so a checkpoint can record it and a resume can continue exactly).
"""
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".html", ".csv", ".tex"}
BUILTIN = "builtin"


class DataError(ValueError):
    pass


# -- tokenizers ------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no download, lossless."""
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local `tokenizer.json` through the `tokenizers` package (optional dependency)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("a tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
        if not Path(path).is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(path: str | None = None):
    return HFTokenizer(path) if path else ByteTokenizer()


# -- sources ---------------------------------------------------------------------------------------
def builtin_corpus_files() -> list[Path]:
    """The standard library's .py files, sorted so every machine reads them in the same order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise DataError(f"no Python sources found under {stdlib} for the built-in corpus; pass --data")
    return files


def _read_texts(files, max_bytes: int | None):
    total = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        yield text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def _jsonl_texts(path: Path, field: str):
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if field not in record:
                raise DataError(f"{path}:{lineno} has no field {field!r}; set --text-field")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{lineno} field {field!r} is not a string")
            yield record[field]


def _bin_dtype(path: Path, vocab_size: int):
    if path.name.endswith(".u16.bin"):
        return np.uint16
    if path.name.endswith(".u32.bin"):
        return np.uint32
    return np.uint16 if vocab_size <= 65536 else np.uint32


def load_tokens(source: str = BUILTIN, tokenizer=None, max_bytes: int | None = None,
                text_field: str = "text") -> np.ndarray:
    """All tokens of `source` as one 1-D array (a read-only memmap for .bin files)."""
    tokenizer = tokenizer or ByteTokenizer()
    if source == BUILTIN:
        texts = _read_texts(builtin_corpus_files(), max_bytes)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data path {source} does not exist; pass a text file, a folder, "
                            "a .jsonl file or a token .bin file")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
            if not files:
                raise DataError(f"folder {source} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            texts = (t for f in files for t in (_jsonl_texts(f, text_field) if f.suffix == ".jsonl"
                                                  else _read_texts([f], None)))
        elif path.suffix == ".bin":
            tokens = np.memmap(path, dtype=_bin_dtype(path, tokenizer.vocab_size), mode="r")
            if tokens.size == 0:
                raise DataError(f"token file {source} is empty")
            return tokens
        elif path.suffix == ".jsonl":
            texts = _jsonl_texts(path, text_field)
        else:
            texts = _read_texts([path], max_bytes)
    pieces = [tokenizer.encode(t) for t in texts if t]
    if not pieces or sum(len(p) for p in pieces) == 0:
        raise DataError(f"corpus {source} is empty")
    tokens = np.concatenate(pieces)
    return tokens[:max_bytes] if max_bytes and source == BUILTIN else tokens


# -- packing, split, order -------------------------------------------------------------------------
@dataclass
class TokenDataset:
    """Fixed-length windows of seq_len+1 tokens over a token array, with a held-out split.

    Windows are non-overlapping; a seeded permutation picks which are validation and the order of
    training windows in each epoch. `batch(position)` is a pure function of the position, so a
    resume only needs the integer position."""
    tokens: np.ndarray
    seq_len: int
    seed: int = 0
    val_fraction: float = 0.02

    def __post_init__(self):
        n_windows = (len(self.tokens) - 1) // self.seq_len
        if n_windows < 2:
            raise DataError(f"corpus has {len(self.tokens)} tokens, too few for two sequences of "
                            f"length {self.seq_len}; lower --seq-len or add data")
        order = np.random.default_rng(self.seed).permutation(n_windows)
        n_val = max(1, int(n_windows * self.val_fraction))
        self.val_windows, self.train_windows = order[:n_val], order[n_val:]

    def _window(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def _stack(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(np.stack([self._window(w) for w in windows]))
        return data[:, :-1], data[:, 1:]

    def train_batch(self, position: int, batch_size: int):
        """The `position`-th training batch (0-based); epochs reshuffle with seed + epoch."""
        n = len(self.train_windows)
        first = position * batch_size
        windows = []
        for i in range(first, first + batch_size):
            epoch, offset = divmod(i, n)
            windows.append(self.train_windows[self._epoch_order(epoch)[offset]])
        return self._stack(windows)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_order = (np.arange(len(self.train_windows)) if epoch == 0 else
                                  np.random.default_rng(self.seed + 1 + epoch).permutation(len(self.train_windows)))
            self._cached_epoch = epoch
        return self._cached_order

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        windows = self.val_windows
        count = 0
        for start in range(0, len(windows), batch_size):
            if max_batches is not None and count >= max_batches:
                return
            yield self._stack(windows[start:start + batch_size])
            count += 1


def corpus_size_hint() -> str:
    return f"{sum(os.path.getsize(f) for f in builtin_corpus_files()) / 1e6:.0f} MB"
