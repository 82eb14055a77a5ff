"""Sampling: the KV cache is exact, batching changes nothing, filters and seeds and EOS do what they say."""

import math

import pytest
import torch

from gptlab.config import DataConfig, ModelConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate import (
    filter_logits,
    generate,
    next_token,
    prompt_ids,
    sample_tokens,
    start_id,
)
from gptlab.model import GPT, KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHABET = "\0\nabcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\"-:;"  # 64 symbols, EOS first


class CharTokenizer:
    """The tokenizer interface generate() needs, one character per token."""

    vocab_size = len(ALPHABET)
    bos_id = None
    eos_id = 0

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


def model_of(**overrides) -> GPT:
    torch.manual_seed(0)
    # PyTorch's default init, untied: peaked next-token distributions that differ from token to token
    cfg = ModelConfig(**{"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 4, "context_length": 32,
                         "init": "pytorch", "tie_embeddings": False, **overrides})
    return GPT(cfg).eval()


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_kv_cache_gives_the_logits_of_a_full_forward(position, n_kv_head):
    for attention, placement in [("sdpa", "pre"), ("plain", "post")]:
        # logits of order 1 (init_std 0.1): fp32 rounding stays far below the 1e-5 a position bug would exceed
        model = model_of(position=position, n_kv_head=n_kv_head, attention=attention, block=placement,
                         qk_norm=True, init="gpt2", init_std=0.1)
        x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
        full, _ = model(x)
        cache = KVCache(batch_size=2, max_len=32)
        prefill, _ = model(x[:, :7], cache=cache)  # a prompt, then one token at a time
        steps = [prefill] + [model(x[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
        assert (torch.cat(steps, dim=1) - full[:, 6:]).abs().max() < 1e-5


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_left_padded_rows_get_their_own_positions(position):
    model = model_of(position=position, init="gpt2", init_std=0.1)
    short, long = [5, 9, 2], [7, 1, 3, 3, 8, 4]
    alone = model(torch.tensor([short]))[0][0, -1]
    padded = torch.tensor([[0, 0, 0] + short, long])
    valid = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    batched, _ = model(padded, cache=KVCache(2, 32), valid=valid)
    assert (batched[0, -1] - alone).abs().max() < 1e-5
    assert (batched[1, -1] - model(torch.tensor([long]))[0][0, -1]).abs().max() < 1e-5


def test_top_k_and_top_p_on_constructed_logits():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    kept = lambda out: (out > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, False, True], [True] * 4]  # ties are kept
    # nucleus: the smallest set of most probable tokens whose probability reaches p
    assert kept(filter_logits(logits, top_p=0.8))[0] == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.81))[0] == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.1))[0] == [False, True, False, False]  # the top token always stays
    assert kept(filter_logits(logits, top_p=0.6))[1].count(True) == 3
    assert kept(filter_logits(logits, top_k=3, top_p=0.9))[0] == [False, True, True, True]
    assert torch.equal(filter_logits(logits), logits)


def test_next_token_draws_only_from_the_filtered_set():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, 0.0, None, 1.0).unique().tolist() == [1]
    drawn = next_token(logits, 1.0, 2, 1.0, g)
    assert set(drawn.tolist()) == {1, 3}
    share = (drawn == 1).float().mean().item()
    expected = math.exp(3.0) / (math.exp(3.0) + math.exp(2.5))
    assert abs(share - expected) < 0.07
    hot = next_token(logits, 100.0, None, 1.0, g)  # a high temperature flattens the distribution
    assert len(set(hot.tolist())) == 5


def test_batched_greedy_equals_one_prompt_at_a_time():
    model, tok = model_of(), CharTokenizer()
    prompts = ["Once", "a", "The dog and the", ""]
    cfg = SampleConfig(temperature=0, max_new_tokens=12, stop_at_eos=False)
    batched = generate(model, tok, prompts, cfg)
    alone = [generate(model, tok, [p], cfg)[0] for p in prompts]
    assert batched == alone
    assert len(set(batched)) == len(prompts)  # the prompts matter
    assert all(len(t) == 12 for t in batched)


def test_seed_makes_samples_reproducible():
    model, tok = model_of(), CharTokenizer()
    cfg = SampleConfig(temperature=1.0, max_new_tokens=20, num_samples=3, stop_at_eos=False, seed=7)
    first = generate(model, tok, ["Tom"], cfg)
    assert generate(model, tok, ["Tom"], cfg) == first
    assert len(first) == 3 and len(set(first)) == 3  # three different samples of one prompt
    assert generate(model, tok, ["Tom"], cfg.model_copy(update={"seed": 8})) != first


