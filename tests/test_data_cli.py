"""`gptlab data prepare | inspect | download` and `inspect_data`: exit codes, one-line errors, the report."""

import json

import numpy as np
import pytest
from helpers import TINY_STORIES

from gptlab.cli import main
from gptlab.data import inspect_data, load_meta
from gptlab.data.inspect import format_report


def test_prepare_and_inspect(tmp_path, tiny_corpus, tiny_tokenizer, capsys):
    out = tmp_path / "data"
    rc = main(["data", "prepare", "--data", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer), "--out", str(out),
               "--data.val_fraction=0.25", "--data.shard_size=1000", "--quiet"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert rc == 0 and f"{out}: train " in stdout
    meta = load_meta(out)
    assert meta["splits"]["train"]["shards"][0]["tokens"] == 1000
    assert f"{meta['splits']['train']['tokens']:,} tokens" in stdout

    assert main(["data", "inspect", str(out), "--top", "5"]) == 0
    report = capsys.readouterr().out
    assert "vocabulary:" in report and "most frequent tokens" in report and str(tiny_corpus) in report

    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"]


def test_val_data_flag(tmp_path, tiny_corpus, tiny_tokenizer, capsys):
    val = tmp_path / "val.txt"
    val.write_text("A held-out story about a fox.\n<|endoftext|>\nAnother one about a frog.\n", encoding="utf-8")
    out = tmp_path / "data"
    assert main(["data", "prepare", "--data", str(tiny_corpus), "--val-data", str(val), "-t", str(tiny_tokenizer), "-o", str(out), "-q"]) == 0
    meta = load_meta(out)
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["train"]["documents"] == 120


def test_inspect_data_counts(tiny_shards):
    report = inspect_data(tiny_shards, top=10, sample_tokens=30)
    meta = load_meta(tiny_shards)
    total = sum(s["tokens"] for s in meta["splits"].values())
    assert report["scanned_tokens"] == total
    assert 0 < report["vocab_used"] <= report["tokenizer"]["vocab_size"]
    assert report["vocab_usage"] == pytest.approx(report["vocab_used"] / report["tokenizer"]["vocab_size"])
    counts = [t["count"] for t in report["top_tokens"]]
    assert counts == sorted(counts, reverse=True) and len(counts) == 10
    eos = next(t for t in report["top_tokens"] if t["text"] == "<|endoftext|>")
    assert eos["count"] == sum(s["documents"] for s in meta["splits"].values())  # one EOS per document
    first_doc = report["sample"]["text"].split("<|endoftext|>")[0]
    assert len(first_doc) > 20 and any(story.startswith(first_doc) for story in TINY_STORIES)
    assert report["splits"]["train"]["bytes_per_token"] > 1
    assert inspect_data(tiny_shards, max_scan_tokens=100)["scanned_tokens"] == 100
    assert "bytes/token" in format_report(report)


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda d: (d / "train_000001.bin").write_bytes((d / "train_000001.bin").read_bytes()[:-10]), "truncated or corrupt shard"),
        (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
    ],
)
def test_inspect_broken_folder_is_one_line(tmp_path, tiny_shards, capsys, break_it, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    break_it(broken)
    assert main(["data", "inspect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "missing.txt"], "source path not found: missing.txt"),
        (["--data", "{corpus}", "--data.val_fraction=0.0001"], "validation split is empty"),
        (["--data", "{corpus}", "--data.shard_size=0"], "data.shard_size"),
        (["--data", "{corpus}", "--tokenizer", "nope.json"], "tokenizer file not found"),
        ([], "no data sources given"),
    ],
)
def test_prepare_bad_input_exits_2(tmp_path, tiny_corpus, tiny_tokenizer, capsys, args, message):
    args = [a.replace("{corpus}", str(tiny_corpus)) for a in args]
    if "--tokenizer" not in args:
        args += ["--tokenizer", str(tiny_tokenizer)]
    assert main(["data", "prepare", *args, "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_binary_corpus_names_the_file(tmp_path, tiny_tokenizer, capsys):
    corpus = tmp_path / "blob.txt"
    corpus.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert main(["data", "prepare", "--data", str(corpus), "-t", str(tiny_tokenizer), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "blob.txt" in capsys.readouterr().err


def test_download(capsys, tmp_path, monkeypatch):
    assert main(["data", "download", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("tinystories", "fineweb-edu", "meditations", "tinyshakespeare"):
        assert name in listed
    assert main(["data", "download", "no-such-set", "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["data", "download"]) == 2
    assert "--list" in capsys.readouterr().err

    fetched = []
    monkeypatch.setattr("gptlab.text.download_dataset", lambda name, out, max_bytes=None, force=False: fetched.append((name, out, max_bytes)) or tmp_path / "x.txt")
    assert main(["data", "download", "meditations", "--out", str(tmp_path), "--max-bytes", "1000"]) == 0
    assert fetched == [("meditations", str(tmp_path), 1000)] and "x.txt" in capsys.readouterr().out


def test_help_has_examples(capsys):
    for command in ("prepare", "inspect", "download"):
        with pytest.raises(SystemExit):
            main(["data", command, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_prepare_warns_when_a_split_is_shorter_than_a_window(tmp_path, tiny_corpus, tiny_tokenizer, capsys):
    args = ["data", "prepare", "--data", str(tiny_corpus), "-t", str(tiny_tokenizer), "-o", str(tmp_path / "d"), "-q"]
    assert main([*args, "--data.val_fraction=0.25", "--model.context_length=1000"]) == 0
    err = capsys.readouterr().err
    assert "warning: split val has" in err and "fewer than one window of 1001" in err and "split train" not in err


@pytest.mark.parametrize("book", ["tinyshakespeare.txt", "meditations.txt"])
def test_prepare_a_plain_book_with_the_defaults(shared_data, tmp_path, tiny_tokenizer, capsys, book):
    """nanoGPT's first workflow: one text file, no settings. Its tail is the validation split, said in one line."""
    out = tmp_path / "data"
    assert main(["data", "prepare", "--data", str(shared_data / book), "--tokenizer", str(tiny_tokenizer),
                 "--out", str(out), "--data.workers=1"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "too few" in line]
    assert len(said) == 1 and f"{book}: 1 document" in said[0] and "validation split" in said[0]
    meta = json.loads((out / "meta.json").read_text())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["sources"][0]["val_split"] == "tail" and train["documents"] == val["documents"] == 1
    assert 0.1 <= val["bytes"] / (train["bytes"] + val["bytes"]) <= 0.15
