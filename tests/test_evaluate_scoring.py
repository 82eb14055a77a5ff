"""Bits per byte, loss and top-k accuracy: against a hand computation, and the same whatever the batch size."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gptlab.config import TokenizerConfig, load_config
from gptlab.errors import GptlabError
from gptlab.evaluate import evaluate_source, evaluate_split, evaluate_text, score_stream
from gptlab.evaluate.scoring import position_buckets
from gptlab.tokenizer import load_tokenizer, train_tokenizer

MULTIBYTE = "héllo wörld, ça coûte 5 € — naïve façade. " * 3  # 2- and 3-byte characters


class DesignedLM(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]] + position_bias[t]: every logit is chosen by the test."""

    def __init__(self, table: torch.Tensor, position_bias: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.position_bias = torch.nn.Parameter(position_bias)
        self.cfg = SimpleNamespace(context_length=position_bias.size(0), vocab_size=table.size(1))

    def forward(self, idx, targets=None):
        return self.table[idx] + self.position_bias[: idx.size(1)], None


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer([MULTIBYTE], TokenizerConfig(kind="char"))


@pytest.fixture(scope="module")
def designed_model(char_tokenizer):
    V, T = char_tokenizer.vocab_size, 8
    g = torch.Generator().manual_seed(0)
    return DesignedLM(torch.randn(V, V, generator=g) * 2, torch.randn(T, V, generator=g)).eval()


def hand_score(model, stream: list[int], T: int, ks=(1, 5, 10)):
    """NLL and top-k hits of every target, computed one position at a time with plain Python."""
    table, bias = model.table.tolist(), model.position_bias.tolist()
    nll, hits = 0.0, {k: 0 for k in ks}
    for i in range(1, len(stream)):
        position = (i - 1) % T  # where target i sits in its window
        logits = [a + b for a, b in zip(table[stream[i - 1]], bias[position])]
        nll -= log_softmax(logits)[stream[i]]
        rank = sum(v > logits[stream[i]] for v in logits)  # tokens scored strictly higher
        for k in ks:
            hits[k] += rank < k
    return nll, hits


def test_bits_per_byte_matches_a_hand_computation_on_multibyte_text(char_tokenizer, designed_model):
    T = designed_model.cfg.context_length
    ids = char_tokenizer.encode(MULTIBYTE)
    stream = [char_tokenizer.eos_id] + ids  # the first character is predicted after EOS
    nll, hits = hand_score(designed_model, stream, T)
    num_bytes = len(MULTIBYTE.encode("utf-8"))
    assert num_bytes > len(MULTIBYTE)  # really multi-byte: bytes, not characters, are the unit

    result = evaluate_text(designed_model, char_tokenizer, MULTIBYTE, batch_size=3)

    assert result["tokens"] == len(ids)  # every character predicted once
    assert result["bytes"] == num_bytes
    assert result["loss"] == pytest.approx(nll / len(ids), rel=1e-6)
    assert result["bpb"] == pytest.approx(nll / (math.log(2) * num_bytes), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-6)
    for k in (1, 5, 10):
        assert result["topk"][str(k)] == pytest.approx(hits[k] / len(ids))


def test_windows_are_consecutive_and_the_last_one_is_partial(char_tokenizer, designed_model):
    """12 tokens in windows of 8: positions 0-7 then 0-3; the position bias makes a wrong cut visible."""
    T = designed_model.cfg.context_length
    ids = char_tokenizer.encode(MULTIBYTE)[:11]
    stream = [char_tokenizer.eos_id] + ids
    nll, _ = hand_score(designed_model, stream, T)
    score = score_stream(designed_model, ids, char_tokenizer.eos_id, batch_size=1)
    assert score.tokens == 11
    assert score.nll == pytest.approx(nll, rel=1e-6)
    assert score.per_position.tolist() == [2, 2, 2, 1, 1, 1, 1, 1]


def test_text_starting_with_bos_is_not_given_a_second_start(designed_model):
    ids = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    with_start = score_stream(designed_model, ids, start_id=3)  # ids[0] is the start token already
    assert with_start.tokens == len(ids) - 1
    nll, _ = hand_score(designed_model, ids, designed_model.cfg.context_length)
    assert with_start.nll == pytest.approx(nll, rel=1e-6)


def test_top_k_by_context_buckets_cover_every_token(char_tokenizer, designed_model):
    result = evaluate_text(designed_model, char_tokenizer, MULTIBYTE)
    rows = result["topk_by_context"]
    assert [r["context"] for r in rows] == ["1", "2", "3-4", "5-8"]
    assert sum(r["tokens"] for r in rows) == result["tokens"]
    overall = sum(r["top1"] * r["tokens"] for r in rows) / result["tokens"]
    assert overall == pytest.approx(result["topk"]["1"])
    assert position_buckets(256)[-1] == (129, 256)
    assert position_buckets(5) == [(1, 1), (2, 2), (3, 4), (5, 5)]


def test_empty_or_shorter_than_one_window_is_an_error(char_tokenizer, designed_model):
    with pytest.raises(GptlabError, match="empty"):
        evaluate_text(designed_model, char_tokenizer, "")
    with pytest.raises(GptlabError, match="fewer than one window"):
        evaluate_text(designed_model, char_tokenizer, "héllo", name="short.txt")


# --------------------------------------------------------------------------- a real GPT


@pytest.fixture(scope="module")
def gpt_and_tokenizer(tiny_tokenizer):
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    tokenizer = load_tokenizer(tiny_tokenizer)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, d_model=32, n_head=2, context_length=16)).eval()
    return model, tokenizer


