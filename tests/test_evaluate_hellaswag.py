"""HellaSwag: reading the file formats, and the completion scorer on items whose answer is known."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import OFFICIAL, PREPROCESSED, write_jsonl

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.evaluate import HellaSwagItem, load_hellaswag, score_hellaswag
from gptlab.evaluate.hellaswag import logits_at, preprocess
from gptlab.tokenizer import train_tokenizer


def test_reads_the_preprocessed_and_the_official_format(tmp_path):
    items = load_hellaswag(write_jsonl(tmp_path / "h.jsonl", [PREPROCESSED, "", OFFICIAL]))
    assert items[0] == HellaSwagItem("Roof shingle removal: A man is sitting on a roof. he", tuple(PREPROCESSED["endings"]), 3)
    # lm-eval's construction: ctx_a + " " + ctx_b capitalised, WikiHow markers removed, double spaces collapsed
    assert items[1].context == "Baking cookies: A woman is in a kitchen. She"
    assert items[1].endings == ("bakes a cake. Then eats it.", "mixes the dough.", "sings loudly.", "leaves.")
    assert items[1].label == 1
    assert preprocess("a [header] b  c [title] d") == "a b c. d"


def test_limit_takes_the_first_items(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [PREPROCESSED, OFFICIAL, PREPROCESSED])
    assert len(load_hellaswag(path, limit=2)) == 2


@pytest.mark.parametrize("bad", [
    "{not json",
    json.dumps({**PREPROCESSED, "label": 7}),
    json.dumps({**PREPROCESSED, "endings": ["only one"]}),
    json.dumps({k: v for k, v in PREPROCESSED.items() if k != "ctx"}),
])
def test_a_malformed_line_is_named(tmp_path, bad):
    path = write_jsonl(tmp_path / "h.jsonl", [PREPROCESSED, PREPROCESSED, bad])
    with pytest.raises(GptlabError, match=r"h\.jsonl:3: not a HellaSwag item") as e:
        load_hellaswag(path)
    assert "\n" not in str(e.value)


def test_missing_file_and_offline_hub_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(GptlabError, match="not found"):
        load_hellaswag(tmp_path / "nope.jsonl")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GptlabError, match="cannot load hf:Rowan/hellaswag .*local file") as e:
        load_hellaswag("hf:Rowan/hellaswag", limit=5)
    assert "\n" not in str(e.value)


def test_hf_records_are_read_like_the_official_file(monkeypatch):
    import datasets

    record = {**OFFICIAL, "label": "2"}  # the Hub stores labels as strings
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [record] * 3)
    items = load_hellaswag("hf:Rowan/hellaswag")
    assert len(items) == 3 and items[0].label == 2 and items[0].context.endswith("She")


def test_the_full_validation_set_loads(shared_data):
    items = load_hellaswag(shared_data / "hellaswag" / "hellaswag_val_preprocessed.jsonl")
    assert len(items) == 10042
    assert np.bincount([i.label for i in items]).tolist() == [2515, 2485, 2584, 2458]


# --------------------------------------------------------------------------- scoring


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next token depends on the current one only, as the test sets it."""

    def __init__(self, table: torch.Tensor, context_length: int = 64):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.cfg = SimpleNamespace(context_length=context_length, vocab_size=table.size(1))

    def forward(self, idx, targets=None):
        return self.table[idx], None


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["x ab"], TokenizerConfig(kind="char"))


@pytest.fixture(scope="module")
def bigram(tokenizer):
    """After any token: 'a' very likely, ' ' likely, 'b' very unlikely."""
    table = torch.zeros(tokenizer.vocab_size, tokenizer.vocab_size)
    a, b, space = (tokenizer.encode(c)[0] for c in "ab ")
    table[:, a], table[:, b], table[:, space] = 4.0, -4.0, 2.0
    return BigramLM(table).eval()


ENDINGS = ("b", "a", "bbb", "aaaaaaaa")  # by sum "a" wins; per character "aaaaaaaa" (the space's cost is shared)


def hand_logprob(model, tokenizer, ending: str) -> float:
    row = model.table[0].tolist()  # every row is the same
    log_z = math.log(sum(math.exp(v) for v in row))
    return sum(row[t] - log_z for t in tokenizer.encode(" " + ending))


