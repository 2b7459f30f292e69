"""Nothing a checkpoint holds is trusted unverified, and no write leaves half a folder: flipped
bytes inside tensor data are caught by checksums and a run folder falls back to its previous
intact checkpoint (one warning line naming the checkpoint and the file); a step folder named by
the user is that one or a refusal; every malformed checkpoint.json field is a one-line error
naming the field; a full disk during a save or the final export is one line, with the previous
checkpoint (and final/) intact and no temporary folder left; a kill while pruning leaves nothing
behind after the next save."""
import builtins
import errno
import hashlib
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from streamtrain import atomic
from streamtrain import checkpoint as ckpt
from streamtrain import train as train_module
from streamtrain.hf import read_hf
from streamtrain.memory.units import format_bytes
from streamtrain.train import Trainer

from test_checkpoint import small_config

STEP1, STEP2 = "step-000001", "step-000002"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished two-step run with a checkpoint after each step (copied by each test)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    Trainer(small_config(out, steps=2, accumulate=1, save_every=1)).run()
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path):
    return shutil.copytree(saved_run, tmp_path / "run")


def flip_tensor_bytes(file):
    """Invert 4 bytes in the middle of the tensor data (past the header): same size, same header."""
    data = bytearray(file.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    at = (data_start + len(data)) // 2
    assert data_start < at < len(data) - 4
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    file.write_bytes(bytes(data))


def resume(out, where="auto", **overrides):
    return Trainer(small_config(out, **{"steps": 2, "accumulate": 1, "resume": where, **overrides}))


# -- checksums and fallback ------------------------------------------------------------------------
@pytest.mark.parametrize("file", [ckpt.MODEL_FILE, ckpt.STATE_FILE])
@pytest.mark.parametrize("where", ["auto", "run folder"])
def test_a_flipped_tensor_byte_falls_back_to_the_previous_checkpoint_naming_the_file(run_copy, capsys, file, where):
    root = run_copy / "checkpoints"
    flip_tensor_bytes(root / STEP2 / file)
    resumed = resume(run_copy, "auto" if where == "auto" else str(run_copy))
    assert (resumed.engine.step, resumed.position, resumed.last_checkpoint) == (1, 1, root / STEP1)
    _, weights, _ = ckpt.read_checkpoint(root / STEP1)
    assert all(torch.equal(weights[k], v) for k, v in resumed.model.state_dict().items())
    assert capsys.readouterr().err.splitlines() == [
        f"warning: checkpoint {root / STEP2} is truncated or corrupt ({file}: checksum mismatch); "
        f"resuming from {STEP1}, the newest intact one"]


def test_a_corrupt_step_folder_named_by_the_user_is_refused_not_replaced_by_another(run_copy):
    folder = run_copy / "checkpoints" / STEP2
    flip_tensor_bytes(folder / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError) as error:
        resume(run_copy, str(folder))
    assert str(error.value) == (f"checkpoint {folder} is truncated or corrupt ({ckpt.MODEL_FILE}: checksum "
                                "mismatch); resume from an earlier checkpoint or start fresh")


def test_no_intact_checkpoint_is_one_line_naming_each_failure(run_copy, capsys):
    root = run_copy / "checkpoints"
    flip_tensor_bytes(root / STEP2 / ckpt.MODEL_FILE)
    flip_tensor_bytes(root / STEP1 / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError) as error:
        resume(run_copy)
    assert str(error.value) == (
        f"no intact checkpoint in {root}: {STEP2} is truncated or corrupt ({ckpt.MODEL_FILE}: checksum mismatch); "
        f"{STEP1} is truncated or corrupt ({ckpt.STATE_FILE}: checksum mismatch); start fresh with a new --out")
    assert capsys.readouterr().err == ""  # no warnings: the error says it all


def test_the_recorded_checksums_are_blake2b_of_the_files(run_copy):
    folder = run_copy / "checkpoints" / STEP2
    record = json.loads((folder / ckpt.JSON_FILE).read_text())
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        data = (folder / name).read_bytes()
        assert record["files"][name] == {"bytes": len(data), "blake2b": hashlib.blake2b(data).hexdigest()}


def test_tensor_files_read_back_bit_for_bit_with_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=gen), "bf16": torch.randn(7, generator=gen).bfloat16(),
               "f16": torch.randn(2, 3, generator=gen).half(), "i64": torch.arange(5), "u8": torch.arange(9).byte(),
               "i8": torch.arange(-4, 3).to(torch.int8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "f64": torch.randn(2, generator=gen).double()}
    written = atomic.write_tensor_file(tmp_path / "t.safetensors", tensors)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == t.dtype and loaded[k].shape == t.shape and torch.equal(loaded[k], t)
               for k, t in tensors.items())
    assert written == atomic.file_checksum(tmp_path / "t.safetensors")


