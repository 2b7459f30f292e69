"""Token .bin files: the dtype is declared (sidecar, suffix or flag), never guessed; length and
ids are checked at load; `python -m streamtrain.data tokenize` writes a .bin the loader reads back
as exactly the tokens of the text."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamtrain import run
from streamtrain.data import DataError, load_tokens, make_tokenizer
from streamtrain.data import tokenfile

from test_data import word_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_bin(path, ids, dtype, sidecar=None):
    np.asarray(ids, dtype=dtype).tofile(path)
    if sidecar is not None:
        Path(str(path) + ".json").write_text(json.dumps(sidecar))
    return str(path)


@pytest.mark.parametrize("suffix,dtype", [(".u16.bin", np.uint16), (".u32.bin", np.uint32)])
def test_pretokenized_bin_is_memory_mapped(tmp_path, suffix, dtype):
    path = tmp_path / f"tokens{suffix}"
    np.arange(1000, dtype=dtype).tofile(path)
    tokens = load_tokens(str(path))
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype and tokens[999] == 999


def test_a_bin_without_sidecar_suffix_or_flag_is_refused_saying_how_to_fix_it(tmp_path):
    path = write_bin(tmp_path / "tokens.bin", range(100), np.uint32)
    with pytest.raises(DataError, match="tokens.bin has no declared dtype: write it with python -m "
                                        "streamtrain.data tokenize .* or pass --token-dtype"):
        load_tokens(path)


def test_a_uint32_bin_is_read_with_the_dtype_its_sidecar_declares(tmp_path):
    ids = np.arange(70_000, 71_000)  # ids a uint16 reading would mangle
    sidecar = {"dtype": "uint32", "vocab_size": 80_000, "tokens": 1000}
    path = write_bin(tmp_path / "tokens.bin", ids, np.uint32, sidecar)
    tokens = load_tokens(path)
    assert tokens.dtype == np.uint32 and (tokens == ids).all()


def test_the_token_dtype_flag_declares_the_dtype_and_every_declaration_must_agree(tmp_path):
    path = write_bin(tmp_path / "tokens.bin", range(100), np.uint32)
    assert list(load_tokens(path, token_dtype="uint32")) == list(range(100))
    write_bin(tmp_path / "tokens.bin", range(100), np.uint32, {"dtype": "uint16", "vocab_size": 256, "tokens": 200})
    with pytest.raises(DataError, match=r"dtypes disagree \(--token-dtype says uint32, tokens.bin.json says uint16\)"):
        load_tokens(path, token_dtype="uint32")
    suffixed = write_bin(tmp_path / "tokens.u16.bin", range(100), np.uint16)
    with pytest.raises(DataError, match="--token-dtype says uint32, the suffix .u16.bin says uint16"):
        load_tokens(suffixed, token_dtype="uint32")
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="--token-dtype is for a token .bin"):
        load_tokens(str(tmp_path / "a.txt"), token_dtype="uint16")


def test_a_bin_whose_length_is_not_whole_tokens_or_not_its_sidecars_count_is_refused(tmp_path):
    path = tmp_path / "odd.u16.bin"
    path.write_bytes(b"\x01\x00" * 500 + b"\x01")
    with pytest.raises(DataError, match="odd.u16.bin has 1001 bytes, not a multiple of 2 \\(uint16\\)"):
        load_tokens(str(path))
    sidecar = {"dtype": "uint16", "vocab_size": 256, "tokens": 100}
    short = write_bin(tmp_path / "short.bin", range(90), np.uint16, sidecar)
    with pytest.raises(DataError, match="short.bin holds 90 tokens but short.bin.json says 100"):
        load_tokens(short)
    (tmp_path / "broken.bin.json").write_text('{"dtype": "uint16"}')
    write_bin(tmp_path / "broken.bin", range(10), np.uint16)
    with pytest.raises(DataError, match='broken.bin.json needs {"dtype"'):
        load_tokens(str(tmp_path / "broken.bin"))


def test_token_ids_beyond_the_vocab_are_refused_at_load_chunk_by_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenfile, "CHECK_CHUNK", 7)  # the bad id sits in the third chunk
    ids = np.arange(100) % 200
    ids[17] = 300
    path = write_bin(tmp_path / "tokens.u16.bin", ids, np.uint16)
    assert len(load_tokens(path)) == 100  # no vocab known: nothing to check against
    with pytest.raises(DataError, match="tokens.u16.bin holds id 300 at token 17, beyond the vocabulary of 256"):
        load_tokens(path, vocab_size=256)
    sidecar = write_bin(tmp_path / "side.bin", ids, np.uint16, {"dtype": "uint16", "vocab_size": 256, "tokens": 100})
    with pytest.raises(DataError, match="holds id 300 at token 17, beyond the vocabulary of 256"):
        load_tokens(sidecar)  # the sidecar's vocabulary bounds the ids
    with pytest.raises(DataError, match="made with a 256-token vocabulary but the model has 128 embeddings"):
        load_tokens(sidecar, vocab_size=128)


def test_a_run_refuses_a_bin_with_ids_beyond_the_models_vocab_in_one_line(tmp_path, capsys):
    path = write_bin(tmp_path / "gpt2.u16.bin", np.arange(5000) * 10, np.uint16)  # ids up to 49990
    argv = ["--model", "byte-tiny", "--steps", "1", "--no-progress", "--data", path, "--out", str(tmp_path / "run")]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: token file") and "holds id 260 at token 26, beyond the vocabulary of 256" in err
    assert "\n" not in err


def test_the_tokenize_command_round_trips_to_the_tokens_of_the_text(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first document, with ünïcödé\n")
    (data / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
    out = tmp_path / "tokens.bin"
    result = subprocess.run([sys.executable, "-m", "streamtrain.data", "tokenize", str(data), str(out)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    expected = load_tokens(str(data))
    sidecar = json.loads((tmp_path / "tokens.bin.json").read_text())
    assert sidecar["dtype"] == "uint16" and sidecar["vocab_size"] == 256 and sidecar["tokens"] == len(expected)
    assert sidecar["documents"] == 3 and sidecar["eos_id"] == 0 and sidecar["tokenizer"] == {"kind": "bytes"}
    loaded = load_tokens(str(out), vocab_size=256)
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, expected)
    assert f"wrote {len(expected):,} uint16 tokens (3 documents)" in result.stdout


def test_the_tokenize_command_with_a_tokenizer_json(tmp_path, capsys):
    from streamtrain.data.__main__ import main
    tokenizer = word_tokenizer(tmp_path / "tok.json")
    (tmp_path / "docs.jsonl").write_text('{"body": "hello world"}\n{"body": "world"}\n')
    out = tmp_path / "docs.bin"
    assert main(["tokenize", str(tmp_path / "docs.jsonl"), str(out), "--tokenizer", tokenizer,
                 "--text-field", "body"]) == 0
    assert list(load_tokens(str(out))) == [1, 2, 3, 2]
    expected = load_tokens(str(tmp_path / "docs.jsonl"), make_tokenizer(tokenizer), text_field="body")
    assert list(expected) == [1, 2, 3, 2]
    assert main(["tokenize", str(out), str(tmp_path / "again.bin")]) == 2  # tokens are not text
    assert "tokenize writes a .bin from text" in capsys.readouterr().err
