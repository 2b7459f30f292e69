"""Checkpoints: everything a run needs to continue bit-for-bit, written atomically.

A checkpoint is one folder per logical step, `<out>/checkpoints/step-000100/`:

    model.safetensors   every weight of the model (model.state_dict(): trainable, frozen, buffers)
    state.safetensors   every rule's state tensors, keyed by parameter name:
                          '<param>/<key>'          a plain tensor (GaLore's 'basis', 'prev_update_norm')
                          '<param>/<key>/<sub>'    a storage's tensors (optim/state.py: tensors() /
                                                   load_tensors(); 8-bit codes and block scales)
                        and the RNG states ('rng/torch_cpu', 'rng/cuda/<i>')
    checkpoint.json     format version, step clock, non-finite counters, LR at the step, data position,
                        the run's identity (model shape, weight dtype), each rule's config() and the
                        parameters it governs, the python scalars of every state ('step', 'rank',
                        'refresh_step', ...), python/numpy RNG states, the size and blake2b checksum
                        of each tensor file, caller metadata

The engine's part is `Engine.state_dict()` (in memory, keyed by parameter name; engine_state.py):
this module only serialises it, splitting its tensors into state.safetensors and the rest into
checkpoint.json, and hands it back to `Engine.load_state_dict()`, which restores the clock, the
rules' own state (`state_extra` / `load_state_extra`), the structure they derive from the clock
(ReLoRA's `sync`: its adapters must exist before their weights load) and every state in place.
Checkpoints are taken only at step boundaries, where accumulation buffers are None.

Integrity lives apart from what a checkpoint holds, so a change of contents keeps it: the folder
on disk (atomic write, checksums of the tensor files, verified reads, falling back to the newest
intact checkpoint) is checkpoint_files.py, the schema every field of checkpoint.json must pass is
checkpoint_schema.py, atomic folders and checksummed tensor files are atomic.py. `load_intact`
resumes from a step folder (that one or none) or a run folder (its newest intact checkpoint, one
warning line per unusable checkpoint skipped).

Load order: read and verify the files (checksums, schema) -> refuse a different model (one-line
CheckpointError) -> Engine.load_state_dict (method, clock, rule hooks, parameter names, states)
-> weights -> RNG.
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import DiskFullError, remove_debris
from .checkpoint_files import (DELAY_ENV, FOLDER, PREFIX, CheckpointError, UnusableCheckpoint, candidates,
                               latest_checkpoint, list_checkpoints, newest_intact, prune, read_checkpoint,
                               resolve, step_of, validate_record, write_folder)
from .checkpoint_schema import FORMAT, JSON_FILE, MODEL_FILE, STATE_FILE, VERSION
from .engine_state import StateMismatch, as_json, difference

__all__ = ["CheckpointError", "UnusableCheckpoint", "DiskFullError", "save_checkpoint", "load_checkpoint",
           "load_intact", "locate_intact", "restore", "NonFiniteCheckpoint", "read_checkpoint", "validate_record", "list_checkpoints", "latest_checkpoint",
           "resolve", "step_of", "DELAY_ENV", "FORMAT", "VERSION", "FOLDER", "PREFIX", "JSON_FILE",
           "MODEL_FILE", "STATE_FILE", "candidates"]


# -- save ------------------------------------------------------------------------------------------
def save_checkpoint(out, engine, *, position: int = 0, identity: dict | None = None,
                    metadata: dict | None = None, keep: int | None = None) -> Path:
    """Write the engine's model, rule states, clock and the RNG states to
    `<out>/checkpoints/step-<engine.step>`, atomically; keep the newest `keep` checkpoints.
    `identity` (e.g. model shape and dtype) must match on load; `metadata` is informational."""
    if engine.micro_index != 0:
        raise RuntimeError("a checkpoint can only be taken at a step boundary "
                           f"(micro-batch {engine.micro_index} of step {engine.step} is in flight)")
    root = Path(out) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    remove_debris(root)
    final = root / f"{PREFIX}{engine.step:06d}"
    state_tensors, record = capture(engine, position, identity or {}, metadata or {})
    weights = model_tensors(engine.model)
    refuse_nonfinite(final, weights, state_tensors)
    write_folder(final, {MODEL_FILE: weights, STATE_FILE: state_tensors}, record)
    if keep is not None:
        prune(root, keep)
    return final


class NonFiniteCheckpoint(CheckpointError):
    """A checkpoint would hold a NaN or Inf weight or state; nothing was written."""


def refuse_nonfinite(final: Path, weights: dict, state_tensors: dict) -> None:
    """No checkpoint holds non-finite values: resuming one could never recover."""
    for kind, tensors in (("weight", weights), ("optimizer state", state_tensors)):
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteCheckpoint(f"{kind} {bad[0]} holds NaN or Inf values"
                                      + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                                      + f"; {final.name} was not written")


def capture(engine, position: int, identity: dict, metadata: dict) -> tuple[dict, dict]:
    """(tensors for state.safetensors, the JSON record) of the engine at a step boundary: its
    state_dict() split into tensors (by '<param>/<key>[/<sub>]') and everything else (JSON)."""
    state = engine.state_dict()
    tensors = {}
    states = {name: {key: flatten(f"{name}/{key}", value, tensors) for key, value in entries.items()}
              for name, entries in state["states"].items()}
    rng = capture_rng(tensors)
    record = {"format": FORMAT, "version": VERSION, "step": state["step"], "lr": engine.lr_at(engine.step),
              "nonfinite_total": state["nonfinite_total"], "nonfinite_in_row": state["nonfinite_in_row"],
              "position": position, "identity": identity, "rules": state["rules"], "states": states, "rng": rng,
              "metadata": metadata, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return tensors, record


def flatten(key: str, value, tensors: dict):
    """JSON for one entry of Engine.state_dict()'s states; its tensors go into `tensors` under `key`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return value
    if isinstance(value, torch.Tensor):
        tensors[key] = cpu_copy(value)
        return {"tensor": True}
    if isinstance(value, dict) and "storage" in value:
        for sub, t in value["tensors"].items():
            tensors[f"{key}/{sub}"] = cpu_copy(t)
        return {"storage": value["storage"], "tensors": sorted(value["tensors"])}
    raise TypeError(f"state entry {key} is a {type(value).__name__}, which checkpoints cannot save; "
                    "keep rule state as python scalars, tensors or storages with tensors()/load_tensors()")


