"""Data sources, what counts as text, document separators, packing, deterministic order, the
held-out split, the data summary and the data identity."""
import gzip
import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from streamtrain import run
from streamtrain.data import (ByteTokenizer, DataError, TokenDataset, builtin_corpus_files, data_identity,
                              data_summary, load_corpus, load_tokens, make_tokenizer, tokenizer_identity)


def word_tokenizer(path, words=("hello", "world", "</s>"), template=None):
    """A tiny word-level tokenizer.json: [UNK] is id 0, then `words`; `template` appends tokens
    after each text (TemplateProcessing)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    if template:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"$A {template}", special_tokens=[(template, vocab[template])])
    tok.save(str(path))
    return str(path)


def test_builtin_corpus_is_the_stdlib_and_needs_no_download():
    files = builtin_corpus_files()
    assert len(files) > 500 and any(f.name == "os.py" for f in files)
    tokens = load_tokens("builtin", max_bytes=200_000)
    assert len(tokens) == 200_000 and tokens.max() < 256


def test_builtin_corpus_skips_exactly_the_stdlib_files_that_are_not_utf8():
    stdlib = builtin_corpus_files()[0].parents[0]
    not_utf8 = []
    for f in builtin_corpus_files():
        try:
            f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(f"{f.relative_to(stdlib)} (not UTF-8)")
    corpus = load_corpus("builtin")  # all of it: a bad file anywhere would fail here
    assert corpus.skipped == not_utf8
    assert corpus.files == len(builtin_corpus_files()) - len(not_utf8)


def test_documents_are_separated_by_the_byte_tokenizers_eos(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("world")
    (sub / "c.jsonl").write_text(json.dumps({"text": "!!"}) + "\n\n" + json.dumps({"text": "?"}) + "\n")
    tok = ByteTokenizer()
    assert tok.eos_id == 0
    assert tok.decode(load_tokens(str(tmp_path / "a.txt"))) == "hello "  # one file, one document
    assert tok.decode(load_tokens(str(tmp_path))) == "hello \0world\0!!\0?"
    assert tok.decode(load_tokens(str(sub / "c.jsonl"))) == "!!\0?"
    corpus = load_corpus(str(tmp_path))
    assert (corpus.files, corpus.documents, corpus.eos_id) == (3, 4, 0)


def test_documents_are_separated_by_a_tokenizer_json_eos_never_doubled(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "hello world"}\n{"text": "world"}\n')
    plain = make_tokenizer(word_tokenizer(tmp_path / "plain.json"))
    assert plain.eos_id == 3 and list(load_tokens(str(docs), plain)) == [1, 2, 3, 2]
    # a post-processor that already ends each text with the eos: no second one
    appends = make_tokenizer(word_tokenizer(tmp_path / "appends.json", template="</s>"))
    assert list(load_tokens(str(docs), appends)) == [1, 2, 3, 2, 3]
    # no well-known name: the special token the post-processor appends is the separator
    sep = make_tokenizer(word_tokenizer(tmp_path / "sep.json", words=("hello", "world", "[SEP]"), template="[SEP]"))
    assert sep.eos_id == 3
    with pytest.warns(UserWarning, match="no end-of-text token"):
        none = make_tokenizer(word_tokenizer(tmp_path / "none.json", words=("hello", "world")))
    assert none.eos_id is None and list(load_tokens(str(docs), none)) == [1, 2, 2]


def test_a_text_file_without_a_known_suffix_is_sniffed_and_read(tmp_path):
    (tmp_path / "README").write_text("plain text, no suffix\n")
    (tmp_path / "notes.log").write_text("a log line\n")
    tok = ByteTokenizer()
    assert tok.decode(load_tokens(str(tmp_path / "README"))) == "plain text, no suffix\n"
    assert tok.decode(load_tokens(str(tmp_path / "notes.log"))) == "a log line\n"


def binary_files(tmp_path):
    text = b"hello world\n" * 50
    files = {"data.parquet": b"PAR1" + bytes(range(256)) + b"PAR1", "data.jsonl.gz": gzip.compress(text),
             "data.txt.gz": gzip.compress(text)}
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("a.txt", text)
    np.save(tmp_path / "weights.npy", np.arange(10))
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    shutil.copy(shutil.which("ls") or "/bin/ls", tmp_path / "ls")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return ["data.parquet", "data.jsonl.gz", "data.txt.gz", "data.zip", "weights.npy", "model.pt", "ls"]


def test_binary_and_unknown_formats_are_refused_naming_the_supported_ones(tmp_path):
    for name in binary_files(tmp_path):
        with pytest.raises(DataError, match=rf"{name} is not a text file \(.*\); --data takes UTF-8 text .*\.jsonl"):
            load_tokens(str(tmp_path / name))


def test_a_folder_reads_its_text_and_lists_the_files_it_skips(tmp_path):
    skipped = binary_files(tmp_path)
    (tmp_path / "keep.txt").write_text("kept")
    (tmp_path / ".hidden.txt").write_text("hidden files are not data")
    corpus = load_corpus(str(tmp_path))
    assert ByteTokenizer().decode(corpus.tokens) == "kept"
    assert sorted(s.split(" (")[0] for s in corpus.skipped) == sorted(skipped)


def test_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("hello café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: invalid UTF-8 at byte 9; convert it"):
        load_tokens(str(tmp_path / "latin1.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 \(line at byte 15\): invalid UTF-8 at byte 13"):
        load_tokens(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nul.txt").write_bytes(b"text\0more")
    with pytest.raises(DataError, match="nul.txt holds a NUL byte at byte 4"):
        load_tokens(str(tmp_path / "nul.txt"))


@pytest.mark.parametrize("line,kind", [("[1, 2]", "list"), ('"a text"', "str"), ("1", "int")])
def test_a_jsonl_line_that_is_not_an_object_is_a_one_line_error(tmp_path, line, kind):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"x.jsonl:2 is a JSON {kind}, not an object with a 'text' field"):
        load_tokens(str(tmp_path / "x.jsonl"))


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


def test_a_bad_tokenizer_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "notjson.json").write_text("this is not json")
    with pytest.raises(DataError, match=r"tokenizer file .*notjson.json is not JSON"):
        make_tokenizer(str(tmp_path / "notjson.json"))
    (tmp_path / "rejected.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(DataError, match=r"tokenizer file .*rejected.json is not a tokenizer the 'tokenizers' "
                                        r"package reads \(.+\); pass"):
        make_tokenizer(str(tmp_path / "rejected.json"))


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


def test_data_summary_counts_epochs_and_warns_on_repeats_and_tiny_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 3200)
    (tmp_path / "b.txt").write_text("y" * 3200)
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY")
    corpus = load_corpus(str(tmp_path))
    dataset = TokenDataset(corpus.tokens, seq_len=16, seed=0)  # 6401 tokens: 400 windows, 392 train + 8 val
    lines = data_summary(corpus, dataset, steps=49, batch_size=4, accumulate=2)  # 392 windows: one epoch
    assert lines[0] == f"data: {tmp_path} (2 files, 2 documents separated by token 0): 6,401 tokens"
    assert lines[1].startswith("data: 392 train + 8 validation windows of 16 tokens;")
    assert lines[1].endswith("49 steps x 4 batch x 2 accumulate = 1.00 epochs")
    assert lines[2] == "data: skipped 1 files: c.npy (.npy is a binary format)"
    assert lines[3].startswith("warning: the corpus is tiny (6,401 tokens") and len(lines) == 4
    repeats = data_summary(corpus, dataset, steps=1000, batch_size=4, accumulate=2)
    assert "warning: the run repeats the training data 20 times (over 10 epochs)" in repeats[3]
    big = load_corpus("builtin", max_bytes=200_000)
    assert not any(line.startswith("warning") for line in data_summary(big, TokenDataset(big.tokens, 64), 10, 4))


def test_a_run_prints_the_data_summary_first(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text to learn from. " * 40)
    argv = ["--model", "byte-tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--no-progress", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run")]
    assert run.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("data: "))  # after where the run writes
    assert out[first] == f"data: {tmp_path / 'a.txt'} (1 files, 1 documents separated by token 0): 1,000 tokens"
    assert out[first + 1].endswith("1 steps x 2 batch x 1 accumulate = 0.03 epochs")
    assert out[-1].startswith("done: 1 steps")


def test_data_identity_follows_the_content_and_is_cheap_on_large_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (3 << 20))
    identity = data_identity(str(tmp_path), ByteTokenizer(), None, "text")
    assert json.loads(json.dumps(identity)) == identity
    assert (identity["kind"], identity["files"], identity["eos_id"]) == ("folder", 2, 0)
    assert identity["bytes"] == 5 + (3 << 20)
    assert data_identity(str(tmp_path), ByteTokenizer(), None, "text") == identity
    (tmp_path / "a.txt").write_text("hellO")  # same size, other content
    changed = data_identity(str(tmp_path), ByteTokenizer(), None, "text")
    assert changed["fingerprint"] != identity["fingerprint"]
    with open(big, "r+b") as fh:  # the last MiB is read, the middle one is not (that is the price of cheap)
        fh.seek((3 << 20) - 10)
        fh.write(b"b")
    assert data_identity(str(tmp_path), ByteTokenizer(), None, "text")["fingerprint"] != changed["fingerprint"]
    assert data_identity("builtin", None, 1000, "text")["max_bytes"] == 1000


def test_tokenizer_identity_is_the_kind_and_the_exact_file(tmp_path):
    assert tokenizer_identity(ByteTokenizer()) == {"kind": "bytes"}
    path = word_tokenizer(tmp_path / "tok.json")
    digest = hashlib.blake2b(open(path, "rb").read(), digest_size=16).hexdigest()
    assert tokenizer_identity(make_tokenizer(path)) == {"kind": "tokenizers", "vocab_size": 4, "blake2b": digest}


def test_ranks_shard_the_global_batch_in_order():
    dataset = TokenDataset(np.arange(20_000) % 256, 16, seed=0)
    for position in (0, 7, 300):  # 300: past the first epoch
        whole_x, whole_y = dataset.train_batch(position, 6)
        parts = [dataset.train_batch(position, 3, rank=r, world_size=2) for r in range(2)]
        assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
        assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
