"""prepare_data: shards, splits, weights, limits, determinism, resume after an interruption, bad input."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_STORIES

from gptlab.config import load_config
from gptlab.data import (
    BatchLoader,
    check_tokenizer,
    load_meta,
    prepare_data,
    read_shard,
)
from gptlab.data import prepare as prepare_module
from gptlab.errors import GptlabError
from gptlab.tokenizer import load_tokenizer

SENTENCES = [s for story in TINY_STORIES for s in story.split(". ")]


def write_corpus(path: Path, n_docs: int, seed: int = 0, prefix: str = "Story") -> list[str]:
    """n distinct short documents, <|endoftext|> between them; returns the documents."""
    rng = random.Random(seed)
    docs = [f"{prefix} {i}. " + ". ".join(rng.sample(SENTENCES, 3)) for i in range(n_docs)]
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return docs


def toml_sources(sources) -> str:
    """Paths or dicts of source settings as a TOML array of inline tables."""
    tables = [s if isinstance(s, dict) else {"path": str(s)} for s in sources]
    return "[" + ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) + "}" for t in tables) + "]"


def config(out: Path, sources, *overrides, val_sources=()):
    args = [f"--data.sources={toml_sources(sources)}", f"--data.out_dir={json.dumps(str(out))}", "--data.workers=1"]
    if val_sources:
        args.append(f"--data.val_sources={toml_sources(val_sources)}")
    return load_config(None, args + list(overrides))


def shard_docs(out: Path, split: str, tokenizer) -> list[str]:
    """The documents of a split, decoded from its shards and cut at EOS."""
    meta = load_meta(out)
    shards = [read_shard(out / s["file"]) for s in meta["splits"][split]["shards"]]
    tokens = np.concatenate(shards) if shards else np.zeros(0, np.uint16)
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1, "every document ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def output_files(out: Path) -> dict[str, bytes]:
    """Everything a finished prepare leaves, except config.toml (it records data.workers)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "config.toml"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    return path, write_corpus(path, 300)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def test_prepare_writes_every_document_once(tmp_path, corpus, tiny_tokenizer, tokenizer):
    path, docs = corpus
    out = tmp_path / "out"
    meta = prepare_data(config(out, [path], "--data.shard_size=2000", "--data.val_fraction=0.2"), tiny_tokenizer)

    train, val = shard_docs(out, "train", tokenizer), shard_docs(out, "val", tokenizer)
    assert sorted(train + val) == sorted(docs)  # split by document: every one exactly once, whole
    assert train == [d for d in docs if d in set(train)]  # in corpus order
    assert 30 <= len(val) <= 90
    splits = meta["splits"]
    assert (splits["train"]["documents"], splits["val"]["documents"]) == (len(train), len(val))
    for split in ("train", "val"):
        shards = splits[split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 2000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 2000
        assert splits[split]["tokens"] == sum(s["tokens"] for s in shards)
        assert splits[split]["bytes"] == sum(len(d.encode()) for d in (train if split == "train" else val))
    assert meta["tokenizer_checksum"] == tokenizer.checksum and meta["dtype"] == "uint16"
    assert meta["sources"][0]["train"]["tokens"] == splits["train"]["tokens"]
    assert (out / "tokenizer.json").read_bytes() == Path(tiny_tokenizer).read_bytes()
    assert load_config(out / "config.toml").data.shard_size == 2000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no progress/partial files left
    check_tokenizer(out, tokenizer)
    assert load_meta(out) == meta


def test_output_does_not_depend_on_worker_count(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 2000)  # many chunks in flight
    path, _ = corpus
    for workers in (1, 2):
        prepare_data(config(tmp_path / f"w{workers}", [path], "--data.shard_size=1500", f"--data.workers={workers}"), tiny_tokenizer)
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2")


def test_split_is_seeded_and_keeps_duplicates_together(tmp_path, tiny_tokenizer, tokenizer):
    path = tmp_path / "c.txt"
    docs = write_corpus(path, 200)
    path.write_text(path.read_text() * 2)  # every document twice
    vals = []
    for seed in (1, 1, 2):
        out = tmp_path / f"s{seed}_{len(vals)}"
        prepare_data(config(out, [path], f"--data.seed={seed}", "--data.val_fraction=0.3"), tiny_tokenizer)
        val = shard_docs(out, "val", tokenizer)
        assert not set(val) & set(shard_docs(out, "train", tokenizer))  # duplicates never straddle the split
        assert sorted(set(val)) == sorted(d for d in docs if val.count(d) == 2)
        vals.append(val)
    assert vals[0] == vals[1] != vals[2]


def test_validation_sources_replace_the_fraction(tmp_path, tiny_tokenizer, tokenizer):
    train_docs = write_corpus(tmp_path / "train.txt", 50)
    val_docs = write_corpus(tmp_path / "val.txt", 10, seed=1, prefix="Held-out")
    out = tmp_path / "out"
    meta = prepare_data(config(out, [tmp_path / "train.txt"], val_sources=[tmp_path / "val.txt"]), tiny_tokenizer)
    assert shard_docs(out, "train", tokenizer) == train_docs
    assert shard_docs(out, "val", tokenizer) == val_docs
    assert [s["role"] for s in meta["sources"]] == ["train", "val"] and meta["val_fraction"] == 0.0


def test_weights_repeat_a_source_and_take_validation_once(tmp_path, tiny_tokenizer, tokenizer):
    a = write_corpus(tmp_path / "a.txt", 60, prefix="Alpha")
    b = write_corpus(tmp_path / "b.txt", 60, seed=1, prefix="Beta")
    sources = [{"path": str(tmp_path / "a.txt"), "weight": 3, "label": "alpha"}, {"path": str(tmp_path / "b.txt")}]
    out = tmp_path / "out"
    meta = prepare_data(config(out, sources, "--data.val_fraction=0.2"), tiny_tokenizer)
    train, val = shard_docs(out, "train", tokenizer), shard_docs(out, "val", tokenizer)
    a_train = [d for d in a if d not in val]
    assert train == a_train * 3 + [d for d in b if d not in val]
    assert sorted(val) == sorted(d for d in a + b if d in set(val)) and len(val) == len(set(val))
    alpha = meta["sources"][0]
    assert alpha["label"] == "alpha" and alpha["weight"] == 3 and alpha["train"]["documents"] == 3 * len(a_train)


def test_max_tokens_limits(tmp_path, corpus, tiny_tokenizer, tokenizer):
    path, _ = corpus
    meta = prepare_data(config(tmp_path / "g", [path], "--data.max_tokens=3001", "--data.shard_size=1000"), tiny_tokenizer)
    assert meta["splits"]["train"]["tokens"] == 3001
    assert [s["tokens"] for s in meta["splits"]["train"]["shards"]] == [1000, 1000, 1000, 1]

    # a source's max_tokens counts both splits in its first reading; repeats stop where it stopped
    sources = [{"path": str(path), "max_tokens": 1234, "weight": 2}]
    meta = prepare_data(config(tmp_path / "s", sources, "--data.val_fraction=0.2"), tiny_tokenizer)
    first = meta["sources"][0]
    assert first["train"]["tokens"] % 2 == 0
    assert first["train"]["tokens"] // 2 + first["val"]["tokens"] == 1234
    train = np.concatenate([read_shard(tmp_path / "s" / s["file"]) for s in meta["splits"]["train"]["shards"]])
    half = len(train) // 2
    assert np.array_equal(train[:half], train[half:])


def test_normalisation_bos_and_uint32(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    path, docs = corpus
    monkeypatch.setattr(prepare_module, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    bos_tokenizer = tmp_path / "bos.json"
    tok_json = json.loads(Path(tiny_tokenizer).read_text())
    tok_json["model"]["gptlab"]["bos_token"] = "<|endoftext|>"  # BOS and EOS may share a token
    bos_tokenizer.write_text(json.dumps(tok_json))
    tok = load_tokenizer(bos_tokenizer)
    out = tmp_path / "out"
    cfg = config(out, [path], "--text.normalize=['lowercase']", "--data.add_bos=true", "--data.val_fraction=0")
    meta = prepare_data(cfg, bos_tokenizer)
    assert meta["dtype"] == "uint32" and meta["header"]["magic"] == 20240801
    tokens = read_shard(out / "train_000000.bin")
    assert tokens.dtype == np.uint32 and tokens[0] == tok.bos_id
    assert tok.decode(tokens[1:].tolist()).split("<|endoftext|><|endoftext|>")[0] == docs[0].lower()
    x, y = BatchLoader(out, batch_size=2, seq_len=8).next_batch()
    assert x.shape == (2, 8)


def test_finished_folder_is_reused_unless_forced(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    path, _ = corpus
    cfg = config(tmp_path / "out", [path])
    meta = prepare_data(cfg, tiny_tokenizer)
    calls = []
    monkeypatch.setattr(prepare_module.DocumentEncoder, "__call__", lambda self, chunk: calls.append(chunk) or 1 / 0)
    assert prepare_data(cfg, tiny_tokenizer) == meta and not calls
    with pytest.raises(ZeroDivisionError):
        prepare_data(cfg, tiny_tokenizer, force=True)
    assert not (tmp_path / "out" / "meta.json").exists()  # a forced redo first unmarks the folder


# --------------------------------------------------------------------------- interruption and resume


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, cls, name, calls: int, before: bool):
    original = getattr(cls, name)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):
        count["n"] += 1
        if before and count["n"] == calls:
            raise Interrupt
        result = original(self, *args, **kwargs)
        if not before and count["n"] == calls:
            raise Interrupt
        return result

    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.parametrize(
    "where",
    [
        ("SplitWriter", "finish_shard", 2, False),  # shard 1 renamed into place, progress not yet saved
        ("SplitWriter", "finish_shard", 3, True),  # while finishing shard 2
        ("SplitWriter", "write", 12, True),  # mid-chunk: train tokens written, val not
        ("DocumentEncoder", "__call__", 7, True),  # while encoding
    ],
)
def test_interrupted_prepare_resumes_to_identical_output(tmp_path, corpus, tiny_tokenizer, monkeypatch, where):
    cls_name, method, calls, before = where
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1500)
    path, _ = corpus
    args = ("--data.shard_size=900", "--data.val_fraction=0.2")
    encoded = []
    original_call = prepare_module.DocumentEncoder.__call__
    monkeypatch.setattr(prepare_module.DocumentEncoder, "__call__", lambda self, c: encoded.append(c) or original_call(self, c))
    prepare_data(config(tmp_path / "clean", [path], *args), tiny_tokenizer)
    expected, chunks_in_full_run = output_files(tmp_path / "clean"), len(encoded)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, getattr(prepare_module, cls_name), method, calls, before)
        with pytest.raises(Interrupt):
            prepare_data(config(out, [path], *args), tiny_tokenizer)
    assert not (out / "meta.json").exists()
    with pytest.raises(GptlabError, match="prepare did not finish"):
        BatchLoader(out, batch_size=1, seq_len=4)
    for shard in out.glob("*.bin"):  # whatever looks like a shard is a complete one
        assert len(read_shard(shard)) == 900

    encoded.clear()
    prepare_data(config(out, [path], *args), tiny_tokenizer)
    assert output_files(out) == expected
    resumed_at = encoded[0].index
    assert resumed_at > 0 and len(encoded) == chunks_in_full_run - resumed_at  # resumed, not restarted


