"""Checkpoints of a sharded (--parallel fsdp) run: torch.distributed.checkpoint, written by every
rank at once, verified like every other checkpoint.

The folder is `<out>/checkpoints/step-NNNNNN/`, as for one process (the same listing, pruning and
`--resume auto`), holding what torch.distributed.checkpoint (DCP) writes and our record:

    .metadata, __<rank>_0.distcp   DCP: the model's weights as DTensors (each rank writes its
                                   shards; the metadata knows the whole tensors), and under
                                   'rank<r>/' each rank's own tensors: its rules' states
                                   (shard-shaped, '<param>/<key>[/<sub>]' as in checkpoint.py)
                                   and its RNG states (every rank draws its own rounding noise)
    checkpoint.json                format 'streamtrain-sharded-checkpoint': the world size, the
                                   clock, the data position, the identity, the rules' configs and
                                   the states' python scalars (alike on every rank), each rank's
                                   python/numpy RNG, the size and blake2b checksum of every file

Writing: rank 0 makes a temporary sibling folder, every rank writes into it (dcp.save), each
hashes its own files, rank 0 writes checkpoint.json and renames the folder into place (atomic.py):
a kill at any moment leaves whole checkpoints and debris, never a half-written one under its
name. Non-finite weights or states on any rank refuse the save on every rank.

Reading: every rank checks the record (schema, world size) and the checksums of its own files and
of the metadata; the ranks agree (one all-reduce) before anything is loaded, and `--resume auto`
walks back to the newest checkpoint every rank finds intact. A resume needs the same number of
ranks (each rank's states are its shards); the weights alone would reshard, the states would not.
"""
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..atomic import atomic_folder, file_checksum, remove_debris, tensor_bytes
from ..checkpoint import NonFiniteCheckpoint, capture_rng, check_identity, flatten, restore_rng, unflatten
from ..checkpoint_files import (FOLDER, PREFIX, CheckpointError, UnusableCheckpoint, candidates, pause_for_tests,
                                prune)
from ..checkpoint_schema import (ANY, FILE, JSON_FILE, NULL, RNG, RULE, STATE_ENTRY, TEXT, Invalid, constant, fields,
                                 integer, list_of, map_of, nonfinite_check, number, one_of)
from ..engine_state import StateMismatch
from ..rules.base import local_part

SHARDED_FORMAT, SHARDED_VERSION = "streamtrain-sharded-checkpoint", 1
RECORD = fields({
    "format": constant(SHARDED_FORMAT), "version": constant(SHARDED_VERSION), "world_size": integer(1),
    "step": integer(0), "lr": number(0), "nonfinite_total": integer(0), "nonfinite_in_row": integer(0),
    "position": integer(0), "identity": map_of(ANY), "rules": list_of(RULE),
    "states": map_of(map_of(STATE_ENTRY)), "rng": list_of(RNG),
    "metadata": fields({}, optional={"initial_val_loss": one_of(NULL, number())}, others=ANY),
    "saved_at": TEXT, "files": map_of(FILE)})


# -- save ------------------------------------------------------------------------------------------
def save_sharded(out, engine, *, position: int = 0, identity: dict | None = None, metadata: dict | None = None,
                 keep: int | None = None) -> Path:
    """Every rank: write this step's sharded checkpoint into `<out>/checkpoints`; rank 0 keeps the
    newest `keep`. Returns the folder (on every rank)."""
    if engine.micro_index != 0:
        raise RuntimeError("a checkpoint can only be taken at a step boundary "
                           f"(micro-batch {engine.micro_index} of step {engine.step} is in flight)")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(out) / FOLDER
    final = root / f"{PREFIX}{engine.step:06d}"
    own, record = capture_sharded(engine, position, identity or {}, metadata or {})
    weights = engine.model.state_dict()
    refuse_nonfinite_everywhere(final, weights, own)
    if rank != 0:
        write_shards(shared_path(None), weights, own, rank)
        dist.barrier()  # rank 0 renames the folder into place
        return final
    root.mkdir(parents=True, exist_ok=True)
    remove_debris(root)
    needed = world * (tensor_bytes(local_part(t) for t in weights.values()) + tensor_bytes(own.values()))
    with atomic_folder(final, needed, f"checkpoint {final.name}", "free some space, then continue with --resume auto") \
            as tmp:
        files = write_shards(shared_path(tmp), weights, own, rank)
        record["files"] = files
        record["world_size"] = world
        (tmp / JSON_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))
    if keep is not None:
        prune(root, keep)
    dist.barrier()
    return final