def test_each_row_stops_at_eos():
    model = model_of()
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8]]
    free, _ = sample_tokens(model, prompts, 15, temperature=0)
    eos = free[0][4]  # make the 5th token of row 0 the end of sequence
    stopped, _ = sample_tokens(model, prompts, 15, temperature=0, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    cut = free[1].index(eos) if eos in free[1] else 15
    assert stopped[1] == free[1][:cut]  # the other row is not stopped by row 0


def test_generation_runs_past_the_context_and_rejects_a_prompt_longer_than_it():
    model, tok = model_of(), CharTokenizer()
    text = generate(model, tok, ["abc"], SampleConfig(temperature=0, max_new_tokens=50, stop_at_eos=False))[0]
    assert len(text) == 50  # context is 32: it slides on
    with pytest.raises(GptlabError, match="does not fit model.context_length=32"):
        generate(model, tok, ["x" * 33], SampleConfig(max_new_tokens=5))


def test_streaming_delivers_exactly_the_returned_text():
    model, tok = model_of(), CharTokenizer()
    pieces = {}
    cfg = SampleConfig(temperature=1.0, max_new_tokens=16, num_samples=2)
    texts = generate(model, tok, ["Ben", "Sue had"], cfg, on_token=lambda i, t: pieces.setdefault(i, []).append(t))
    assert ["".join(pieces.get(i, [])) for i in range(4)] == texts


def test_best_of_returns_the_candidates_with_the_highest_mean_log_probability():
    model, tok = model_of(), CharTokenizer()
    cfg = SampleConfig(temperature=1.5, max_new_tokens=10, best_of=5, num_samples=2, stop_at_eos=False, seed=3)
    best = generate(model, tok, ["Lily"], cfg)
    # the same draws, made directly: 5 candidates of the prompt with the same seed
    ids = tok.encode("Lily")
    new, scores = sample_tokens(model, [ids] * 5, 10, temperature=1.5,
                                generator=torch.Generator().manual_seed(3))
    ranked = [tok.decode(new[j]) for j in sorted(range(5), key=lambda j: scores[j], reverse=True)]
    assert best == ranked[:2]
    assert len(set(ranked)) == 5  # five different candidates, so the ranking chose


def test_mean_log_probability_is_the_models():
    model = model_of()
    new, scores = sample_tokens(model, [[4, 5]], 3, temperature=0)
    seq = torch.tensor([[4, 5] + new[0]])
    logp = torch.log_softmax(model(seq)[0][0], dim=-1)
    expected = sum(logp[1 + i, t].item() for i, t in enumerate(new[0])) / 3
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_bad_inputs():
    model, tok = model_of(), CharTokenizer()
    wrong = model_of(vocab_size=80)
    with pytest.raises(GptlabError, match="model has 80 tokens but the tokenizer has 64"):
        generate(wrong, tok, ["a"], SampleConfig())

    class NoSpecials(CharTokenizer):
        eos_id = None

    with pytest.raises(GptlabError, match="prompt is empty"):
        generate(model, NoSpecials(), [""], SampleConfig(max_new_tokens=2))
    assert generate(model, tok, [], SampleConfig()) == []


class BosCharTokenizer(CharTokenizer):
    bos_id = 1  # "\n" stands in for a BOS token


# (the tokenizer, how `data prepare` wrote the documents, the id a prompt starts after)
START_RULES = [
    (CharTokenizer, {}, 0),  # the defaults: each document follows the EOS that ended the one before
    (CharTokenizer, {"add_bos": True}, 0),  # no BOS to add: still the EOS
    (CharTokenizer, {"add_eos": False}, None),  # nothing between documents
    (BosCharTokenizer, {}, 0),  # a BOS the data never used is not put before prompts
    (BosCharTokenizer, {"add_bos": True}, 1),
    (BosCharTokenizer, {"add_bos": True, "add_eos": False}, 1),
    (BosCharTokenizer, {"add_eos": False}, None),
]


@pytest.mark.parametrize("tokenizer,data,start", START_RULES)
def test_a_prompt_starts_after_the_token_every_training_document_followed(tokenizer, data, start):
    tok, data = tokenizer(), DataConfig(**data)
    assert start_id(tok, data) == start
    assert prompt_ids(tok, "Tom", data) == ([] if start is None else [start]) + tok.encode("Tom")
    model = model_of()
    cfg = SampleConfig(temperature=0, max_new_tokens=6, stop_at_eos=False)
    new, _ = sample_tokens(model, [prompt_ids(tok, "Tom", data)], 6, temperature=0)
    assert generate(model, tok, ["Tom"], cfg, data=data) == [tok.decode(new[0])]
    # an empty prompt: the start token, else (documents started after nothing) the BOS, else the EOS
    assert prompt_ids(tok, "", data) == [start if start is not None else tok.bos_id if tok.bos_id is not None else tok.eos_id]