def unflatten(key: str, saved, tensors: dict):
    """The state_dict() entry that `flatten` wrote as `saved` (plus its tensors)."""
    if isinstance(saved, dict) and saved.get("tensor"):
        return tensors[key]
    if isinstance(saved, dict) and "storage" in saved:
        return {"storage": saved["storage"], "tensors": {sub: tensors[f"{key}/{sub}"] for sub in saved["tensors"]}}
    return saved


def model_tensors(model: torch.nn.Module) -> dict:
    return {name: cpu_copy(t) for name, t in model.state_dict().items()}


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous CPU copy: safetensors refuses tensors that share memory (views)
    return t.detach().to("cpu", copy=True).contiguous()


def capture_rng(tensors: dict) -> dict:
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda):
        tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"cuda_devices": len(cuda), "python": [py_version, list(py_internal), py_gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


# -- load ------------------------------------------------------------------------------------------
def load_intact(where, engine, *, identity: dict | None = None, max_position: int | None = None) -> tuple[Path, dict]:
    """Restore the checkpoint `where` names into `engine`; returns (its folder, its record). A step
    folder must be intact itself; for a run or checkpoints folder, unusable checkpoints are skipped
    (one warning line each) down to the newest intact one, and none intact is a CheckpointError."""
    path, loaded = locate_intact(where)
    return path, restore(path, engine, *loaded, identity=identity, max_position=max_position)


def locate_intact(where) -> tuple[Path, tuple]:
    """(folder, (record, weights, state tensors)) of the checkpoint `where` names, verified, without
    touching an engine (load_intact's first half: a trainer reads the record before it builds)."""
    found = candidates(where)
    if found == [Path(where)]:  # one step folder, named by the user: that one or none
        return found[0], read_checkpoint(found[0])
    return newest_intact(found)


def load_checkpoint(path, engine, *, identity: dict | None = None, max_position: int | None = None) -> dict:
    """Restore one checkpoint folder into an attached engine (built for the same model and method)
    at a step boundary; returns the JSON record (its 'position' is the data position)."""
    path = Path(path)
    return restore(path, engine, *read_checkpoint(path), identity=identity, max_position=max_position)


def restore(path: Path, engine, record: dict, weights: dict, tensors: dict, *, identity: dict | None,
            max_position: int | None) -> dict:
    """Copy a verified checkpoint into `engine` (its state_dict, then the model's weights, then the
    RNG), after refusing another model, method or data."""
    check_identity(path, record["identity"], identity or {})
    if max_position is not None and record["position"] > max_position:
        raise CheckpointError(f"checkpoint {path} is at data position {record['position']}, beyond this run's "
                              f"{max_position}; resume with the same data and batch settings")
    state = {"step": record["step"], "nonfinite_total": record["nonfinite_total"],
             "nonfinite_in_row": record["nonfinite_in_row"], "rules": record["rules"],
             "states": {name: {key: unflatten(f"{name}/{key}", saved, tensors) for key, saved in entries.items()}
                        for name, entries in record["states"].items()}}
    try:
        engine.load_state_dict(state)  # clock, rule extras, ReLoRA's adapters, every state
        check_weights(path, weights, engine.model)
    except StateMismatch as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    load_weights(path, engine.model, weights)
    restore_rng(record["rng"], tensors)
    return record


def check_identity(path: Path, saved: dict, current: dict) -> None:
    for key in current:
        if saved.get(key) != as_json(current[key]):
            raise CheckpointError(f"checkpoint {path} was written for another run: {key} "
                                  f"{difference(saved.get(key), as_json(current[key]), 'checkpoint')}; resume with the same "
                                  "model settings or use a new --out")


def check_weights(path: Path, weights: dict, model) -> None:
    saved, current = set(weights), set(model.state_dict())
    if saved != current:
        missing, unexpected = sorted(current - saved), sorted(saved - current)
        raise CheckpointError(f"checkpoint {path} does not match this model's weights: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; check --model/--method")


@torch.no_grad()
def load_weights(path: Path, model: torch.nn.Module, weights: dict) -> None:
    """Check every tensor's shape and dtype, then load them all through model.load_state_dict
    (which also restores modules' extra state: an INT8 layer's rounding stream)."""
    for name, t in model.state_dict().items():
        source = weights[name]
        if t.shape != source.shape or t.dtype != source.dtype:
            raise CheckpointError(f"checkpoint {path}: {name} is {source.dtype} {tuple(source.shape)} there, "
                                  f"{t.dtype} {tuple(t.shape)} here; check --model/--dtype/--rank")
    model.load_state_dict(weights)


def restore_rng(rng: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(rng["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
