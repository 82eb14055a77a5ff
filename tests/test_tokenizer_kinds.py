"""Every tokenizer kind trains, saves, loads, encodes and decodes; special tokens; vocabulary limits."""

import itertools
import pickle

import pytest

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer import (
    KINDS,
    MAX_VOCAB,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

TEXT = "Once upon a time, Lily found a red ball.\nShe was very happy!  \"Vroom!\" said Ben."

# One small configuration per kind (the gpt2 folder comes from a fixture).
CONFIGS = {
    "bpe": dict(kind="bpe", vocab_size=320),
    "sentencepiece-bpe": dict(kind="sentencepiece", sp_model_type="bpe", vocab_size=320),
    "sentencepiece-unigram": dict(kind="sentencepiece", sp_model_type="unigram", vocab_size=320),
    "gpt2": dict(kind="gpt2"),
    "char": dict(kind="char"),
}


@pytest.fixture(scope="module")
def make(tiny_corpus_text, fake_gpt2_dir):
    """make(name, **overrides) -> a tokenizer trained on the whole tiny corpus (separator lines included)."""

    def make(name: str, **overrides) -> Tokenizer:
        cfg = {**CONFIGS[name], **overrides}
        if cfg["kind"] == "gpt2":
            cfg.setdefault("gpt2_dir", str(fake_gpt2_dir))
        return train_tokenizer([tiny_corpus_text], TokenizerConfig(**cfg))

    return make


@pytest.mark.parametrize("name", CONFIGS)
def test_train_save_load_encode_decode(make, tmp_path, name):
    tok = make(name)
    assert tok.kind == CONFIGS[name]["kind"]
    ids = tok.encode(TEXT)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "", "Ben"]) == [ids, [], tok.encode("Ben")]

    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert (loaded.kind, loaded.vocab_size, loaded.special_tokens) == (tok.kind, tok.vocab_size, tok.special_tokens)
    assert loaded.checksum == tok.checksum
    assert loaded.encode(TEXT) == ids
    assert loaded.decode(ids) == TEXT


@pytest.mark.parametrize("name", CONFIGS)
def test_pickles_for_worker_processes(make, name):
    tok = make(name)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXT) == tok.encode(TEXT)
    assert clone.checksum == tok.checksum


@pytest.mark.parametrize("name", CONFIGS)
def test_configured_special_tokens(make, name):
    tok = make(name, bos_token="<BEGIN>", eos_token="<END>", pad_token="<PAD>", extra_special_tokens=["<SEP>"])
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.token_to_id("<SEP>")]
    assert len(set(ids)) == 4 and all(0 <= i < tok.vocab_size for i in ids)
    assert dict(zip(["<BEGIN>", "<END>", "<PAD>", "<SEP>"], ids)).items() <= tok.special_tokens.items()
    assert tok.decode([tok.bos_id, *tok.encode("Ben"), tok.eos_id]) == "<BEGIN>Ben<END>"


def test_special_token_ids_per_kind(make):
    specials = dict(bos_token="<BEGIN>", eos_token="<END>", pad_token="<PAD>")
    assert [make("bpe", **specials).token_to_id(t) for t in ("<BEGIN>", "<END>", "<PAD>")] == [0, 1, 2]
    sp = make("sentencepiece-bpe", **specials)
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 3)  # 0 is <unk>, as in SentencePiece
    char = make("char", **specials)
    assert (char.bos_id, char.eos_id, char.pad_id) == (len(char.chars), len(char.chars) + 1, len(char.chars) + 2)
    gpt2 = make("gpt2", **specials)
    n = gpt2.vocab_size
    assert gpt2.token_to_id("<|endoftext|>") == n - 4  # GPT-2's own stays where it is; new ones follow
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (n - 3, n - 2, n - 1)
    assert list(gpt2.special_tokens) == ["<|endoftext|>", "<BEGIN>", "<END>", "<PAD>"]


