"""A run folder belongs to one run: where it is, what may be written there, and who writes.

- A fresh run refuses a folder that already holds a run (its checkpoints, final weights, metrics
  or summary): continuing would prune the old checkpoints for newer-looking ones of its own, and a
  later `--resume auto` would continue the wrong run. `--overwrite` deletes the old run's files
  (only those: nothing else in the folder is touched) and says so.
- A folder holding model weights that no run wrote (an HF model folder passed as `--out`) is
  refused: the run would write its files beside someone's checkpoint.
- One writer at a time: an exclusive `fcntl` lock on `<out>/.lock`, which holds the writer's PID
  so a second process can name it. The lock ends with the process, so a killed run leaves none.
- The default `--out` is a new timestamped folder under `runs/`, so two casual runs never share
  one; `--resume auto` without `--out` continues the newest run under `runs/`.
"""
import fcntl
import os
import shutil
import time
from pathlib import Path

RUNS_ROOT = Path("runs")
LOCK_FILE = ".lock"
# what a streamtrain run writes into its folder (`config.json` is the run config of older versions)
RUN_FILES = ("checkpoints", "final", "adapter", "metrics.jsonl", "summary.json", "run_config.json",
             "memory.json", "memory.md", "memory.png", "memory-report.txt", "tensorboard")
RUN_MARKERS = ("checkpoints", "final", "metrics.jsonl", "summary.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt",
                   "*.gguf")


class RunFolderError(ValueError):
    pass


def default_out(resume: str | None, root: Path = RUNS_ROOT) -> Path:
    """A new `runs/<date>_<time>` folder; with `--resume auto`, the newest run under `runs/` that
    holds a checkpoint (a new folder when there is none)."""
    if resume == "auto":
        runs = sorted(p for p in root.glob("*") if (p / "checkpoints").is_dir()) if root.is_dir() else []
        if runs:
            return runs[-1]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out, n = root / stamp, 1
    while out.exists():
        n += 1
        out = root / f"{stamp}-{n}"
    return out


def run_markers(out: Path) -> list[str]:
    """The files of a run already in `out` (empty when it holds none)."""
    return [name for name in RUN_MARKERS if (out / name).exists()]


def foreign_weights(out: Path) -> list[str]:
    """Model weights at the top of `out`, which no run writes there (it writes checkpoints/ and final/)."""
    found = sorted({p.name for pattern in WEIGHT_PATTERNS for p in out.glob(pattern)})
    if (out / "config.json").is_file() and '"model_type"' in (out / "config.json").read_text(errors="replace"):
        found.append("config.json")
    return found


def check_run_folder(out: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a run in `out` when that would mix it with another run or clobber weights."""
    weights = foreign_weights(out) if out.is_dir() else []
    if weights:
        raise RunFolderError(f"--out {out} holds model weights this run did not write ({', '.join(weights[:3])}); "
                             "pass another --out (a run writes its weights to <out>/final)")
    if resuming or overwrite:
        return
    markers = run_markers(out) if out.is_dir() else []
    if markers:
        raise RunFolderError(f"--out {out} already holds a run ({', '.join(markers)}); continue it with "
                             "--resume auto, pass a new --out, or --overwrite to delete that run first")


def clear_run(out: Path) -> list[str]:
    """Delete what an earlier run wrote into `out` (its files only); returns their names."""
    removed = []
    for name in RUN_FILES + ("config.json",):
        path = out / name
        if name == "config.json" and not _is_run_config(path):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _is_run_config(path: Path) -> bool:
    return path.is_file() and '"method"' in path.read_text(errors="replace")


class RunLock:
    """An exclusive lock on a run folder for the life of a run (fcntl, released by the kernel when
    the process ends, however it ends)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.handle = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderError(f"--out {self.path.parent} is in use by another run (PID {holder}); wait for it "
                                 "to finish, stop it, or pass another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def check_free(self) -> None:
        """Refuse now if another process holds the lock (taking and dropping it at once)."""
        if self.path.is_file():
            self.acquire().release()
