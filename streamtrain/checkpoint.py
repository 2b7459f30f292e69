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

Rule state is walked generically from `engine.states`, so a new rule is covered as long as its
per-parameter state holds python scalars (JSON), tensors, None (empty accumulation buffers) and
storages. Checkpoints are taken only at step boundaries, where accumulation buffers are None.

Integrity lives apart from what a checkpoint holds, so a change of contents keeps it: the folder
on disk (atomic write, checksums of the tensor files, verified reads, falling back to the newest
intact checkpoint) is checkpoint_files.py, the schema every field of checkpoint.json must pass is
checkpoint_schema.py, atomic folders and checksummed tensor files are atomic.py. `load_intact`
resumes from a step folder (that one or none) or a run folder (its newest intact checkpoint, one
warning line per unusable checkpoint skipped).

Hooks for rules with more than per-parameter state (all optional, duck-typed):

    rule.state_extra(engine) -> dict          rule-level, JSON-serialisable state (counters on the
                                              rule object itself); saved once per rule
    rule.load_state_extra(engine, extra)      restore it; called on load after the step clock is
                                              restored and before weights and states are loaded
    rule.sync(engine)                         bring the model's *structure* in line with the clock
                                              (ReLoRA wraps its matrices with adapters once past its
                                              warm start); called right after load_state_extra, so
                                              the adapters exist, with fresh states, when the saved
                                              weights and states are copied in