def shared_path(tmp: Path | None) -> Path:
    """Rank 0's temporary folder, on every rank."""
    box = [str(tmp) if tmp is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def write_shards(tmp: Path, weights: dict, own: dict, rank: int) -> dict:
    """dcp.save of the weights and this rank's tensors into `tmp`; the sizes and checksums of
    every rank's files (on rank 0; {} elsewhere)."""
    dcp.save({"model": weights, f"rank{rank}": own}, checkpoint_id=str(tmp))
    pause_for_tests()
    mine = {p.name: file_checksum(p) for p in sorted(tmp.glob(f"__{rank}_*"))}
    if rank == 0:
        mine[".metadata"] = file_checksum(tmp / ".metadata")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {name: digest for files in everyone for name, digest in files.items()} if rank == 0 else {}


def capture_sharded(engine, position: int, identity: dict, metadata: dict) -> tuple[dict, dict]:
    """(this rank's tensors, the record without files) at a step boundary."""
    state = engine.state_dict()
    tensors = {}
    states = {name: {key: flatten(f"{name}/{key}", value, tensors) for key, value in entries.items()}
              for name, entries in state["states"].items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, capture_rng(tensors))  # python/numpy RNG of every rank (JSON)
    record = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "world_size": dist.get_world_size(),
              "step": state["step"], "lr": engine.lr_at(engine.step), "nonfinite_total": state["nonfinite_total"],
              "nonfinite_in_row": state["nonfinite_in_row"], "position": position, "identity": identity,
              "rules": state["rules"], "states": states, "rng": everyone, "metadata": metadata,
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return tensors, record


def refuse_nonfinite_everywhere(final: Path, weights: dict, own: dict) -> None:
    """NonFiniteCheckpoint on every rank when any rank holds a non-finite weight shard or state."""
    bad = [f"weight {n}" for n, t in weights.items() if not finite(t)]
    bad += [f"optimizer state {n}" for n, t in own.items() if not n.startswith("rng/") and not finite(t)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, bad[:1])
    found = [b for names in everyone for b in names]
    if found:
        raise NonFiniteCheckpoint(f"{found[0]} holds NaN or Inf values; {final.name} was not written")


def finite(t: torch.Tensor) -> bool:
    local = local_part(t)
    return not local.is_floating_point() or bool(torch.isfinite(local).all())


# -- read ------------------------------------------------------------------------------------------
def locate_sharded(where) -> tuple[Path, tuple]:
    """(folder, (record, None, None)) of the checkpoint `where` names that every rank finds intact:
    a step folder itself or none, else the newest of a run's checkpoints (one warning line per one
    skipped). The same shape as checkpoint.locate_intact's answer."""
    found = candidates(where)
    skipped = []
    for path in found:
        try:
            record, problem = read_sharded(path), None
        except UnusableCheckpoint as e:
            record, problem = None, e
        if agree(problem is None):
            for reason in skipped:
                print(f"warning: {reason}; resuming from {path.name}, the newest intact one", flush=True)
            return path, (record, None, None)
        skipped.append(str(problem) if problem else f"checkpoint {path} is unusable on another rank")
        if found == [Path(where)]:
            break
    raise CheckpointError(f"no intact sharded checkpoint at {where}: {'; '.join(skipped)}")


def agree(ok: bool) -> bool:
    """True on every rank when `ok` holds on every rank."""
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def read_sharded(path: Path) -> dict:
    """The record of a sharded checkpoint, after its schema, its world size and the checksums of
    this rank's files (and the metadata) are checked."""
    path = Path(path)
    try:
        record = json.loads((path / JSON_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnusableCheckpoint(path, f"is truncated or corrupt ({JSON_FILE}: {e})") from None
    check_record(path, record)
    rank = dist.get_rank()
    for name, expected in record["files"].items():
        if name == ".metadata" or name.startswith(f"__{rank}_"):
            file = path / name
            if not file.is_file() or file_checksum(file) != expected:
                raise UnusableCheckpoint(path, f"is truncated or corrupt ({name}: size or checksum mismatch)")
    return record


def check_record(path: Path, record) -> None:
    if not isinstance(record, dict) or record.get("format") != SHARDED_FORMAT:
        raise UnusableCheckpoint(path, "is not a sharded checkpoint (it was written by one process or by "
                                 "--parallel dp)", "resume it with the launch that wrote it, or start fresh")
    try:
        RECORD(record, "")
        nonfinite_check(record, "")
    except Invalid as e:
        raise UnusableCheckpoint(path, f"has an invalid {JSON_FILE} ({e})") from None
    if record["world_size"] != dist.get_world_size():
        raise UnusableCheckpoint(path, f"was written by {record['world_size']} ranks, this run has "
                                 f"{dist.get_world_size()}", f"resume it with --nproc-per-node {record['world_size']}")


def restore_sharded(path: Path, engine, record: dict, *, identity: dict | None, max_position: int | None) -> dict:
    """Load a located sharded checkpoint into `engine` (its state, the model's shards, this rank's
    RNG), after refusing another model or data position."""
    check_identity(path, record["identity"], identity or {})
    if max_position is not None and record["position"] > max_position:
        raise CheckpointError(f"checkpoint {path} is at data position {record['position']}, beyond this run's "
                              f"{max_position}; resume with the same data and batch settings")
    rank = dist.get_rank()
    targets, _ = capture_sharded(engine, 0, {}, {})  # tensors of the right shapes, filled by dcp.load
    weights = engine.model.state_dict()
    dcp.load({"model": weights, f"rank{rank}": targets}, checkpoint_id=str(path))
    state = {"step": record["step"], "nonfinite_total": record["nonfinite_total"],
             "nonfinite_in_row": record["nonfinite_in_row"], "rules": record["rules"],
             "states": {name: {key: unflatten(f"{name}/{key}", saved, targets) for key, saved in entries.items()}
                        for name, entries in record["states"].items()}}
    try:
        engine.load_state_dict(state)
    except StateMismatch as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    engine.model.load_state_dict(weights)
    restore_rng(record["rng"][rank], targets)
    return record