def test_one_token_can_fill_several_roles(make):
    tok = make("bpe", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok.eos_id == tok.pad_id == 0
    assert tok.special_tokens == {"<|endoftext|>": 0}
    assert make("bpe", eos_token=None).eos_id is None


@pytest.mark.parametrize("name", CONFIGS)
def test_special_strings_in_text_are_ordinary_text(make, name):
    """A corpus containing "<|endoftext|>" must not inject an EOS id: the data stage places EOS itself."""
    tok = make(name)
    assert tok.eos_id is not None
    text = "the end<|endoftext|>Once"
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert len(ids) > len(tok.encode("the end")) + 1  # the marker costs several ordinary tokens
    assert tok.decode(ids) == text
    assert tok.eos_id not in itertools.chain.from_iterable(tok.encode_batch([text, text]))


def test_char_vocabulary_is_sorted_characters_then_specials(make, tiny_corpus_text):
    tok = make("char")
    chars = sorted(set(tiny_corpus_text))  # nanoGPT's shakespeare_char numbering
    assert tok.chars == chars
    assert tok.vocab_size == len(chars) + 1
    assert tok.encode(TEXT) == [chars.index(c) for c in TEXT]
    assert tok.eos_id == len(chars)


def test_char_unknown_character_is_named(make):
    tok = make("char")
    with pytest.raises(GptlabError, match=r"'€' \(U\+20AC\).*kind=bpe"):
        tok.encode("Ben paid a €")


def test_checksum_identifies_the_encoding(make, tmp_path):
    base = make("bpe")
    assert len(base.checksum) == 64 and base.checksum == make("bpe").checksum  # deterministic training
    others = [make("bpe", vocab_size=330), make("bpe", eos_token="<END>"), make("bpe", pad_token="<|endoftext|>"), make("char")]
    assert len({base.checksum, *(t.checksum for t in others)}) == 5


def test_bpe_vocab_size_limits(make):
    with pytest.raises(GptlabError, match=r"vocab_size=256 is too small.*at least 257 \(256 byte tokens \+ 1 special"):
        make("bpe", vocab_size=256)
    with pytest.raises(GptlabError, match="at least 259"):
        make("bpe", vocab_size=258, bos_token="<BEGIN>", pad_token="<PAD>")
    with pytest.raises(GptlabError, match=f"too large.*{MAX_VOCAB:,}"):
        make("bpe", vocab_size=MAX_VOCAB + 1)
    smallest = make("bpe", vocab_size=257)  # bytes only: still encodes anything
    assert smallest.vocab_size == 257
    assert smallest.decode(smallest.encode("€ λόγος 🙂")) == "€ λόγος 🙂"


def test_bpe_learns_up_to_the_requested_size(make):
    assert make("bpe", vocab_size=300).vocab_size == 300
    assert make("bpe", vocab_size=10_000).vocab_size < 10_000  # a tiny corpus runs out of pairs first


def test_sentencepiece_vocab_size_limits_name_what_works(make):
    with pytest.raises(GptlabError, match=r"too small.*use at least (\d+)") as err:
        make("sentencepiece-bpe", vocab_size=270)
    minimum = int(err.value.args[0].rsplit(" ", 1)[1])
    assert make("sentencepiece-bpe", vocab_size=minimum).vocab_size == minimum
    with pytest.raises(GptlabError, match=r"more than SentencePiece can learn.*use at most (\d+)") as err:
        make("sentencepiece-unigram", vocab_size=5000)
    maximum = int(err.value.args[0].split("at most ")[1].split(",")[0])
    assert make("sentencepiece-unigram", vocab_size=maximum).vocab_size == maximum


def test_sentencepiece_byte_fallback_instead_of_unk(make):
    tok = make("sentencepiece-unigram")
    text = "Ben ate 寿司 and said Ζεύς 🙂"  # characters the corpus never showed
    ids = tok.encode(text)
    assert tok.token_to_id("<unk>") == 0 and 0 not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("token", ["x", " ", ""])
def test_special_tokens_must_be_markers(make, token):
    with pytest.raises(GptlabError, match="special token"):
        make("bpe", pad_token=token)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gpt2"])
def test_empty_corpus(kind):
    with pytest.raises(GptlabError, match="corpus is empty"):
        train_tokenizer(["", ""], TokenizerConfig(kind=kind, vocab_size=300))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gpt2"])
def test_reader_errors_reach_the_caller_intact(kind, tiny_corpus_text):
    """The libraries consume documents in native code; a reader's GptlabError must still come out as itself."""

    def documents():
        yield tiny_corpus_text
        raise GptlabError("corpus.txt is not UTF-8 at byte 12")

    with pytest.raises(GptlabError, match="byte 12"):
        train_tokenizer(documents(), TokenizerConfig(kind=kind, vocab_size=300))


def test_training_reads_at_most_train_max_bytes(tiny_corpus_text):
    story = tiny_corpus_text[:1000]
    taken = []

    def documents():
        for i in range(100):
            taken.append(i)
            yield story

    train_tokenizer(documents(), TokenizerConfig(kind="bpe", vocab_size=300, train_max_bytes=3500))
    assert len(taken) == 4  # 4 x 1000 bytes reach the 3500-byte cap; the rest is never read


def test_gpt2_needs_local_files(tmp_path, fake_gpt2_dir):
    with pytest.raises(GptlabError, match="gpt2_dir is not set.*never downloaded"):
        train_tokenizer([], TokenizerConfig(kind="gpt2"))
    with pytest.raises(GptlabError, match="lacks encoder.json and vocab.bpe"):
        train_tokenizer([], TokenizerConfig(kind="gpt2", gpt2_dir=str(tmp_path / "nowhere")))
    (tmp_path / "encoder.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text((fake_gpt2_dir / "vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(GptlabError, match="cannot read GPT-2's tokenizer files"):
        train_tokenizer([], TokenizerConfig(kind="gpt2", gpt2_dir=str(tmp_path)))


def test_decode_rejects_ids_outside_the_vocabulary(make):
    tok = make("bpe")
    with pytest.raises(GptlabError, match=rf"token id {tok.vocab_size} is outside.*0\.\.{tok.vocab_size - 1}"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(GptlabError, match="token id -1"):
        tok.decode([-1])


def test_decode_accepts_arrays(make):
    import numpy as np
    import torch

    tok = make("bpe")
    ids = tok.encode(TEXT)
    assert tok.decode(np.array(ids, dtype=np.uint16)) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT


def test_vocabulary_out_of_merge_order_falls_back_to_tokenizers(tiny_tokenizer):
    """tiktoken is only exact when ids follow merge order; otherwise encoding goes through `tokenizers`."""
    import json

    from gptlab.tokenizer import tokenizer_from_json

    d = json.loads(tiny_tokenizer.read_text(encoding="utf-8"))
    vocab = d["model"]["vocab"]
    (a1, b1), (a2, b2) = d["model"]["merges"][-2:]
    vocab[a1 + b1], vocab[a2 + b2] = vocab[a2 + b2], vocab[a1 + b1]  # the last two merges swap ids
    tok = tokenizer_from_json(json.dumps(d))
    assert not tok.uses_tiktoken
    text = tok.decode([vocab[a1 + b1], vocab[a2 + b2]]) + " " + TEXT
    assert tok.encode(text) == tok.hf.encode(text).ids
    assert tok.encode_batch([text, TEXT]) == [tok.encode(text), tok.encode(TEXT)]
    assert tok.decode(tok.encode(text)) == text
    assert tok.checksum != load_tokenizer(tiny_tokenizer).checksum