Load order: read and verify the files (checksums, schema) -> refuse a different model or method
(one-line CheckpointError) -> clock -> rule hooks -> parameter names must match -> weights ->
states -> RNG.
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
    """(tensors for state.safetensors, the JSON record) of the engine at a step boundary."""
    tensors, states = {}, {}
    for name, state in engine.states.items():
        states[name] = {key: save_value(f"{name}/{key}", value, tensors) for key, value in state.items()}
    rules = []
    for rule, names in rules_and_parameters(engine):
        extra = rule.state_extra(engine) if hasattr(rule, "state_extra") else None
        rules.append({"config": rule.config(), "parameters": names, "extra": extra})
    rng = capture_rng(tensors)
    record = {"format": FORMAT, "version": VERSION, "step": engine.step, "lr": engine.lr_at(engine.step),
              "nonfinite_total": engine.nonfinite_total, "nonfinite_in_row": engine.nonfinite_in_row,
              "position": position, "identity": identity, "rules": rules, "states": states, "rng": rng,
              "metadata": metadata, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return tensors, record


def save_value(key: str, value, tensors: dict):
    """JSON for one state entry; its tensors go into `tensors` under `key`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if isinstance(value, torch.Tensor):
        tensors[key] = cpu_copy(value)
        return {"tensor": True}
    if is_storage(value):
        parts = storage_tensors(value)
        for sub, t in parts.items():
            tensors[f"{key}/{sub}"] = cpu_copy(t)
        return {"storage": type(value).__name__, "tensors": sorted(parts)}
    raise TypeError(f"state entry {key} is a {type(value).__name__}, which checkpoints cannot save; "
                    "keep rule state as python scalars, tensors or storages with tensors()/load_tensors()")


def model_tensors(model: torch.nn.Module) -> dict:
    return {name: cpu_copy(t) for name, t in model.state_dict().items()}


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous CPU copy: safetensors refuses tensors that share memory (views)
    return t.detach().to("cpu", copy=True).contiguous()


def storage_tensors(storage) -> dict:
    """A storage's tensors plus, when it rounds stochastically, its generator's state ('rng')."""
    parts = dict(storage.tensors())
    if getattr(storage, "generator", None) is not None:
        parts["rng"] = storage.generator.get_state()
    return parts


def load_storage(storage, parts: dict) -> None:
    parts = dict(parts)
    rng = parts.pop("rng", None)
    if rng is not None and getattr(storage, "generator", None) is not None:
        storage.generator.set_state(rng.cpu())
    storage.load_tensors({sub: t.to(device_of(storage)) for sub, t in parts.items()})


def is_storage(value) -> bool:
    return hasattr(value, "tensors") and hasattr(value, "load_tensors")


def rules_and_parameters(engine) -> list[tuple]:
    """[(rule, [parameter names it governs])] in first-seen order, one entry per rule object."""
    grouped = {}
    for name, rule in engine.rules.items():
        grouped.setdefault(id(rule), (rule, []))[1].append(name)
    return list(grouped.values())


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
    """Copy a verified checkpoint into `engine`, after refusing another model, method or data."""
    check_identity(path, record["identity"], identity or {})
    check_rules(path, [r["config"] for r in record["rules"]], [r.config() for r, _ in rules_and_parameters(engine)])
    if max_position is not None and record["position"] > max_position:
        raise CheckpointError(f"checkpoint {path} is at data position {record['position']}, beyond this run's "
                              f"{max_position}; resume with the same data and batch settings")
    restore_clock(engine, record)
    for (rule, _), saved in zip(rules_and_parameters(engine), record["rules"]):
        if hasattr(rule, "load_state_extra"):
            rule.load_state_extra(engine, saved["extra"])
        if hasattr(rule, "sync"):
            rule.sync(engine)
    check_parameters(path, record, weights, engine)
    load_weights(path, engine.model, weights)
    for name, entries in record["states"].items():
        load_state(path, name, engine.states[name], entries, tensors)
    restore_rng(record["rng"], tensors)
    return record


def check_identity(path: Path, saved: dict, current: dict) -> None:
    for key in current:
        if saved.get(key) != as_json(current[key]):
            raise CheckpointError(f"checkpoint {path} was written for another run: {key} "
                                  f"{difference(saved.get(key), as_json(current[key]))}; resume with the same "
                                  "model settings or use a new --out")


def check_rules(path: Path, saved: list[dict], current: list[dict]) -> None:
    def key(config):
        return json.dumps(config, sort_keys=True)
    if sorted(map(key, saved)) == sorted(map(key, current)):
        return
    saved_by_name, current_by_name = {c["name"]: c for c in saved}, {c["name"]: c for c in current}
    if saved_by_name.keys() != current_by_name.keys():
        detail = f"rules: checkpoint {'+'.join(sorted(saved_by_name))}, this run {'+'.join(sorted(current_by_name))}"
    else:
        name = next(n for n in sorted(saved_by_name) if key(saved_by_name[n]) != key(current_by_name[n]))
        detail = f"{name} {difference(saved_by_name[name], current_by_name[name])}"
    raise CheckpointError(f"checkpoint {path} was trained with another method ({detail}); resume with the "
                          "same --method/--rank/--states settings or use a new --out")


def difference(saved, current) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        return ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in keys)
    return f"checkpoint {saved!r}, this run {current!r}"


def restore_clock(engine, record: dict) -> None:
    if engine.micro_index != 0:
        raise RuntimeError("load a checkpoint at a step boundary, not in the middle of a step")
    engine.step = record["step"]
    engine.nonfinite_total = record["nonfinite_total"]
    engine.nonfinite_in_row = record["nonfinite_in_row"]
    engine._new_step()  # the engine's per-step context is a function of the clock: rebuild it


def check_parameters(path: Path, record: dict, weights: dict, engine) -> None:
    model_names, state_names = set(engine.model.state_dict()), set(engine.states)
    for what, saved, current in (("weights", set(weights), model_names),
                                 ("trainable parameters", set(record["states"]), state_names)):
        if saved != current:
            missing, unexpected = sorted(current - saved), sorted(saved - current)
            raise CheckpointError(f"checkpoint {path} does not match this model's {what}: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}; check --model/--method")
    saved = {n: r["config"] for r in record["rules"] for n in r["parameters"]}
    for rule, names in rules_and_parameters(engine):
        for name in names:
            if saved.get(name) != as_json(rule.config()):
                raise CheckpointError(f"checkpoint {path} updates {name} with another rule "
                                      f"({difference(saved.get(name), as_json(rule.config()))}); check --method")


def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


@torch.no_grad()
def load_weights(path: Path, model: torch.nn.Module, weights: dict) -> None:
    for name, t in model.state_dict().items():
        copy_checked(path, name, t, weights[name])


def copy_checked(path: Path, name: str, target: torch.Tensor, source: torch.Tensor) -> None:
    if target.shape != source.shape or target.dtype != source.dtype:
        raise CheckpointError(f"checkpoint {path}: {name} is {source.dtype} {tuple(source.shape)} there, "
                              f"{target.dtype} {tuple(target.shape)} here; check --model/--dtype/--rank")
    target.copy_(source)


def load_state(path: Path, name: str, state: dict, entries: dict, tensors: dict) -> None:
    """Restore one parameter's state in place (tensors and storages keep their identity)."""
    if set(entries) != set(state):
        raise CheckpointError(f"checkpoint {path}: the state of {name} has keys {sorted(entries)}, "
                              f"this run's rule makes {sorted(state)}; check --method")
    for key, saved in entries.items():
        current, where = state[key], f"{name}/{key}"
        if isinstance(saved, dict) and saved.get("tensor"):
            if not isinstance(current, torch.Tensor):
                raise CheckpointError(f"checkpoint {path}: {where} is a tensor there but not here; check --method")
            copy_checked(path, where, current, tensors[where])
        elif isinstance(saved, dict) and "storage" in saved:
            if not is_storage(current) or type(current).__name__ != saved["storage"]:
                raise CheckpointError(f"checkpoint {path}: {where} is stored as {saved['storage']} there, "
                                      f"{type(current).__name__} here; check --states")
            load_storage(current, {sub: tensors[f"{where}/{sub}"] for sub in saved["tensors"]})
        else:
            state[key] = tuple(saved) if isinstance(current, tuple) else saved


def device_of(storage) -> torch.device:
    return next(iter(storage.tensors().values())).device


def restore_rng(rng: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(rng["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
