"""Tokenizers and datasets. Nothing is downloaded: the default corpus is the Python standard
library's own source files on this machine (real text, tens of MB).

Sources: a text file, a folder, JSONL with a text field, the built-in corpus, or a pre-tokenized
`.bin` memory map. Data that is not what it claims is refused when loaded, in one line that names
the file, never trained on:
- text.py: text is UTF-8 without NUL bytes; binaries and unknown formats are refused, invalid
  UTF-8 is named by file and byte offset; a folder's non-text files are skipped and listed.
- tokenizer.py: bytes (vocab 256) or a tokenizer.json; each has `eos_id`, the token put between
  documents (byte 0x00 for bytes).
- tokenfile.py: a `.bin`'s dtype comes from its `.bin.json` sidecar, its suffix or --token-dtype,
  never a guess; its length and `max id < vocab` are checked once at load.
- corpus.py: documents (a folder's or the built-in corpus' files, a JSONL file's lines; a text
  file is one) joined by the end-of-text token; `tokenize_to_file` writes them as a `.bin`
  (`python -m streamtrain.data tokenize`); `data_identity` is what a strict resume compares.
- dataset.py: tokens packed into fixed-length windows, split into train and validation
  deterministically, served in a seeded order whose position is a single integer (a checkpoint
  records it, a resume continues exactly); `data_summary`, the lines a run prints at start.
"""
from .corpus import BUILTIN, Corpus, corpus_size_hint, data_identity, load_corpus, load_tokens, tokenize_to_file
from .dataset import TokenDataset, data_summary
from .errors import DataError
from .text import SUPPORTED, TEXT_SUFFIXES, builtin_corpus_files
from .tokenfile import load_token_file, sidecar_path
from .tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer, tokenizer_identity

__all__ = ["BUILTIN", "Corpus", "corpus_size_hint", "data_identity", "load_corpus", "load_tokens",
           "tokenize_to_file", "TokenDataset", "data_summary", "DataError", "SUPPORTED", "TEXT_SUFFIXES",
           "builtin_corpus_files", "load_token_file", "sidecar_path", "ByteTokenizer", "HFTokenizer",
           "make_tokenizer", "tokenizer_identity"]
