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
                        'refresh_step', ...), python/numpy RNG states, file sizes, caller metadata

Rule state is walked generically from `engine.states`, so a new rule is covered as long as its
per-parameter state holds python scalars (JSON), tensors, None (empty accumulation buffers) and
storages. Checkpoints are taken only at step boundaries, where accumulation buffers are None.

Atomic write: everything goes into `.tmp-step-000100-<pid>/` next to the final folder; each file is
fsynced, then the folder, then the folder is renamed into place and the parent fsynced. A process
killed at any moment leaves either the old set of checkpoints or the new one, never a half-written
`step-*` folder (stale `.tmp-*` folders are removed by the next save). The last `keep` are kept.
Sizes of the tensor files are recorded and checked on load, so a truncated file is refused.

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

Load order: read and check the files -> refuse a different model or method (one-line
CheckpointError) -> clock -> rule hooks -> parameter names must match -> weights -> states -> RNG.
"""
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "streamtrain-checkpoint"
VERSION = 1
FOLDER = "checkpoints"
PREFIX = "step-"
MODEL_FILE, STATE_FILE, JSON_FILE = "model.safetensors", "state.safetensors", "checkpoint.json"
# Test hook: seconds to sleep in the middle of a save, so a test can SIGKILL a process mid-write.
DELAY_ENV = "STREAMTRAIN_CHECKPOINT_DELAY"


class CheckpointError(ValueError):
    pass


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


def resolve(path) -> Path:
    """A checkpoint folder from what a user passes: the folder itself, or a run / checkpoints
    folder (its latest checkpoint)."""
    path = Path(path)
    if (path / JSON_FILE).is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path}; pass a step folder such as "
                              f"runs/x/{FOLDER}/{PREFIX}000100, a run folder, or --resume auto")
    return latest


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
    remove_stale_temporaries(root)
    final = root / f"{PREFIX}{engine.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    state_tensors, record = capture(engine, position, identity or {}, metadata or {})
    sizes = {}
    for name, tensors in ((MODEL_FILE, model_tensors(engine.model)), (STATE_FILE, state_tensors)):
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        sizes[name] = fsync_file(tmp / name)
        pause_for_tests()
    record["file_sizes"] = sizes
    with open(tmp / JSON_FILE, "w") as fh:
        json.dump(record, fh, indent=1)
    fsync_file(tmp / JSON_FILE)
    fsync_dir(tmp)
    replace_folder(tmp, final)
    if keep is not None:
        prune(root, keep)
    return final


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


# -- file system: atomic replace, durability, retention -------------------------------------------
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


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. POSIX cannot rename onto a non-empty folder, so an existing
    `final` (the same step saved again) is first moved aside: a kill in between leaves the
    older checkpoints, which resume-auto then picks."""
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> None:
    """Delete leftovers of saves that were killed (their temporary folders)."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def pause_for_tests() -> None:
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


# -- load ------------------------------------------------------------------------------------------
def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(record, model tensors, state tensors) of a checkpoint folder, with a one-line
    CheckpointError for anything missing, truncated or corrupt."""
    path = Path(path)
    try:
        record = json.loads((path / JSON_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {JSON_FILE}; it is not a checkpoint folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({JSON_FILE}: {e}); "
                              "resume from an earlier checkpoint or start fresh") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path / JSON_FILE} is not a streamtrain checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {record.get('version')}, "
                              f"this streamtrain reads version {VERSION}")
    loaded = []
    for name in (MODEL_FILE, STATE_FILE):
        file = path / name
        expected = record.get("file_sizes", {}).get(name)
        size = file.stat().st_size if file.is_file() else None
        if size is None or size != expected:
            found = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({name}: {found}); "
                                  "resume from an earlier checkpoint or start fresh")
        try:
            loaded.append(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt ({name}: {e}); "
                                  "resume from an earlier checkpoint or start fresh") from None
    return record, loaded[0], loaded[1]


def load_checkpoint(path, engine, *, identity: dict | None = None) -> dict:
    """Restore a checkpoint into an attached engine (built for the same model and method) at a
    step boundary; returns the JSON record (its 'position' is the data position)."""
    path = Path(path)
    record, weights, tensors = read_checkpoint(path)
    check_identity(path, record["identity"], identity or {})
    check_rules(path, [r["config"] for r in record["rules"]], [r.config() for r, _ in rules_and_parameters(engine)])
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
