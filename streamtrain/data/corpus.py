"""A source turned into tokens: its documents, joined by the tokenizer's end-of-text token.

Documents are the files of a folder or of the built-in corpus and the lines of a JSONL file; a
single text file is one document. `load_corpus` returns the tokens with what they came from (for
the data summary), `tokenize_to_file` streams the same tokens into a `.bin` and its sidecar, and
`data_identity` is what a strict resume compares.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .text import SUPPORTED, builtin_corpus_files, decode_text, folder_files, not_text_reason, read_text, stdlib_path
from .tokenfile import load_token_file, sidecar_path, token_dtype_for, token_file_dtype
from .tokenizer import ByteTokenizer, tokenizer_identity

BUILTIN = "builtin"
FINGERPRINT_BYTES = 1 << 20  # a file's first and last MiB go into the data fingerprint


@dataclass
class Corpus:
    """A source's tokens and what they came from."""
    source: str
    kind: str                  # builtin, folder, jsonl, text or bin
    path: Path
    files: int = 0
    documents: int = 0
    skipped: list = field(default_factory=list)  # files not read, each with why
    eos_id: int | None = None
    tokens: np.ndarray | None = None


def open_source(source: str) -> Corpus:
    """Check that `source` exists and is of a supported kind, without reading it."""
    if source == BUILTIN:
        return Corpus(source, "builtin", stdlib_path())
    path = Path(source)
    if not path.exists():
        raise DataError(f"data path {source} does not exist; pass a text file, a folder, "
                        "a .jsonl file or a token .bin file")
    if path.is_dir():
        return Corpus(source, "folder", path)
    if path.suffix in (".bin", ".jsonl"):
        return Corpus(source, path.suffix[1:], path)
    if reason := not_text_reason(path):
        raise DataError(f"{path} is not a text file ({reason}); --data takes {SUPPORTED}")
    return Corpus(source, "text", path)


def documents(corpus: Corpus, text_field: str, max_bytes: int | None = None):
    """The texts of a source, one per document, counting files into `corpus`."""
    if corpus.kind == "builtin":
        yield from _builtin_texts(corpus, max_bytes)
        return
    if corpus.kind == "folder":
        files, corpus.skipped = folder_files(corpus.path)
        if not files:
            raise DataError(f"folder {corpus.source} holds no text files; --data takes {SUPPORTED}")
    else:
        files = [corpus.path]
    for f in files:
        corpus.files += 1
        yield from _jsonl_texts(f, text_field) if f.suffix == ".jsonl" else [read_text(f)]


def _builtin_texts(corpus: Corpus, max_bytes: int | None):
    total = 0
    for f in builtin_corpus_files():
        try:
            text = read_text(f)
        except DataError:  # a few stdlib tests are deliberately not UTF-8: skip them, on every machine
            corpus.skipped.append(f"{f.relative_to(corpus.path)} (not UTF-8)")
            continue
        corpus.files += 1
        yield text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def _jsonl_texts(path: Path, field: str):
    offset = 0  # of the line in the file, so an invalid byte is named by line and file offset
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line, offset = decode_text(raw, f"{path}:{lineno} (line at byte {offset})"), offset + len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno} is a JSON {type(record).__name__}, not an object with "
                                f"a {field!r} field")
            if field not in record:
                raise DataError(f"{path}:{lineno} has no field {field!r}; set --text-field")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{lineno} field {field!r} is not a string")
            yield record[field]


def encode_documents(texts, tokenizer, corpus: Corpus):
    """Token pieces of the documents with the end-of-text token between them (not doubled when a
    tokenizer's post-processor already ends each text with it)."""
    corpus.eos_id = getattr(tokenizer, "eos_id", None)
    previous = None
    for text in texts:
        if not text:
            continue
        ids = tokenizer.encode(text)
        if previous is not None and corpus.eos_id is not None and previous[-1] != corpus.eos_id:
            yield np.array([corpus.eos_id], dtype=ids.dtype)
        yield ids
        corpus.documents += 1
        previous = ids


