"""The CLI is a thin layer: bad arguments get one line naming the flag and the fix, exit 2."""
import subprocess
import sys

import pytest

from streamtrain.run import main


@pytest.mark.parametrize("argv,flag", [
    (["--steps", "0"], "--steps"),
    (["--model", "llama-8b"], "--model"),
    (["--lr", "-1"], "--lr"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--warmup", "999"], "--warmup"),
    (["--data", "/no/such/path"], "data path"),
    (["--clip-per-tensor", "0"], "--clip-per-tensor"),
    (["--init-from", "/nonexistent"], "--init-from: /nonexistent does not exist"),
])
def test_bad_arguments_give_one_line_naming_the_flag(argv, flag, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and "\n" not in err


@pytest.mark.parametrize("argv,message", [
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number, got nan"),
    (["--galore-scale", "nan"], "--galore-scale: must be a finite number, got nan"),
    (["--lora-alpha", "nan"], "--lora-alpha: must be a finite number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["--lr", "1e30"], "--lr: 1e+30 is outside (0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay: -0.1 is outside [0, 100]"),
    (["--lr", "0.5", "--weight-decay", "2"], "--weight-decay: --lr x --weight-decay = 1 >= 1"),
    (["--norm-growth", "0.5"], "--norm-growth: 0.5 is outside [1, 100]"),
    (["--converge-threshold", "-1"], "--converge-threshold: -1 is outside [0, 1]"),
    (["--clip-per-tensor", "nan"], "--clip-per-tensor: must be a finite number"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio: must be a finite number"),
])
def test_every_float_flag_is_finite_and_in_range(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_unknown_choice_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "sgd"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_model_list_prints_every_preset(capsys):
    assert main(["--model", "list"]) == 0
    out = capsys.readouterr().out
    assert "llama-7b" in out and "byte-tiny" in out and "6.74B" in out


def test_no_traceback_reaches_the_user_from_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "streamtrain.run", "--data", str(tmp_path / "x"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize("argv,flag", [
    (["--eta", "1.5"], "--eta"),
    (["--refresh-share", "0"], "--refresh-share"),
    (["--relora-keep-fraction", "2"], "--relora-keep-fraction"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--r-min", "0"], "--r-min"),
])
def test_method_options_are_validated_before_anything_is_built(argv, flag, capsys):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag in err and "\n" not in err
