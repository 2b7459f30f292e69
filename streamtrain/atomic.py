"""Durable files: folders that appear whole or not at all, tensor files with checksums, and a
one-line error when the disk is full.

Atomic folder (`atomic_folder`): everything is written into `.tmp-<name>-<pid>/` next to the
target; each file is fsynced, then the folder, then it is renamed into place and the parent is
fsynced. POSIX cannot rename onto a non-empty folder, so an existing target is first renamed to
`.trash-<name>-<pid>` and deleted after the new one is in place. Deleting (`delete_folder`) also
renames first, so a process killed at any moment leaves whole folders plus `.tmp-*`/`.trash-*`
debris, never a half-written or half-deleted folder under the real name; the debris of a target
is removed the next time that target is written (`remove_debris`).

Tensor files (`write_tensor_file`) are safetensors files written here rather than by the
safetensors library: the blake2b checksum is computed from the same blocks as they are written
(no second read), and a full disk surfaces as an OSError with its errno (the library reports it
as a SafetensorError with the errno only in the message text). `file_checksum` re-reads a file
in the same blocks for verification.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .memory.units import format_bytes

BLOCK = 4 << 20  # bytes hashed and written at a time
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


class DiskFullError(OSError):
    """The disk filled up during a write; the message is one line for the user (the CLI prints
    it and exits 2, as for any OSError)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


# -- checksummed tensor files ---------------------------------------------------------------------
def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write CPU `tensors` as a safetensors file, fsynced; returns {'bytes', 'blake2b'} of it."""
    digest, size = hashlib.blake2b(), 0
    with open(path, "wb") as fh:
        for block in safetensors_blocks(tensors):
            fh.write(block)
            digest.update(block)
            size += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    return {"bytes": size, "blake2b": digest.hexdigest()}


def safetensors_blocks(tensors: dict[str, torch.Tensor]):
    """The bytes of a safetensors file, in blocks: 8-byte header length, JSON header padded to a
    multiple of 8, then the tensors' raw bytes. Widest dtypes first (as safetensors does), so
    every tensor starts at a multiple of its element size."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    yield len(text).to_bytes(8, "little") + text
    for name in order:
        data = memoryview(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(data), BLOCK):
            yield data[start:start + BLOCK]


def file_checksum(path: Path) -> dict:
    """{'bytes', 'blake2b'} of a file, read in blocks."""
    digest, size, buffer = hashlib.blake2b(), 0, bytearray(BLOCK)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
            size += n
    return {"bytes": size, "blake2b": digest.hexdigest()}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- atomic folders -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(final: Path, needed_bytes: int, what: str, fix: str = "free some space and run again"):
    """Yield a temporary sibling folder of `final` to write into; on success it replaces `final`
    whole. On any error the temporary folder is removed (an existing `final` is untouched), and a
    full disk becomes a one-line DiskFullError naming `what`, the folder, `needed_bytes` and `fix`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(final.parent, final.name)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(what, final, needed_bytes, fix) from None
        raise


def disk_full_error(what: str, folder: Path, needed_bytes: int, fix: str) -> DiskFullError:
    free = shutil.disk_usage(folder.parent).free
    return DiskFullError(f"no space left on the device writing {what} to {folder}: it needs about "
                         f"{format_bytes(needed_bytes)}, {format_bytes(free)} free; {fix}")


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    # the safetensors library (used for the HF export) keeps the errno only in its message
    text = str(error)
    return type(error).__name__ == "SafetensorError" and any(f"os error {n})" in text for n in DISK_FULL)


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after (a kill
    in between leaves no `final`: for checkpoints, resume-auto then picks the previous step)."""
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except BaseException:
        if trash is not None:  # put the old folder back
            os.rename(trash, final)
        raise
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def delete_folder(folder: Path) -> None:
    """Remove `folder`: renamed to `.trash-*` first (atomic), so a kill while deleting leaves
    debris that the next write removes, never a half-deleted folder under its real name."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_debris(parent: Path, name: str | None = None) -> None:
    """Delete `.tmp-<name>-*` and `.trash-<name>-*` in `parent` (all `.tmp-*`/`.trash-*` when
    `name` is None): what writes and deletes that were killed left behind."""
    prefixes = (".tmp-", ".trash-") if name is None else (f".tmp-{name}-", f".trash-{name}-")
    for p in parent.iterdir():
        if p.name.startswith(prefixes):
            shutil.rmtree(p, ignore_errors=True)


# -- durability -----------------------------------------------------------------------------------
def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def fsync_file(path: Path) -> int:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
        return os.fstat(fh.fileno()).st_size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
