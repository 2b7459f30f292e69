"""The README is executable: its Python blocks run (on a shrunk preset), every command line in it
parses with the flags the CLI has, and every path or link it names is inside the repository."""
import re
import shlex
from pathlib import Path

import pytest

import streamtrain
from streamtrain.models.presets import get_config

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SHRUNK = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def run_block(index: int) -> list[list[str]]:
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {})


def test_the_own_loop_block_runs_on_a_shrunk_preset_and_learns(monkeypatch, capsys):
    monkeypatch.setattr(streamtrain, "get_config", lambda name, **kw: get_config(name, **{**kw, **SHRUNK}))
    run_block(0)
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    # the own-loop block prints step, loss and grad norm every 10 logical steps, and learns
    steps = [int(words[0]) for words in printed]
    assert steps == list(range(0, 100, 10)), printed
    assert float(printed[-1][1]) < float(printed[0][1]) - 0.5, printed


def test_the_hf_trainer_block_runs_with_accumulation(monkeypatch, tmp_path, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    run_block(1)
    assert capsys.readouterr().out.splitlines()[-1] == "engine steps: 4"


def test_every_python_block_is_tested():
    assert len(blocks("python")) == 2


def command_lines() -> list[list[str]]:
    """Each streamtrain invocation in the README's bash blocks and inline code, as words."""
    joined = [block.replace("\\\n", " ") for block in blocks("bash")]  # line continuations
    texts = [line for block in joined for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", README)
    found = []
    for text in texts:
        for part in text.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["streamtrain"] or words[:3] == ["python", "-m", "streamtrain.run"]:
                found.append(words)
    return found


def names_a_model_folder(args: list[str]) -> bool:
    from streamtrain.models.presets import PRESETS
    return "--model" in args and args[args.index("--model") + 1] not in PRESETS


def test_every_command_in_the_readme_parses():
    from streamtrain.config import config_from_args
    from streamtrain.generate import parser as generate_parser
    from streamtrain.run import parser
    lines = command_lines()
    assert len(lines) >= 8, lines
    for words in lines:
        args = words[3:] if words[0] == "python" else words[2:]
        command = "train" if words[0] == "python" else words[1]
        if command == "generate":
            generate_parser("streamtrain generate").parse_args(args)
        elif "list" in args or "--config" in args or names_a_model_folder(args):
            # the named file or model folder is the reader's
            parser().parse_args(args)  # argparse exits on an unknown flag or choice
        else:
            config_from_args(parser().parse_args(args))  # and every value passes validation


def test_no_link_or_path_points_outside_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert not [link for link in links if "://" in link or link.startswith("..")], links
    assert "../" not in README
    for link in links:
        assert (ROOT / link.split("#")[0]).exists(), link
    # code spans that name a file or folder of the repository exist
    paths = [span for span in re.findall(r"`([\w./-]+)`", README)
             if "/" in span and span.split("/")[0] in {"streamtrain", "examples", "profiles", "tests"}]
    assert paths, "the README names no repository path"
    for span in paths:
        assert (ROOT / span).exists() or (ROOT / "streamtrain" / span).exists(), span