# -- checkpoint.json: every field checked ----------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj.weight"
MUTATIONS = [  # (what, change the record in place, the message's field and problem)
    ("step -1", lambda r: r.update(step=-1), "step must be an integer >= 0, found -1"),
    ("step '3'", lambda r: r.update(step="3"), 'step must be an integer >= 0, found "3"'),
    ("step true", lambda r: r.update(step=True), "step must be an integer >= 0, found true"),
    ("step 2.0", lambda r: r.update(step=2.0), "step must be an integer >= 0, found 2.0"),
    ("no rng", lambda r: r.pop("rng"), "rng is missing"),
    ("position -5", lambda r: r.update(position=-5), "position must be an integer >= 0, found -5"),
    ("position 1.5", lambda r: r.update(position=1.5), "position must be an integer >= 0, found 1.5"),
    ("no position", lambda r: r.pop("position"), "position is missing"),
    ("states a list", lambda r: r.update(states=[]), "states must be an object, found []"),
    ("a state a number", lambda r: r["states"].update({Q: 3}), f'states["{Q}"] must be an object, found 3'),
    ("a state entry an object", lambda r: r["states"][Q].update(step={"x": 1}),
     f'states["{Q}"]["step"] must be null or true or false or a finite number or a string or a list'),
    ("a storage without tensors", lambda r: r["states"][Q]["exp_avg"].pop("tensors"),
     f'states["{Q}"]["exp_avg"] must be'),
    ("nonfinite_total NaN", lambda r: r.update(nonfinite_total=math.nan),
     "nonfinite_total must be an integer >= 0, found NaN"),
    ("nonfinite_in_row above the total", lambda r: r.update(nonfinite_in_row=1),
     "nonfinite_in_row must be at most nonfinite_total (0), found 1"),
    ("lr infinite", lambda r: r.update(lr=math.inf), "lr must be a finite number >= 0, found Infinity"),
    ("lr negative", lambda r: r.update(lr=-0.1), "lr must be a finite number >= 0, found -0.1"),
    ("NaN inside a rule's config", lambda r: r["rules"][0]["config"].update(eps=math.nan),
     "rules[0].config.eps must be a finite number, found NaN"),
    ("rules an object", lambda r: r.update(rules={}), "rules must be a list, found {}"),
    ("a rule without a name", lambda r: r["rules"][0]["config"].pop("name"), "rules[0].config.name is missing"),
    ("a rule's parameters not names", lambda r: r["rules"][0].update(parameters=[1]),
     "rules[0].parameters[0] must be a string, found 1"),
    ("identity a list", lambda r: r.update(identity=[]), "identity must be an object, found []"),
    ("initial val loss a string", lambda r: r["metadata"].update(initial_val_loss="5.5"),
     'metadata.initial_val_loss must be null or a finite number, found "5.5"'),
    ("python rng short", lambda r: r["rng"]["python"][1].pop(), "rng.python[1] must be a list of 625"),
    ("numpy rng key out of range", lambda r: r["rng"]["numpy"][1].__setitem__(0, 2**32),
     "rng.numpy[1][0] must be an integer in [0, 4294967295], found 4294967296"),
    ("cuda devices -1", lambda r: r["rng"].update(cuda_devices=-1), "rng.cuda_devices must be an integer >= 0"),
    ("no checksums", lambda r: r.pop("files"), "files is missing"),
    ("a checksum not hex", lambda r: r["files"][ckpt.MODEL_FILE].update(blake2b="abc"),
     f'files.{ckpt.MODEL_FILE}.blake2b must be a blake2b hex digest, found "abc"'),
    ("an unknown field", lambda r: r.update(surprise=1), "surprise is not a field of checkpoint.json"),
    ("a state tensor the file lacks", lambda r: r["states"][Q].update(grad_acc={"tensor": True}),
     f"its states do not match state.safetensors: missing ['{Q}/grad_acc'], unexpected []"),
    ("a tensor the record does not name", lambda r: r["states"][Q].update(prev_update_norm=0.0),
     f"its states do not match state.safetensors: missing [], unexpected ['{Q}/prev_update_norm']"),
]


@pytest.mark.parametrize("what,mutate,message", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_every_malformed_checkpoint_json_field_is_one_line_naming_it(run_copy, what, mutate, message):
    folder = run_copy / "checkpoints" / STEP2
    record = json.loads((folder / ckpt.JSON_FILE).read_text())
    mutate(record)
    (folder / ckpt.JSON_FILE).write_text(json.dumps(record))
    with pytest.raises(ckpt.UnusableCheckpoint) as error:
        ckpt.read_checkpoint(folder)
    assert str(error.value).startswith(f"checkpoint {folder} has an invalid checkpoint.json ({message}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("record,message", [
    ({"format": ckpt.FORMAT, "version": 1}, "has format version 1, this streamtrain reads version 2"),
    ([1, 2], "is not a streamtrain checkpoint"),
])
def test_another_format_or_version_is_refused_in_one_line(run_copy, record, message):
    folder = run_copy / "checkpoints" / STEP2
    (folder / ckpt.JSON_FILE).write_text(json.dumps(record))
    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)) as error:
        resume(run_copy, str(folder))
    assert "\n" not in str(error.value)


