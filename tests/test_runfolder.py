"""A run folder belongs to one run: a fresh run refuses a folder holding another run (or model
weights it did not write), --overwrite deletes only that run's files, the default --out never
collides, a second process is refused while one trains, and the run's own config never
overwrites a model's config.json."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from streamtrain import run
from streamtrain.runfolder import RunFolderError
from streamtrain.train import Trainer

from test_checkpoint import small_config

REPO = Path(__file__).resolve().parents[1]


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    Trainer(small_config(tmp_path, steps=1, accumulate=1)).run()
    with pytest.raises(RunFolderError) as error:
        Trainer(small_config(tmp_path, steps=2, accumulate=1))
    assert str(error.value) == (f"--out {tmp_path} already holds a run (checkpoints, final, metrics.jsonl, "
                                "summary.json); continue it with --resume auto, pass a new --out, or --overwrite "
                                "to delete that run first")


def test_overwrite_deletes_only_the_old_runs_files(tmp_path, capsys):
    Trainer(small_config(tmp_path, steps=2, accumulate=1, save_every=1)).run()
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(small_config(tmp_path, steps=1, accumulate=1, overwrite=True)).run()
    assert "--overwrite: deleted the earlier run's" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # none of the old ones
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def default_out_config(**settings):
    return replace(small_config("unused"), out=None, **settings)


def test_the_default_out_is_a_new_folder_and_resume_auto_finds_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = Trainer(default_out_config(steps=1, accumulate=1))
    first.run()
    second = Trainer(default_out_config(steps=1, accumulate=1))
    assert first.out != second.out and first.out.parent == Path("runs")
    second.run()
    again = Trainer(default_out_config(steps=1, accumulate=1, resume="auto"))
    assert again.out == second.out and again.engine.step == 1


def test_a_second_process_on_the_same_out_is_refused_naming_the_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from streamtrain.runfolder import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as error:
            Trainer(small_config(tmp_path, steps=1, accumulate=1))
        assert str(error.value) == (f"--out {tmp_path} is in use by another run (PID {holder.pid}); wait for it to "
                                    "finish, stop it, or pass another --out")
    finally:
        holder.kill()
        holder.wait()
    Trainer(small_config(tmp_path, steps=1, accumulate=1)).run()  # the lock died with its process


def test_an_hf_model_folder_as_out_is_refused_and_left_untouched(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    status = run.main(["--out", str(tmp_path), "--steps", "1", "--max-data-bytes", "20000", "--no-progress"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {tmp_path} holds model weights this run did not write (model.safetensors, config.json); "
        "pass another --out (a run writes its weights to <out>/final)")
    assert (tmp_path / "config.json").read_text() == '{"model_type": "llama", "hidden_size": 64}'


def test_the_run_config_is_written_as_run_config_json(tmp_path):
    Trainer(small_config(tmp_path, steps=1, accumulate=1)).run()
    assert not (tmp_path / "config.json").exists()
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved["steps"] == 1 and saved["warmup"] == 0  # resolved: -1 made explicit