def load_corpus(source: str = BUILTIN, tokenizer=None, max_bytes: int | None = None, text_field: str = "text",
                *, token_dtype: str | None = None, vocab_size: int | None = None) -> Corpus:
    """All tokens of `source` (a read-only memmap for .bin files) and what they came from.
    `max_bytes` limits the built-in corpus; `vocab_size` (the model's) bounds a .bin's ids."""
    tokenizer = tokenizer or ByteTokenizer()
    corpus = open_source(source)
    if corpus.kind == "bin":
        corpus.tokens, corpus.files = load_token_file(corpus.path, token_dtype, vocab_size), 1
        return corpus
    if token_dtype is not None:
        raise DataError(f"--token-dtype is for a token .bin, but {source} is text; drop the flag")
    pieces = list(encode_documents(documents(corpus, text_field, max_bytes), tokenizer, corpus))
    if not pieces:
        raise DataError(f"corpus {source} is empty")
    tokens = np.concatenate(pieces)
    corpus.tokens = tokens[:max_bytes] if max_bytes and source == BUILTIN else tokens
    return corpus


def load_tokens(source: str = BUILTIN, tokenizer=None, max_bytes: int | None = None,
                text_field: str = "text", **options) -> np.ndarray:
    """All tokens of `source` as one 1-D array (a read-only memmap for .bin files)."""
    return load_corpus(source, tokenizer, max_bytes, text_field, **options).tokens


def tokenize_to_file(source: str, out: str, tokenizer=None, text_field: str = "text") -> dict:
    """Tokenize a text source into `out` (.bin) and its sidecar; returns the sidecar. Documents
    stream through one at a time, so the input may be larger than memory."""
    tokenizer, out = tokenizer or ByteTokenizer(), Path(out)
    corpus = open_source(source)
    if out.suffix != ".bin" or corpus.kind == "bin":
        raise DataError(f"tokenize writes a .bin from text; got {source} -> {out}")
    dtype = token_dtype_for(tokenizer.vocab_size)
    partial, count = out.with_name(out.name + ".partial"), 0
    with open(partial, "wb") as fh:
        texts = tqdm(documents(corpus, text_field), desc="tokenize", unit="doc", disable=None)
        for piece in encode_documents(texts, tokenizer, corpus):
            fh.write(piece.astype(dtype).tobytes())
            count += len(piece)
    if count == 0:
        partial.unlink()
        raise DataError(f"corpus {source} is empty")
    os.replace(partial, out)
    meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "tokens": count, "eos_id": corpus.eos_id,
            "documents": corpus.documents, "tokenizer": tokenizer_identity(tokenizer),
            "source": source if source == BUILTIN else str(Path(source).resolve())}
    sidecar_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def data_identity(source: str = BUILTIN, tokenizer=None, max_bytes: int | None = None, text_field: str = "text",
                  token_dtype: str | None = None) -> dict:
    """What a resume must share with the run it continues (JSON-serialisable): the source, the
    files it reads and a fingerprint of them, and what decides how they become tokens."""
    corpus = open_source(source)
    files = source_files(corpus, max_bytes)
    root = corpus.path if corpus.path.is_dir() else corpus.path.parent
    identity = {"source": source if source == BUILTIN else str(corpus.path.resolve()), "kind": corpus.kind,
                "path": str(corpus.path.resolve()), "files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "fingerprint": fingerprint(files, root)}
    if corpus.kind == "bin":
        identity["token_dtype"] = token_file_dtype(corpus.path, token_dtype)[0].name
        return identity
    identity["eos_id"] = getattr(tokenizer or ByteTokenizer(), "eos_id", None)
    if corpus.kind == "builtin":
        identity["max_bytes"] = max_bytes or 0
    if corpus.kind in ("folder", "jsonl"):
        identity["text_field"] = text_field
    return identity


def source_files(corpus: Corpus, max_bytes: int | None = None) -> list[Path]:
    if corpus.kind == "builtin":
        return builtin_prefix(builtin_corpus_files(), max_bytes)
    if corpus.kind == "folder":
        return folder_files(corpus.path)[0]
    side = sidecar_path(corpus.path)
    return [corpus.path] + ([side] if corpus.kind == "bin" and side.is_file() else [])


def builtin_prefix(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The files a read capped at `max_bytes` can reach (one more than their sizes need: sizes
    count bytes, the cap counts decoded characters)."""
    if not max_bytes:
        return files
    total = 0
    for i, f in enumerate(files):
        if total >= max_bytes:
            return files[:i + 1]
        total += f.stat().st_size
    return files


def fingerprint(files: list[Path], root: Path) -> str:
    """blake2b over names, sizes and each file's first and last MiB: cheap on GBs, yet a
    re-tokenization, truncation, edit near either end or swapped file changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def corpus_size_hint() -> str:
    return f"{sum(os.path.getsize(f) for f in builtin_corpus_files()) / 1e6:.0f} MB"