def test_a_position_beyond_the_callers_limit_is_refused(run_copy):
    trainer = Trainer(small_config(run_copy / "other", steps=2, accumulate=1))
    with pytest.raises(ckpt.CheckpointError, match="at data position 2, beyond this run's 1"):
        ckpt.load_checkpoint(run_copy / "checkpoints" / STEP2, trainer.engine, max_position=1)
    assert trainer.engine.step == 0  # refused before anything was restored


def test_a_record_that_could_not_be_read_back_is_never_written(tmp_path):
    trainer = Trainer(small_config(tmp_path, steps=1, accumulate=1))
    with pytest.raises(ckpt.CheckpointError, match=r"metadata.initial_val_loss must be null or a finite number, "
                                                   "found NaN"):
        ckpt.save_checkpoint(tmp_path, trainer.engine, metadata={"initial_val_loss": math.nan})
    assert os.listdir(tmp_path / "checkpoints") == []


# -- disk full ---------------------------------------------------------------------------------------
class DiskFullAfter:
    """A stand-in for `open` in streamtrain.atomic: files opened for writing under a path that
    contains `marker` share `capacity` bytes; the write that would pass it writes what fits, then
    raises ENOSPC, as a full disk does."""

    def __init__(self, marker: str, capacity: int):
        self.marker, self.left = marker, capacity

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        return FillingFile(handle, self) if "w" in mode and self.marker in str(file) else handle


class FillingFile:
    def __init__(self, handle, disk: DiskFullAfter):
        self.handle, self.disk = handle, disk

    def write(self, data):
        n = min(len(data), self.disk.left)
        self.handle.write(data[:n])
        self.disk.left -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def checkpoint_bytes(engine) -> int:
    tensors, _ = ckpt.capture(engine, 0, {}, {})
    return atomic.tensor_bytes([*tensors.values(), *engine.model.state_dict().values()])


def test_a_full_disk_mid_save_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path, steps=3, accumulate=1, save_every=1))
    model_file_bytes = atomic.tensor_bytes(trainer.model.state_dict().values())
    # the model file of step 2 fits, its state file does not
    monkeypatch.setattr(atomic, "open", DiskFullAfter(f".tmp-{STEP2}", model_file_bytes + 20_000), raising=False)
    with pytest.raises(OSError) as error:
        trainer.run()
    root = tmp_path / "checkpoints"
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert str(error.value).startswith(f"no space left on the device writing checkpoint {STEP2} to {root / STEP2}: "
                                       f"it needs about {format_bytes(checkpoint_bytes(trainer.engine))}, ")
    assert str(error.value).endswith(f"then continue with --resume auto; the last checkpoint, {STEP1}, is intact")
    assert os.listdir(root) == [STEP1]
    monkeypatch.undo()
    assert resume(tmp_path, steps=3).engine.step == 1


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # its real text
])
def test_a_full_disk_in_the_final_export_keeps_the_old_final_folder_whole(tmp_path, monkeypatch, failure):
    Trainer(small_config(tmp_path, steps=1, accumulate=1)).run()
    old_final = read_hf(tmp_path / "final")
    real_save_hf = train_module.save_hf

    def save_hf_on_a_full_disk(state, config, out_dir):
        real_save_hf({k: v[:1] for k, v in state.items()}, config, out_dir)  # a partial write, then the disk fills
        raise failure
    monkeypatch.setattr(train_module, "save_hf", save_hf_on_a_full_disk)
    trainer = resume(tmp_path, steps=2, reschedule=True)  # one step more than the first run planned
    with pytest.raises(OSError) as error:
        trainer.run()
    weights = atomic.tensor_bytes(trainer.model.parameters())
    assert str(error.value).startswith(f"no space left on the device writing the final weights to "
                                       f"{tmp_path / 'final'}: it needs about {format_bytes(weights)}, ")
    assert str(error.value).endswith("then finish with --resume auto (the last step's checkpoint is saved)")
    assert "\n" not in str(error.value)
    final = read_hf(tmp_path / "final")
    assert final.keys() == old_final.keys() and all(torch.equal(final[k], old_final[k]) for k in final)
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp-", ".trash-"))]
    monkeypatch.undo()  # space freed: the export replaces the old final/ whole
    finished = resume(tmp_path, steps=2, reschedule=True)
    finished.run()
    exported = read_hf(tmp_path / "final")
    assert all(torch.equal(exported[k], v) for k, v in finished.model.named_parameters())
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp-", ".trash-"))]


# -- a kill while pruning --------------------------------------------------------------------------
class Killed(BaseException):
    pass


def test_a_kill_while_pruning_leaves_nothing_behind_after_the_next_save(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path, *args, **kwargs):
        if STEP1 in str(path):  # deleting the step-1 checkpoint: its checkpoint.json goes first, then the kill
            os.remove(os.path.join(path, ckpt.JSON_FILE))
            raise Killed
        return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(Killed):
        Trainer(small_config(tmp_path, steps=3, accumulate=1, save_every=1, keep_checkpoints=1)).run()
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == [STEP2]  # no half-deleted step folder
    resume(tmp_path, steps=3, keep_checkpoints=1, save_every=1).run()
    assert os.listdir(root) == ["step-000003"]
