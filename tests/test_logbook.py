"""What a run shows while it runs: its plan at the start, a log line every --log-every steps when
there is no terminal (never a progress bar's \\r updates in a log file), and with --tensorboard
event files that TensorBoard reads back as the run's metrics."""
import json
import subprocess
import sys

import pytest

from streamtrain.run import main

# a byte-tiny run of a few seconds, with flags every version of the CLI knows
QUICK = ["--model", "byte-tiny", "--batch-size", "2", "--seq-len", "32", "--max-data-bytes", "50000",
         "--eval-batches", "1", "--save-every", "0"]


def test_with_stderr_in_a_file_the_progress_bar_becomes_log_lines(tmp_path):
    with open(tmp_path / "stderr.log", "w") as err:
        result = subprocess.run([sys.executable, "-m", "streamtrain.run", *QUICK, "--steps", "12", "--eval-every", "0",
                                 "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=err, text=True,
                                timeout=300)
    assert result.returncode == 0
    log = (tmp_path / "stderr.log").read_bytes()  # bytes: text mode would turn each \r into a newline
    # tqdm in a file: one line of \r-separated updates, about 200 bytes per step
    assert b"\r" not in log and all(len(line) < 300 for line in log.split(b"\n")), log[:500]
    steps = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 10/12", "step 12/12"], result.stdout


def test_a_run_starts_with_its_plan_and_logs_every_n_steps(tmp_path, capsys):
    assert main([*QUICK, "--steps", "7", "--eval-every", "0", "--no-progress", "--log-every", "3",
                 "--budget", "50MB", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    plan = [line for line in out if line.startswith("plan: ")]
    assert plan[0].startswith("plan: fits --budget 50MB on cpu: needs ") and "% of 50.00 MB" in plan[0], plan
    assert plan[1].startswith("plan: at the peak (") and plan[1].count(" MB") == 3, plan
    assert out.index(plan[0]) < out.index(next(line for line in out if line.startswith("data: ")))
    steps = [line for line in out if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 3/7", "step 6/7", "step 7/7"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert f"loss {records[2]['loss']:.4f}" in steps[0] and "val loss" in steps[-1]


def test_tensorboard_event_files_hold_the_runs_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert main([*QUICK, "--steps", "6", "--eval-every", "3", "--no-progress", "--tensorboard",
                 "--out", str(tmp_path)]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(6))
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    val = events.Scalars("val/loss")
    assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in val] == [(r["step"], r["val_loss"]) for r in records
                                                                          if "val_loss" in r]
    assert [s.step for s in val] == [2, 5]
    assert all(s.value > 50e6 for s in events.Scalars("memory/process_rss_bytes"))  # torch alone is more


def test_tensorboard_without_the_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    assert main([*QUICK, "--steps", "2", "--tensorboard", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --tensorboard: the 'tensorboard' package is not installed; pip install -e '.[tensorboard]'"
    assert not any(tmp_path.iterdir())
