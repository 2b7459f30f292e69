"""A checkpoint folder on disk: where checkpoints are, writing one atomically with the checksums
of its files, and reading one back with every byte verified.

What the folder holds (see checkpoint.py for what the tensors and the record mean):

    model.safetensors, state.safetensors   tensors, written by atomic.write_tensor_file
    checkpoint.json                        the record; its 'files' field holds each tensor file's
                                           size and blake2b checksum

Writing: `write_folder` writes into a temporary sibling and renames it into place
(atomic.atomic_folder); the record is checked against the schema the reader applies, so a
checkpoint that could not be read back is never written; a full disk is a one-line DiskFullError
naming the folder, the bytes needed and the last intact checkpoint. `prune` renames old folders to
`.trash-*` before deleting them.

Reading: `read_checkpoint` verifies checkpoint.json against the schema (checkpoint_schema.py; it
cannot hold its own checksum), then each tensor file's size and checksum, then that the state
file holds exactly the tensors the record names. A failure is an UnusableCheckpoint naming the
folder and the file or field. `newest_intact` walks a run's checkpoints newest first, past
unusable ones (one warning line each), to the newest intact one.
"""
import json
import os
import sys
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_folder, delete_folder, file_checksum, tensor_bytes, write_tensor_file
from .checkpoint_schema import FORMAT, JSON_FILE, MODEL_FILE, STATE_FILE, VERSION, problem

FOLDER = "checkpoints"
PREFIX = "step-"
# Test hook: seconds to sleep in the middle of a save, so a test can SIGKILL a process mid-write.
DELAY_ENV = "STREAMTRAIN_CHECKPOINT_DELAY"


class CheckpointError(ValueError):
    pass


class UnusableCheckpoint(CheckpointError):
    """A checkpoint folder that cannot be used at all: a file missing, truncated or corrupt, a
    checkpoint.json that fails the schema, another format version. `reason` is the short form
    ("is truncated or corrupt (model.safetensors: checksum mismatch)")."""

    def __init__(self, path: Path, reason: str, fix: str = "resume from an earlier checkpoint or start fresh"):
        super().__init__(f"checkpoint {path} {reason}; {fix}")
        self.path, self.reason = Path(path), reason