def test_changed_config_restarts_clean(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1500)
    path, _ = corpus
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, prepare_module.SplitWriter, "finish_shard", 2, False)
        with pytest.raises(Interrupt):
            prepare_data(config(out, [path], "--data.shard_size=900"), tiny_tokenizer)
    prepare_data(config(out, [path], "--data.shard_size=700"), tiny_tokenizer)
    prepare_data(config(tmp_path / "clean", [path], "--data.shard_size=700"), tiny_tokenizer)
    assert output_files(out) == output_files(tmp_path / "clean")


# --------------------------------------------------------------------------- a source of few documents


BOOK = "\n\n".join(f"CHAPTER {i}.\n" + "\n".join(random.Random(i).sample(SENTENCES, 4)) for i in range(40))


def test_a_single_document_holds_out_its_tail(tmp_path, tiny_tokenizer, tokenizer, capsys):
    """A plain book (no separator: one document) with the defaults: its last ~10%, from a paragraph on, is validation."""
    (tmp_path / "book.txt").write_text(BOOK + "\n", encoding="utf-8")
    meta = prepare_data(config(tmp_path / "out", [tmp_path / "book.txt"]), tiny_tokenizer, progress=True)
    (head,), (tail,) = shard_docs(tmp_path / "out", "train", tokenizer), shard_docs(tmp_path / "out", "val", tokenizer)
    assert BOOK.startswith(head + "\n\n") and BOOK.endswith("\n\n" + tail)  # cut where a paragraph starts
    assert tail.startswith("CHAPTER") and 0.1 <= len(tail) / len(BOOK) <= 0.15
    assert meta["sources"][0]["val_split"] == "tail" and meta["splits"]["val"]["documents"] == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "too few" in line]
    assert len(said) == 1 and "book.txt: 1 document, too few" in said[0] and "last 10% of its text" in said[0]