def test_scorer_picks_the_answers_the_logits_were_built_for(bigram, tokenizer):
    items = [HellaSwagItem("x", ENDINGS, 1), HellaSwagItem("x x", ENDINGS, 1), HellaSwagItem("x", ENDINGS, 3)]
    result = score_hellaswag(bigram, tokenizer, items, batch_size=2)
    expected = [hand_logprob(bigram, tokenizer, e) for e in ENDINGS]
    assert result["logprobs"] == pytest.approx(np.array([expected] * 3), abs=1e-5)
    assert result["logprobs"].argmax(1).tolist() == [1, 1, 1]
    assert result["acc"] == pytest.approx(2 / 3)  # sums pick "a": right for the first two items
    assert result["acc_norm"] == pytest.approx(1 / 3)  # per character picks "aaaaaaaa": right for the last
    assert result["acc_per_token"] == pytest.approx(1 / 3)
    assert result["items"] == 3


class Mod64:
    """The tiny tokenizer's ids folded into a 64-token vocabulary (the tiny_model fixture's)."""

    bos_id, eos_id = None, 0

    def __init__(self, tokenizer_path):
        from gptlab.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)

    def encode(self, text):
        return [t % 64 for t in self.tokenizer.encode(text)]


STORY_ITEMS = [HellaSwagItem(f"Tom and the dog {'and the cat ' * (i % 3)}{i}",
                             ("ran.", "sang a song by the tree.", "ate.", "was happy and laughed."), i % 4) for i in range(9)]
STORY_ITEMS.append(HellaSwagItem("Tom and the dog " * 12, ("ran.", "sang.", "ate a red ball.", "was happy."), 0))  # > 32 tokens: cut


def test_same_scores_whatever_the_batch_size(tiny_model, tiny_tokenizer, single_thread):
    tokenizer = Mod64(tiny_tokenizer)
    results = [score_hellaswag(tiny_model, tokenizer, STORY_ITEMS, batch_size=bs)["logprobs"] for bs in (1, 4, 9)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [
    {},  # RoPE, pre-norm
    {"position": "learned", "block": "post", "n_kv_head": 1, "norm": "layernorm", "bias": True},
])
def test_shared_contexts_give_the_same_scores_as_one_row_per_ending(arch, tiny_model_config, tiny_tokenizer, single_thread):
    """Contexts in a KV cache continued by each ending == every context + ending run in full."""
    from gptlab.model import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config.model_copy(update=arch)).eval()
    tokenizer = Mod64(tiny_tokenizer)
    shared = score_hellaswag(model, tokenizer, STORY_ITEMS, batch_size=4)
    flat = score_hellaswag(model, tokenizer, STORY_ITEMS, batch_size=4, share_context=False)
    np.testing.assert_allclose(shared["logprobs"], flat["logprobs"], rtol=1e-5, atol=1e-5)
    assert shared["acc"] == flat["acc"] and shared["acc_norm"] == flat["acc_norm"]


def test_output_layer_only_where_needed_gives_the_same_logits(tiny_model):
    idx = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    select = torch.zeros(3, 10, dtype=torch.bool)
    select[0, 2:5] = select[2, 7:] = True
    with torch.no_grad():
        full = tiny_model(idx)[0][select]
        picked = logits_at(tiny_model, idx, select)
    assert picked.shape == (6, 64)
    torch.testing.assert_close(picked, full, rtol=1e-5, atol=1e-5)
    assert not tiny_model.lm_head._forward_pre_hooks  # the hook is gone afterwards


def test_long_contexts_are_cut_from_the_left(bigram, tokenizer):
    short = BigramLM(bigram.table.detach().clone(), context_length=6)
    items = [HellaSwagItem("x" * 50, ENDINGS, 1)]
    result = score_hellaswag(short, tokenizer, items)  # bigram: only the token before matters, so no change
    assert result["logprobs"][0, :2] == pytest.approx([hand_logprob(bigram, tokenizer, e) for e in ENDINGS[:2]], abs=1e-5)


@pytest.mark.parametrize("data", [{}, {"add_eos": False}], ids=["after-eos", "after-nothing"])
def test_contexts_start_as_sampled_prompts_do(data, tiny_model, tiny_tokenizer, single_thread):
    """Each ending's log-probability, by hand: the model on `gptlab sample`'s ids for the context
    (gptlab.generate.prompt_ids: after the run's start token) followed by the ending."""
    from gptlab.config import DataConfig
    from gptlab.generate import prompt_ids

    tokenizer, data = Mod64(tiny_tokenizer), DataConfig(**data)
    items = STORY_ITEMS[:3]
    scores = score_hellaswag(tiny_model, tokenizer, items, data=data)["logprobs"]
    for item, row in zip(items, scores):
        context = prompt_ids(tokenizer, item.context, data)
        for ending, score in zip(item.endings, row):
            ids = context + tokenizer.encode(" " + ending)
            with torch.no_grad():
                logprobs = torch.log_softmax(tiny_model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)
            n = len(ids) - len(context)
            by_hand = logprobs[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()
            assert score == pytest.approx(by_hand, abs=1e-4)