# -- where checkpoints are -------------------------------------------------------------------------
def step_of(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoint folders under `root` (a checkpoints folder), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / JSON_FILE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(out) -> Path | None:
    """The newest checkpoint of a run folder `out` (or of a checkpoints folder), None if none."""
    out = Path(out)
    found = list_checkpoints(out / FOLDER) or list_checkpoints(out)
    return found[-1] if found else None


def candidates(path) -> list[Path]:
    """The checkpoints a user's path names, newest first: a step folder is itself alone; a run
    or checkpoints folder gives all of its checkpoints."""
    path = Path(path)
    if (path / JSON_FILE).is_file():
        return [path]
    found = (list_checkpoints(path / FOLDER) or list_checkpoints(path)) if path.is_dir() else []
    if not found:
        raise CheckpointError(f"no checkpoint at {path}; pass a step folder such as "
                              f"runs/x/{FOLDER}/{PREFIX}000100, a run folder, or --resume auto")
    return found[::-1]


def resolve(path) -> Path:
    """The checkpoint folder a user's path names: the folder itself or a run's newest (unverified)."""
    return candidates(path)[0]


# -- write -----------------------------------------------------------------------------------------
def write_folder(final: Path, files: dict[str, dict], record: dict) -> None:
    """Write `files` ({file name: tensors}) and `record` with the files' sizes and checksums into
    the folder `final`, atomically. The record is checked against the schema the reader applies."""
    previous = list_checkpoints(final.parent)
    fix = ("free some space or keep fewer checkpoints (--keep-checkpoints), then continue with --resume auto; "
           + (f"the last checkpoint, {previous[-1].name}, is intact" if previous else "no checkpoint was kept yet"))
    needed = sum(tensor_bytes(tensors.values()) for tensors in files.values())
    with atomic_folder(final, needed, f"checkpoint {final.name}", fix) as tmp:
        record["files"] = {}
        for name, tensors in files.items():
            record["files"][name] = write_tensor_file(tmp / name, tensors)
            pause_for_tests()
        wrong = problem(record)
        if wrong:
            raise CheckpointError(f"cannot save checkpoint {final.name}: {JSON_FILE} would be invalid ({wrong})")
        (tmp / JSON_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        delete_folder(old)


def pause_for_tests() -> None:
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


# -- read ------------------------------------------------------------------------------------------
def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(record, model tensors, state tensors) of a checkpoint folder, every byte verified: the
    record against the schema, each tensor file against its size and checksum, the state file's
    tensor names against the record. Anything wrong is a one-line UnusableCheckpoint."""
    path = Path(path)
    record = read_record(path)
    weights, tensors = (read_tensor_file(path, name, record["files"][name]) for name in (MODEL_FILE, STATE_FILE))
    check_state_names(path, record, tensors)
    return record, weights, tensors


def read_record(path: Path) -> dict:
    try:
        record = json.loads((path / JSON_FILE).read_text())
    except FileNotFoundError:
        raise UnusableCheckpoint(path, f"has no {JSON_FILE}", "it is not a checkpoint folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UnusableCheckpoint(path, f"is truncated or corrupt ({JSON_FILE}: {e})") from None
    validate_record(record, path)
    return record


def validate_record(record, path: Path) -> None:
    """Refuse a checkpoint.json of another format or version, or with any field wrong."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UnusableCheckpoint(path, f"is not a streamtrain checkpoint ({JSON_FILE} has no format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise UnusableCheckpoint(path, f"has format version {record.get('version')!r}, this streamtrain reads "
                                 f"version {VERSION} (with checksums)", "resume it with the streamtrain that "
                                 "wrote it, or start fresh")
    wrong = problem(record)
    if wrong:
        raise UnusableCheckpoint(path, f"has an invalid {JSON_FILE} ({wrong})")


def read_tensor_file(path: Path, name: str, expected: dict) -> dict:
    """The tensors of one file of the checkpoint, once its size and checksum match `expected`."""
    file = path / name
    size = file.stat().st_size if file.is_file() else None
    if size != expected["bytes"]:
        found = "missing" if size is None else f"{size} bytes, expected {expected['bytes']}"
        raise UnusableCheckpoint(path, f"is truncated or corrupt ({name}: {found})")
    if file_checksum(file)["blake2b"] != expected["blake2b"]:
        raise UnusableCheckpoint(path, f"is truncated or corrupt ({name}: checksum mismatch)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UnusableCheckpoint(path, f"is corrupt ({name}: {e})") from None


def check_state_names(path: Path, record: dict, tensors: dict) -> None:
    """The state file holds exactly the tensors the record names (a check on the record, which
    has no checksum)."""
    expected = {f"rng/cuda/{i}" for i in range(record["rng"]["cuda_devices"])} | {"rng/torch_cpu"}
    for name, entries in record["states"].items():
        for key, saved in entries.items():
            if isinstance(saved, dict) and "storage" in saved:
                expected |= {f"{name}/{key}/{sub}" for sub in saved["tensors"]}
            elif isinstance(saved, dict):
                expected.add(f"{name}/{key}")
    if expected != set(tensors):
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UnusableCheckpoint(path, f"has an invalid {JSON_FILE} (its states do not match {STATE_FILE}: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]})")


def newest_intact(newest_first: list[Path]) -> tuple[Path, tuple]:
    skipped = []
    for path in newest_first:
        try:
            loaded = read_checkpoint(path)
        except UnusableCheckpoint as e:
            skipped.append(e)
            continue
        for e in skipped:
            print(f"warning: checkpoint {e.path} {e.reason}; resuming from {path.name}, the newest intact one",
                  file=sys.stderr)
        return path, loaded
    raise CheckpointError(f"no intact checkpoint in {newest_first[0].parent}: "
                          + "; ".join(f"{e.path.name} {e.reason}" for e in skipped)
                          + "; start fresh with a new --out")