def test_few_documents_hold_out_each_tail_and_many_are_drawn(tmp_path, tiny_tokenizer, tokenizer):
    """Three chapters (too few to draw from) beside 300 stories (drawn by hash); a weight repeats the heads only."""
    chapters = BOOK.split("\n\nCHAPTER 1")[:3]  # chapters 0, 10-19, 1.. : three long documents
    (tmp_path / "book.txt").write_text("".join(f"{c}\n<|endoftext|>\n" for c in chapters), encoding="utf-8")
    docs = write_corpus(tmp_path / "stories.txt", 300)
    meta = prepare_data(config(tmp_path / "out", [{"path": str(tmp_path / "book.txt"), "weight": 2}, tmp_path / "stories.txt"]),
                        tiny_tokenizer)
    assert [s["val_split"] for s in meta["sources"]] == ["tail", "documents"]
    book = meta["sources"][0]
    assert book["val"]["documents"] == 3 and book["train"]["documents"] == 6  # three heads, read twice
    val = shard_docs(tmp_path / "out", "val", tokenizer)
    assert all(any(c.endswith(v) for c in chapters) for v in val[:3])
    assert 0 < len(val[3:]) < 300 and set(val[3:]) <= set(docs)


# --------------------------------------------------------------------------- bad input


def test_empty_validation_split_is_one_clear_error(tmp_path, tiny_tokenizer):
    write_corpus(tmp_path / "c.txt", 5)
    out = tmp_path / "out"
    with pytest.raises(GptlabError) as e:
        prepare_data(config(out, [tmp_path / "c.txt"], "--data.val_fraction=0.001"), tiny_tokenizer)
    assert "validation split is empty: none of the 5 documents" in str(e.value) and "raise data.val_fraction" in str(e.value)
    assert not list(out.iterdir())  # nothing left that could be mistaken for output


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: (d / "c.txt").write_text("  \n\n"), "empty corpus"),
        (lambda d: None, "source path not found"),
        (lambda d: (d / "c.txt").write_bytes(b"ok\n\xff\xfe\x00bad"), "c.txt"),
    ],
)
def test_bad_corpus(tmp_path, tiny_tokenizer, setup, message):
    setup(tmp_path)
    with pytest.raises(GptlabError, match=message):
        prepare_data(config(tmp_path / "out", [tmp_path / "c.txt"]), tiny_tokenizer)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_arguments(tmp_path, corpus, tiny_tokenizer):
    path, _ = corpus
    with pytest.raises(GptlabError, match="no data sources"):
        prepare_data(load_config(None, []), tiny_tokenizer)
    with pytest.raises(GptlabError, match="tokenizer file not found"):
        prepare_data(config(tmp_path / "o", [path]), tmp_path / "missing.json")
    with pytest.raises(GptlabError, match="data.add_bos is set but the tokenizer .* has no BOS token"):
        prepare_data(config(tmp_path / "o", [path], "--data.add_bos=true"), tiny_tokenizer)
    with pytest.raises(GptlabError, match="shard_size"):
        prepare_data(config(tmp_path / "o", [path], f"--data.shard_size={2**31}"), tiny_tokenizer)


def test_shards_refuse_another_tokenizer(tiny_shards, tmp_path, tiny_corpus_text):
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    other = train_tokenizer([tiny_corpus_text], TokenizerConfig(vocab_size=300))
    check_tokenizer(tiny_shards, load_tokenizer(tiny_shards / "tokenizer.json"))
    with pytest.raises(GptlabError) as e:
        check_tokenizer(tiny_shards, other)
    assert "made with another tokenizer" in str(e.value) and "tokenizer.json" in str(e.value)


def test_tiny_shards_fixture(tiny_shards):
    meta = load_meta(tiny_shards)
    assert len(meta["splits"]["train"]["shards"]) >= 2 and meta["splits"]["val"]["tokens"] > 257
    x, y = BatchLoader(tiny_shards, batch_size=4, seq_len=64).next_batch()
    assert x.shape == y.shape == (4, 64)
