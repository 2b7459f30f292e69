"""What counts as text, and which files of a source are read.

Text is UTF-8 without NUL bytes. A file is text by a known text suffix or, with another or no
suffix, when its first 8 KiB sniff as text; known binary formats (.parquet, .gz, .npy, ...) and
other binaries (/usr/bin/ls) are not. Reading is strict: the first NUL or invalid UTF-8 byte is an
error naming the file and the byte offset (a silent replacement would train on mojibake).
"""
import codecs
import functools
import sysconfig
from pathlib import Path

from .errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".html", ".csv", ".tex"}
BINARY_SUFFIXES = {".parquet", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z", ".npy", ".npz",
                   ".pt", ".pth", ".ckpt", ".safetensors", ".pkl", ".pickle", ".h5", ".bin", ".so", ".exe",
                   ".png", ".jpg", ".jpeg", ".gif", ".pdf"}
SUPPORTED = ("UTF-8 text (.txt, .md, .py, ... or any UTF-8 file without NUL bytes), .jsonl with a text "
             "field, a folder of those, a token .bin with its .bin.json sidecar (python -m streamtrain.data "
             "tokenize), or 'builtin'")
SNIFF_BYTES = 8192


def not_text_reason(path: Path) -> str | None:
    """None when `path` is read as text, else why not: a known binary suffix, or (without a known
    text suffix) NUL bytes or invalid UTF-8 in its first 8 KiB."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix == ".jsonl":
        return None
    if suffix in BINARY_SUFFIXES:
        return f"{suffix} is a binary format"
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if b"\0" in head:
        return "it holds NUL bytes"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut-off last character is fine
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 at byte {e.start}"
    return None


def decode_text(raw: bytes, where) -> str:
    """Strict UTF-8: the first NUL or invalid byte is an error naming where it is."""
    if (nul := raw.find(b"\0")) >= 0:
        raise DataError(f"{where} holds a NUL byte at byte {nul}: not a text file; --data takes {SUPPORTED}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start}; convert it to UTF-8 "
                        "(iconv -f <encoding> -t utf-8) or remove it") from None


def read_text(path: Path) -> str:
    try:
        return decode_text(path.read_bytes(), path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_corpus_files() -> list[Path]:
    """The standard library's .py files, sorted so every machine reads them in the same order."""
    files = list(_stdlib_sources())
    if not files:
        raise DataError(f"no Python sources found under {stdlib_path()} for the built-in corpus; pass --data")
    return files


@functools.lru_cache(maxsize=1)
def _stdlib_sources() -> tuple[Path, ...]:
    # walking the stdlib takes ~0.3 s; every Trainer (and its data identity) asks for it
    return tuple(sorted(p for p in stdlib_path().rglob("*.py") if "site-packages" not in p.parts))


def folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of a folder that are read, sorted, and those skipped with why (listed in the data
    summary). Hidden files and folders (.git, ...) are not data and are ignored."""
    read, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        reason = not_text_reason(path)
        if reason:
            skipped.append(f"{path.relative_to(folder)} ({reason})")
        else:
            read.append(path)
    return read, skipped
