"""Data sources, packing, deterministic order and the held-out split."""
import json

import numpy as np
import pytest

from streamtrain.data import ByteTokenizer, DataError, TokenDataset, builtin_corpus_files, load_tokens


def test_builtin_corpus_is_the_stdlib_and_needs_no_download():
    files = builtin_corpus_files()
    assert len(files) > 500 and any(f.name == "os.py" for f in files)
    tokens = load_tokens("builtin", max_bytes=200_000)
    assert len(tokens) == 200_000 and tokens.max() < 256


def test_text_file_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("world")
    (sub / "c.jsonl").write_text(json.dumps({"text": "!!"}) + "\n\n" + json.dumps({"text": "?"}) + "\n")
    tok = ByteTokenizer()
    assert tok.decode(load_tokens(str(tmp_path / "a.txt"))) == "hello "
    assert tok.decode(load_tokens(str(tmp_path))) == "hello world!!?"
    assert tok.decode(load_tokens(str(sub / "c.jsonl"))) == "!!?"


@pytest.mark.parametrize("suffix,dtype", [(".u16.bin", np.uint16), (".u32.bin", np.uint32)])
def test_pretokenized_bin_is_memory_mapped(tmp_path, suffix, dtype):
    path = tmp_path / f"tokens{suffix}"
    np.arange(1000, dtype=dtype).tofile(path)
    tokens = load_tokens(str(path))
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype and tokens[999] == 999


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_tokens(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_tokens(str(tmp_path / "bad.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(DataError, match="not a string"):
        load_tokens(str(tmp_path / "num.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="text-field"):
        load_tokens(str(tmp_path / "nofield.jsonl"))
    with pytest.raises(DataError, match="too few"):
        TokenDataset(np.arange(10), seq_len=8)


def test_split_is_disjoint_and_order_is_a_pure_function_of_seed_and_position():
    tokens = np.arange(10_000)  # every window starts with a distinct token
    ds = TokenDataset(tokens, seq_len=16, seed=3, val_fraction=0.1)
    assert not set(ds.val_windows) & set(ds.train_windows)
    assert len(ds.val_windows) + len(ds.train_windows) == (len(tokens) - 1) // 16
    again = TokenDataset(tokens, seq_len=16, seed=3, val_fraction=0.1)
    x1, y1 = ds.train_batch(7, 4)
    x2, y2 = again.train_batch(7, 4)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are the inputs shifted by one
    other_seed = TokenDataset(tokens, seq_len=16, seed=4, val_fraction=0.1)
    assert not (other_seed.train_batch(7, 4)[0] == x1).all()
    # one epoch visits every training window exactly once; the next epoch reshuffles
    n = len(ds.train_windows)
    first_epoch = [int(ds.train_batch(i, 1)[0][0, 0]) for i in range(n)]
    assert len(set(first_epoch)) == n
    second_epoch = [int(ds.train_batch(n + i, 1)[0][0, 0]) for i in range(n)]
    assert sorted(second_epoch) == sorted(first_epoch) and second_epoch != first_epoch
