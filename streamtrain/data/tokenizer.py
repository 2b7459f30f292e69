"""Tokenizers: UTF-8 bytes (the default, vocab 256) or a local HF `tokenizer.json`.

Each has an `eos_id`, the token put between documents: byte 0x00 (NUL) for bytes, which text is
refused for holding, so it never occurs inside a document; for a tokenizer.json its end-of-text
token (`</s>`, `<|endoftext|>`, ... or the special token its post-processor appends), or None with
a warning when it has none.
"""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no download, lossless; byte 0x00 separates documents."""
    vocab_size = 256
    eos_id = 0

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
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        raw = path.read_bytes()
        try:
            spec = json.loads(raw)
        except ValueError as e:
            raise DataError(f"tokenizer file {path} is not JSON ({e}); pass a Hugging Face tokenizer.json") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception carrying its parser's message
            raise DataError(f"tokenizer file {path} is not a tokenizer the 'tokenizers' package reads "
                            f"({first_line(e)}); pass a Hugging Face tokenizer.json") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
        self.eos_id = find_eos_id(self.tok, spec)
        if self.eos_id is None:
            warnings.warn(f"tokenizer {path} has no end-of-text token ({', '.join(EOS_NAMES)} or one its "
                          "post-processor appends): documents are joined without a separator", stacklevel=2)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def find_eos_id(tok, spec: dict) -> int | None:
    """The end-of-text token: a well-known name, else the special token the post-processor appends
    after each text (BERT's [SEP])."""
    for name in EOS_NAMES + (appended_special_token(spec.get("post_processor")),):
        if name is not None and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


def appended_special_token(post) -> str | None:
    """The special token a tokenizer.json post-processor puts after the text, if any."""
    if not isinstance(post, dict):
        return None
    if isinstance(post.get("sep"), list):  # BertProcessing / RobertaProcessing: "sep": ["[SEP]", 102]
        return post["sep"][0]
    for inner in post.get("processors") or []:  # a Sequence of post-processors
        if (name := appended_special_token(inner)) is not None:
            return name
    after_text = False
    for piece in post.get("single") or []:  # TemplateProcessing: [<s>, $A, </s>]
        after_text = after_text or "Sequence" in piece
        if after_text and "SpecialToken" in piece:
            return piece["SpecialToken"]["id"]
    return None


def make_tokenizer(path: str | None = None):
    return HFTokenizer(path) if path else ByteTokenizer()


def tokenizer_identity(tokenizer) -> dict:
    """What a resume must share with the run it continues: the tokenizer's kind and exact file."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes"}
    if isinstance(tokenizer, HFTokenizer):
        return {"kind": "tokenizers", "vocab_size": tokenizer.vocab_size, "blake2b": tokenizer.digest}
    return {"kind": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size}


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
