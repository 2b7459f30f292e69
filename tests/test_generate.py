"""Sampling from a trained final/ folder: greedy is the argmax, top-k draws only among the k
likeliest in softmax proportion, a seed repeats a sample, a trained byte model writes text like
its corpus, and the tokenizer a run trained with is found from its run_config.json."""
import json
import string

import pytest
import torch

from streamtrain.config import TrainConfig
from streamtrain.generate import GenerateError, load_for_generation, main, next_token, sample
from streamtrain.hf import save_hf
from streamtrain.models.llama import build_model
from streamtrain.models.presets import get_config
from streamtrain.train import train

PRINTABLE = set(string.printable)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-tiny model trained for 60 steps on the built-in corpus (Python sources)."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(model="byte-tiny", steps=60, batch_size=8, seq_len=64, lr=3e-3, eval_every=0,
                      eval_batches=1, max_data_bytes=300_000, save_every=0, out=str(out), progress=False))
    return out / "final"


def untrained_folder(folder, **overrides):
    config = get_config("byte-tiny", **overrides)
    save_hf(dict(build_model(config, seed=0).named_parameters()), config, folder)
    return folder


def printable_share(text: str) -> float:
    return sum(c in PRINTABLE for c in text) / max(1, len(text))


def test_temperature_zero_is_the_argmax():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert next_token(logits, 0.0, 0, torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_draws_only_the_k_likeliest_in_softmax_proportion(temperature):
    logits, generator = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.Generator().manual_seed(0)
    draws = [next_token(logits, temperature, 2, generator) for _ in range(4000)]
    assert set(draws) == {2, 3}
    expected = torch.softmax(torch.tensor([2.0, 3.0]) / temperature, 0)[1].item()  # 0.731 at T=1, 0.622 at T=2
    assert abs(draws.count(3) / len(draws) - expected) < 0.03


def test_a_trained_byte_model_writes_text_like_its_corpus(trained, tmp_path):
    text = sample(load_for_generation(trained), "def ", 300, temperature=0.8, top_k=40, seed=0)
    untrained = sample(load_for_generation(untrained_folder(tmp_path / "init")), "def ", 300, 0.8, 40, seed=0)
    # Python source is printable ASCII; a near-uniform byte model hits it about 100/256 of the time
    assert printable_share(text) > 0.95 and len(text) > 50, text
    assert printable_share(untrained) < 0.6, untrained


def test_a_seed_repeats_a_sample_and_another_seed_changes_it(trained):
    loaded = load_for_generation(trained)
    first, again = (sample(loaded, "import ", 60, 1.0, 0, seed=1) for _ in range(2))
    assert first == again and first != sample(loaded, "import ", 60, 1.0, 0, seed=2)


def test_the_command_prints_the_prompt_and_its_continuation(trained, capsys):
    assert main([str(trained), "--prompt", "class ", "--max-new-tokens", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    expected = sample(load_for_generation(trained), "class ", 40, 0.8, 40, seed=3)
    assert out == "class " + expected + "\n" and len(expected.encode()) <= 40


def test_the_tokenizer_a_run_trained_with_is_found_from_its_run_config(tmp_path):
    from test_data import word_tokenizer
    tokenizer = word_tokenizer(tmp_path / "words.json")  # [UNK], hello, world, </s>
    untrained_folder(tmp_path / "run" / "final")
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"tokenizer": str(tokenizer)}))
    loaded = load_for_generation(tmp_path / "run" / "final")
    assert loaded.tokenizer.vocab_size == 4 and loaded.tokenizer.eos_id == 3
    words = sample(loaded, "hello world", 30, 1.0, 0, seed=0).split()
    # the model's 256 logits are cut to the tokenizer's 4 ids, and </s> ends the sample
    assert words and set(words) <= {"hello", "world", "[UNK]"}, words


@pytest.mark.parametrize("argv,message", [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "holds no config.json"),
    (["{bigvocab}"], "found no tokenizer for a model of vocabulary 300"),
    (["{empty}", "--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["{empty}", "--top-k", "-2"], "--top-k: must be >= 0"),
])
def test_bad_input_is_one_line_naming_what_to_pass(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    untrained_folder(tmp_path / "bigvocab", vocab_size=300)
    folders = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "bigvocab": tmp_path / "bigvocab"}
    assert main([a.format(**folders) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_an_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(GenerateError, match="model_type 'gpt2' is not supported; supported: llama"):
        load_for_generation(tmp_path)
