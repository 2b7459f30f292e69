"""The CLI is a thin layer: bad arguments get one line naming the flag and the fix, exit 2."""
import json
import shlex
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


# -- commands -------------------------------------------------------------------------------------
def test_python_m_streamtrain_lists_its_commands_and_runs_them(capsys):
    from streamtrain import cli
    help_text = subprocess.run([sys.executable, "-m", "streamtrain", "--help"], capture_output=True, text=True,
                               timeout=60)
    assert help_text.returncode == 0 and all(c in help_text.stdout for c in ("train", "plan", "generate"))
    assert cli.main(["train", "--model", "list"]) == 0 and "llama-7b" in capsys.readouterr().out
    assert cli.main(["plan", "--recipe", "list"]) == 0 and "llama-7b-24gb " in capsys.readouterr().out
    assert cli.main(["--steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown command '--steps'; put a command first: "
                                               "streamtrain train --steps 3")


def test_the_streamtrain_console_script_is_the_cli():
    import importlib
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["streamtrain"].split(":")
    assert getattr(importlib.import_module(module), function).__module__ == "streamtrain.cli"


def test_a_dry_run_that_does_not_fit_exits_1_and_prints_a_whole_command_that_fits(tmp_path, capsys):
    from streamtrain import cli
    argv = ["--model", "byte-tiny", "--batch-size", "64", "--seq-len", "128", "--budget", "30MB", "--device", "cpu"]
    assert cli.main(["plan", *argv, "--out", str(tmp_path / "a")]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("what fits (") and "streamtrain train " in last, last
    command = shlex.split(last.split("): ", 1)[1])
    assert command[:2] == ["streamtrain", "train"] and "--budget" in command
    assert cli.main(["plan", *command[2:], "--out", str(tmp_path / "b")]) == 0  # the printed command fits
    assert "dry run: fits" in capsys.readouterr().out


# -- config files and recipes --------------------------------------------------------------------
TINY_RUN = {"model": "byte-tiny", "steps": 4, "batch_size": 2, "seq_len": 32, "max_data_bytes": 50_000,
            "eval_every": 2, "eval_batches": 1, "save_every": 0, "progress": False, "seed": 3, "lr": 3e-3,
            "model_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                "num_attention_heads": 2}}


def config_of(argv):
    from streamtrain.config import config_from_args
    from streamtrain.run import parser
    return config_from_args(parser().parse_args(argv))


def test_a_runs_config_file_replays_the_run(tmp_path, capsys):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_RUN))
    assert main(["--config", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "a")]) == 0
    assert main(["--config", str(tmp_path / "a" / "run_config.json"), "--out", str(tmp_path / "b")]) == 0
    first, replay = ([json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in "ab")
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in replay] == [(r["loss"], r["grad_norm"], r["lr"]) for r in first]
    settings = [json.loads((tmp_path / run / "run_config.json").read_text()) for run in "ab"]
    assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"out"}
    capsys.readouterr()
    # into its own folder, a replay is refused like any fresh run there
    assert main(["--config", str(tmp_path / "a" / "run_config.json")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_flags_override_the_config_file_which_overrides_the_recipe(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"recipe": "llama-7b-24gb", "rank": 512, "seq-len": 128}))
    config = config_of(["--config", str(tmp_path / "c.json"), "--batch-size", "4", "--no-activation-checkpointing"])
    assert (config.rank, config.seq_len, config.batch_size) == (512, 128, 4)           # file, file, flag
    assert (config.model, config.accumulate, config.states) == ("llama-7b", 32, "8bit")  # the recipe
    assert config.activation_checkpointing is False                                  # a flag beats the recipe
    assert config_of(["--config", str(tmp_path / "c.json"), "--rank", "256"]).rank == 256


def test_a_file_never_resumes_or_deletes_a_run(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"resume": "auto", "overwrite": True, "steps": 7}))
    config = config_of(["--config", str(tmp_path / "c.json")])
    assert (config.resume, config.overwrite, config.steps) == (None, False, 7)
    assert "ignored resume='auto', overwrite=True" in capsys.readouterr().err
    assert config_of(["--config", str(tmp_path / "c.json"), "--resume", "auto"]).resume == "auto"


def test_a_yaml_config_needs_pyyaml_else_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("method: galore\nrank: 16\nlr: 1e-3\nactivation-checkpointing: true\n")
    config = config_of(["--config", str(tmp_path / "c.yaml")])
    assert (config.method, config.rank, config.lr, config.activation_checkpointing) == ("galore", 16, 1e-3, True)
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reading YAML needs PyYAML" in err and "JSON" in err, err


@pytest.mark.parametrize("text,message", [
    ('{"rnak": 4}', "unknown setting 'rnak'; did you mean 'rank'?"),
    ('{"steps": "100"}', "steps: expected int, got '100'"),
    ('{"lr": true}', "lr: expected float, got True"),
    ('{"budget": 24}', "budget: expected None or str, got 24"),
    ('{"steps": 100,}', "not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ('[1, 2]', "expected a mapping of settings (field: value), got list"),
    ('{"recipe": "llama-70b"}', "--recipe: unknown recipe 'llama-70b'; choose one of llama-7b-24gb"),
])
def test_a_bad_config_file_is_one_line_naming_the_setting(text, message, tmp_path, capsys):
    (tmp_path / "c.json").write_text(text)
    assert main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_each_7b_recipe_is_its_profile_command(tmp_path):
    from pathlib import Path
    from streamtrain.recipes import RECIPES
    text = (Path(__file__).parents[1] / "profiles" / "README.md").read_text()
    common = shlex.split(text.split('COMMON="')[1].split('"')[0].replace("\\\n", " "))
    commands = [shlex.split(line.replace("$COMMON", ""))[3:] for line in text.splitlines()
                if line.startswith("python -m streamtrain.run $COMMON")]
    profiles = {c[c.index("--out") + 1]: config_of(common + c[:c.index("--out")]) for c in commands}
    fields = ("model", "method", "rank", "states", "dtype", "seq_len", "batch_size", "accumulate", "budget",
              "activation_checkpointing", "loss_chunk_tokens", "offload_accumulation", "device")
    for name, profile in (("llama-7b-24gb", "llama-7b-galore-r1024-seq256"),
                          ("llama-7b-24gb-seq2048", "llama-7b-galore-r1024-seq2048"),
                          ("llama-7b-24gb-on-gpu", "llama-7b-galore-r512-seq256")):
        recipe = config_of(["--recipe", name])
        assert [getattr(recipe, f) for f in fields] == [getattr(profiles[f"profiles/{profile}"], f) for f in fields]
    assert set(RECIPES) == {"llama-7b-24gb", "llama-7b-24gb-seq2048", "llama-7b-24gb-on-gpu"}
    assert config_of(["--recipe", "llama-7b-24gb", "--rank", "512"]).rank == 512  # a flag overrides the recipe