def test_same_numbers_whatever_the_batch_size(gpt_and_tokenizer, tiny_shards, tiny_corpus, single_thread):
    model, tokenizer = gpt_and_tokenizer
    for evaluate in (lambda bs: evaluate_split(model, tokenizer, tiny_shards, batch_size=bs),
                     lambda bs: evaluate_source(model, tokenizer, str(tiny_corpus), batch_size=bs, max_tokens=600)):
        results = [evaluate(bs) for bs in (1, 5, 64)]
        for r in results[1:]:
            assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
            assert r["bpb"] == pytest.approx(results[0]["bpb"], rel=1e-6)
            assert r["topk"] == results[0]["topk"]
            assert r["tokens"] == results[0]["tokens"]


def test_a_file_scores_the_same_as_the_same_file_prepared_as_a_split(gpt_and_tokenizer, tiny_corpus, tiny_tokenizer, tmp_path, single_thread):
    """Documents, EOS after each, their bytes: the text path and meta.json count the same things."""
    from gptlab.data import prepare_data

    model, tokenizer = gpt_and_tokenizer
    cfg = load_config(None, [f"--data.sources=[{{path = {str(tiny_corpus)!r}}}]",
                             f"--data.val_sources=[{{path = {str(tiny_corpus)!r}}}]",
                             f"--data.out_dir={str(tmp_path / 'data')!r}", "--data.workers=1"])
    prepare_data(cfg, tiny_tokenizer, progress=False)
    from_split = evaluate_split(model, tokenizer, tmp_path / "data", "val")
    from_file = evaluate_source(model, tokenizer, str(tiny_corpus))
    assert from_file["bytes"] == from_split["bytes"] == len(tiny_corpus.read_text().replace("<|endoftext|>", "").replace("\n", "").encode())
    assert from_file["tokens"] == from_split["tokens"]
    assert from_file["bpb"] == pytest.approx(from_split["bpb"], rel=1e-6)


def test_a_prefix_of_a_split_estimates_its_bytes(gpt_and_tokenizer, tiny_shards):
    model, tokenizer = gpt_and_tokenizer
    whole = evaluate_split(model, tokenizer, tiny_shards)
    part = evaluate_split(model, tokenizer, tiny_shards, max_tokens=100)
    assert part["tokens"] == 100 and part["bytes_estimated"] and not whole["bytes_estimated"]
    assert part["bytes"] == round(whole["bytes"] * 100 / whole["tokens"])


def test_a_split_made_with_another_tokenizer_is_refused(gpt_and_tokenizer, tiny_shards, char_tokenizer):
    model, _ = gpt_and_tokenizer
    with pytest.raises(GptlabError, match="another tokenizer"):
        evaluate_split(model, char_tokenizer, tiny_shards)


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_split_and_a_file_are_scored_after_the_runs_start_token(tiny_corpus, tiny_corpus_text, tmp_path, add_bos, single_thread):
    """A tokenizer with a BOS that the data did not put before documents: the text starts after EOS, as a
    sampled prompt does (gptlab.generate.start_id), not after the unused BOS."""
    from gptlab.config import DataConfig, ModelConfig
    from gptlab.data import prepare_data
    from gptlab.data.loader import TokenSplit
    from gptlab.generate import start_id
    from gptlab.model import GPT

    tokenizer = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="bpe", vocab_size=300, bos_token="<s>"))
    tokenizer.save(tmp_path / "tok.json")
    cfg = load_config(None, [f"--data.sources=[{{path = {str(tiny_corpus)!r}}}]",
                             f"--data.val_sources=[{{path = {str(tiny_corpus)!r}}}]", f"--data.add_bos={str(add_bos).lower()}",
                             f"--data.out_dir={str(tmp_path / 'data')!r}", "--data.workers=1"])
    prepare_data(cfg, tmp_path / "tok.json", progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=2, context_length=16)).eval()
    start = start_id(tokenizer, DataConfig(add_bos=add_bos))
    assert start == (tokenizer.bos_id if add_bos else tokenizer.eos_id)

    ids = TokenSplit(tmp_path / "data", "val").read(0, 200)
    expected = score_stream(model, ids, start).loss
    assert evaluate_split(model, tokenizer, tmp_path / "data", "val", max_tokens=200)["loss"] == pytest.approx(expected, rel=1e-6)
    from_file = evaluate_source(model, tokenizer, str(tiny_corpus), add_bos=add_bos)
    assert from_file["loss"] == pytest.approx(evaluate_split(model, tokenizer, tmp_path / "data", "val")["loss"], rel=1e-6)
    text = "Once upon a time there was a little cat named Tom. Tom liked to play in the sun."
    assert evaluate_text(model, tokenizer, text, data=cfg.data)["loss"] == pytest.approx(
        score_stream(model, tokenizer.encode(text), start).loss, rel=1e-6)
