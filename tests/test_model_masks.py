"""Attention masks beyond causal: sliding windows, strided, your own function, local/global layer lists.

Each is causal and as local as it says; cached generation (prefill, decode steps, a window layer's ring,
compiled steps, the serving engine, HellaSwag's rewinds) gives the logits of a full forward pass.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import read_metrics

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.generate import sample_tokens
from gptlab.model import GPT, KVCache
from gptlab.model.masks import layer_rules

pytestmark = pytest.mark.usefixtures("single_thread")

WINDOW = 4
SINK = "sink_mask:sink_and_window"  # written to tmp_path by the `sink_module` fixture
MASKS = ["window", "strided", SINK, ["window", "window", "causal"]]
MASK_IDS = ["window", "strided", "user", "local-global"]


@pytest.fixture(autouse=True)
def sink_module(tmp_path, monkeypatch):
    """A user mask function in a module of its own on sys.path: an attention sink (the first token) + a window."""
    (tmp_path / "sink_mask.py").write_text(
        "def sink_and_window(q, k):\n"
        f"    return (k == 0) | (q - k < {WINDOW})\n"
        "def returns_int(q, k):  # not a mask: positions, not bools\n"
        "    return q - k\n"
        "WINDOW_TEXT = 'four'  # not a function\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sink_mask", raising=False)


def model_of(mask, n_layer: int = 3, **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 64, "n_layer": n_layer, "d_model": 32, "n_head": 4, "n_kv_head": 2,
                         "context_length": 48, "init_std": 0.2, "mask": mask, "window": WINDOW, **overrides})
    return GPT(cfg).eval()


def tokens(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the rules


def test_a_list_cycles_over_the_layers():
    rules = layer_rules(["window", "window", "causal"], WINDOW, 7)
    assert [r.name for r in rules] == ["window 4", "window 4", "causal"] * 2 + ["window 4"]
    assert [r.span for r in rules[:3]] == [WINDOW, WINDOW, None]


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_shapes_and_causality(mask):
    model = model_of(mask)
    x = tokens(2, 20)
    with torch.no_grad():
        logits, _ = model(x)
        assert logits.shape == (2, 20, 64)
        _, loss = model(x, targets=x)
        assert loss.ndim == 0 and torch.isfinite(loss)
        t = 9
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        after, _ = model(changed)
    assert torch.equal(after[:, :t], logits[:, :t])  # no position before t sees token t
    assert not torch.allclose(after[:, t], logits[:, t])  # token t itself matters


def positions_that_see(mask, t: int, T: int = 24) -> set[int]:
    """The positions whose logits change when token t changes, in a 1-layer model: what attention lets see it."""
    model = model_of(mask, n_layer=1)
    x = tokens(1, T, seed=1)
    changed = x.clone()
    changed[0, t] = (changed[0, t] + 1) % 64
    with torch.no_grad():
        diff = (model(changed)[0] - model(x)[0]).abs().amax(dim=-1)[0]
    return {p for p in range(T) if diff[p] > 1e-6}


def test_each_rule_sees_what_it_says():
    t = 5
    assert positions_that_see("causal", t) == set(range(t, 24))
    assert positions_that_see("window", t) == set(range(t, t + WINDOW))  # then it is out of the window
    strided = set(range(t, t + WINDOW)) | set(range(t, 24, WINDOW))  # + every 4th position after it
    assert positions_that_see("strided", t) == strided
    assert positions_that_see(SINK, t) == set(range(t, t + WINDOW))
    assert positions_that_see(SINK, 0) == set(range(24))  # the sink: every position sees token 0


# --------------------------------------------------------------------------- training


def test_a_window_model_trains_from_the_command_line(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(tiny_shards), "--run", str(run), "--model.mask=window",
                 "--model.window=8", "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2",
                 "--model.context_length=32", "--train.batch_size=4", "--train.max_steps=40", "--train.eval_every=40",
                 "--train.lr=3e-3", "--train.warmup_steps=2", "--train.precision=fp32", "--train.compile=false",
                 "--train.threads=1", "--train.peak_flops=1e11"]) == 0
    rows = read_metrics(run)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(400) = 6 it learns
    from gptlab.runs import load_run

    model, _, _ = load_run(run, "last")
    assert model.cfg.mask == "window" and model.cfg.window == 8


# --------------------------------------------------------------------------- the KV cache


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], valid[i, width - len(r) :] = r, True
    return ids, valid


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_cached_prefill_and_steps_give_the_full_forward_logits(mask):
    """Left-padded rows of 17, 11 and 6 tokens: prefilled in two passes (the second reads the ring), then
    14 decode steps, past the window and the ring many times; each row's logits are its own full pass's."""
    model = model_of(mask)
    prompts = [tokens(n, seed=n) for n in (17, 11, 6)]
    ids, valid = left_padded(prompts)
    more = tokens(3, 14, seed=99)
    cache = KVCache(3, 40)
    with torch.no_grad():
        model(ids[:, :9], cache=cache, valid=valid[:, :9])
        got = [model(ids[:, 9:], cache=cache, valid=valid[:, 9:])[0]]
        for t in range(more.size(1) - 1):
            got.append(model(more[:, t : t + 1], cache=cache.step())[0])
        got = torch.cat(got, dim=1)  # [3, 14, V]: the prompt's last logits, then each step's
        for i, prompt in enumerate(prompts):
            full, _ = model(torch.cat([prompt, more[i, :-1]])[None])
            torch.testing.assert_close(got[i], full[0, len(prompt) - 1 :], atol=2e-5, rtol=0)


def test_a_window_layer_keeps_only_its_window():
    """The keys and values of a window layer fill `window` columns (+ slack), a causal layer's the whole cache."""
    model = model_of(["window", "window", "causal"])
    cache = KVCache(2, 40)
    with torch.no_grad():
        model(tokens(2, 10), cache=cache)
        for t in range(20):
            model(tokens(2, 1, seed=t), cache=cache.step())
    assert sorted(cache.rings) == [(0, "attn"), (1, "attn")] and sorted(cache.keys) == [(2, "attn")]
    for ring in cache.rings.values():
        assert ring.keys.shape == ring.values.shape == (2, 2, WINDOW, 8)  # [B, K, window, C]
    assert cache.keys[(2, "attn")].shape == (2, 2, 41, 8)  # max_len + 1
    slack = KVCache(2, 40, slack=5)
    with torch.no_grad():
        model(tokens(2, 10), cache=slack)
    assert slack.rings[(0, "attn")].keys.shape[2] == WINDOW + 5
    # a ring as long as the cache would save nothing: then the layer keeps every column
    short = KVCache(2, WINDOW + 1, slack=1)
    with torch.no_grad():
        model(tokens(2, 3), cache=short)
    assert not short.rings and short.keys[(0, "attn")].shape[2] == WINDOW + 2


def test_rewinding_within_the_slack_forgets_the_rewound_tokens_and_past_it_is_an_error():
    model = model_of("window")
    context, ending, other = tokens(1, 12), tokens(1, 5, seed=1), tokens(1, 3, seed=2)
    cache = KVCache(1, 40, slack=5)
    with torch.no_grad():
        model(context, cache=cache)
        model(ending, cache=cache)
        cache.length = 12  # back to the end of the context, as HellaSwag does between endings
        got, _ = model(other, cache=cache)
        want, _ = model(torch.cat([context, other], dim=1))
        torch.testing.assert_close(got[0, -1], want[0, -1], atol=2e-5, rtol=0)
        cache.length = 13  # and a decode step after a rewind: the ring's later (forgotten) columns stay unseen
        got, _ = model(ending[:, :1], cache=cache.step())
        want, _ = model(torch.cat([context, other[:, :1], ending[:, :1]], dim=1))
    torch.testing.assert_close(got[0, -1], want[0, -1], atol=2e-5, rtol=0)
    tight = KVCache(1, 40)  # ring of WINDOW columns: 5 tokens written past column 12 overwrote its window
    with torch.no_grad():
        model(context, cache=tight)
        model(ending, cache=tight)
    with pytest.raises(ValueError, match="slack"):
        tight.length = 12


@pytest.mark.parametrize("mask", ["window", ["window", "causal"]], ids=["window", "local-global"])
def test_generation_past_the_window_and_the_ring_is_the_uncached_one(mask):
    """Greedy tokens of sample_tokens (prefill + ring decode steps) == a loop of full forward passes."""
    model = model_of(mask, position="rope")
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 11, 30, 2]]
    new, _ = sample_tokens(model, prompts, 30, temperature=0, compile=False)
    for prompt, got in zip(prompts, new):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(30):
                seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        assert got == seq[len(prompt) :]


def test_a_window_model_generates_past_its_context_as_if_it_had_none():
    """RoPE and only window layers: the last logits depend on the last n_layer * (window - 1) + 1 tokens, so
    restarting from the last 3/4 of the context changes nothing: the same tokens as sliding full passes."""
    model = model_of("window", n_layer=2, position="rope", context_length=16)
    prompt = [5, 9, 2, 7]
    new, _ = sample_tokens(model, [prompt], 40, temperature=0, compile=False)  # 44 tokens: two restarts
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            seq.append(int(model(torch.tensor([seq[-16:]]))[0][0, -1].argmax()))
    assert new[0] == seq[len(prompt) :]


@pytest.mark.slow
def test_a_compiled_decode_step_with_rings_generates_the_eager_tokens():
    """torch.compile (inductor, g++): ~10-60 s of compiling on a busy 2-core machine."""
    from torch._dynamo.utils import counters

    from gptlab.device import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    model = model_of(["window", "causal"], n_layer=2, context_length=16)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4]]  # left padded; 30 tokens run past the context (a restart)
    eager, eager_scores = sample_tokens(model, prompts, 30, temperature=0, compile=False)
    graphs = counters["stats"]["unique_graphs"]
    compiled, scores = sample_tokens(model, prompts, 30, temperature=0, compile=True)
    assert compiled == eager and scores == pytest.approx(eager_scores, abs=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # traced once for every position, not once a position


# --------------------------------------------------------------------------- serving, evaluating


def test_the_serving_engine_gives_the_tokens_of_generate():
    from gptlab.serve import Engine, GenerationRequest

    model = model_of(["window", "causal"], position="rope")
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [3, 3, 3, 3, 40, 41]]
    engine = Engine(model, slots=2, max_queue=8)
    try:
        for prompt in prompts:
            served = engine.complete(GenerationRequest(prompt, max_tokens=20, temperature=0)).tokens
            assert served == sample_tokens(model, [prompt], 20, temperature=0, compile=False)[0][0], prompt
    finally:
        engine.close()


def test_hellaswag_scores_through_rings_are_the_full_passes(tiny_tokenizer, monkeypatch):
    """Contexts in a cache whose window layers are rings, each ending rewound away: the scores of one full
    pass per context + ending."""
    import gptlab.model
    from gptlab.evaluate import HellaSwagItem, score_hellaswag
    from gptlab.tokenizer import load_tokenizer

    class Mod64:  # the tiny tokenizer's ids folded into the model's 64 tokens
        bos_id, eos_id = None, 0

        def __init__(self):
            self.tokenizer = load_tokenizer(tiny_tokenizer)

        def encode(self, text):
            return [t % 64 for t in self.tokenizer.encode(text)]

    caches = []

    class Recorded(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(gptlab.model, "KVCache", Recorded)
    items = [HellaSwagItem(f"Tom and the dog {'and the cat ' * (i % 3)}{i}",
                           ("ran.", "sang a song by the tree.", "ate.", "was happy and laughed."), i % 4) for i in range(6)]
    model = model_of(["window", "causal"], context_length=32)
    shared = score_hellaswag(model, Mod64(), items, batch_size=3)
    flat = score_hellaswag(model, Mod64(), items, batch_size=3, share_context=False)
    np.testing.assert_allclose(shared["logprobs"], flat["logprobs"], rtol=1e-5, atol=1e-5)
    assert caches and all(cache.rings for cache in caches)  # the window layers did run in rings


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("setting,says", [
    ("--model.window=0", "model.window"),
    ("--model.mask=nonsense", "'nonsense' is not a mask"),
    ("--model.mask=[]", "empty list"),
    ("--model.mask=nomodule:fn", "cannot import"),
    ("--model.mask=sink_mask:missing", "cannot import"),
    ("--model.mask=sink_mask:WINDOW_TEXT", "not a function"),
    ("--model.mask=sink_mask:returns_int", "returned"),
])
def test_a_bad_mask_is_one_line_and_exit_2(setting, says, capsys):
    assert main(["model", "info", "tiny-1m", "--model.vocab_size=100", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_model_info_with_a_good_user_mask_works(capsys):
    assert main(["model", "info", "tiny-1m", "--model.vocab_size=100", f"--model.mask={SINK}"]) == 0


# --------------------------------------------------------------------------- export


def test_a_window_run_exports_as_mistral_and_is_refused_as_gguf(make_export_run, tmp_path, capsys):
    """MistralForCausalLM's sliding window is model.window: the same logits past the window, the same
    greedy tokens through transformers' cache; and back again on import. llama.cpp's llama has no window."""
    transformers = pytest.importorskip("transformers")
    from gptlab.export import export_hf, import_hf
    from gptlab.runs import load_run

    run = make_export_run("mistral", norm="rmsnorm", position="rope", mlp="swiglu", mask="window", window=5)
    out = tmp_path / "hf"
    assert export_hf(run, out)["architecture"] == "MistralForCausalLM"
    ours, _, _ = load_run(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens(1, 30, seed=5) % ours.cfg.vocab_size
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x)[0], theirs(x).logits
    assert ours_logits.std() > 0.5
    torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        generated = theirs.generate(x[:, :6], do_sample=False, max_new_tokens=20, attention_mask=torch.ones_like(x[:, :6]))
    assert sample_tokens(ours, [x[0, :6].tolist()], 20, temperature=0, compile=False)[0][0] == generated[0, 6:].tolist()

    import_hf(out, tmp_path / "imported")
    imported, _, _ = load_run(tmp_path / "imported")
    assert imported.cfg.mask == "window" and imported.cfg.window == 5
    capsys.readouterr()
    assert main(["export", str(run), "--gguf", str(tmp_path / "model.gguf")]) == 2
    err = capsys.readouterr().err
    assert "model.mask=window" in err and len(err.strip().splitlines()) == 1


def test_layers_with_the_same_mask_share_one_mask_a_training_pass(monkeypatch):
    """Rules are equal by name, so Context.mask_for builds each rule's T x T mask once a pass, not once a layer."""
    from gptlab.model import gpt

    model = GPT(ModelConfig(vocab_size=50, n_layer=3, d_model=32, n_head=2, mask=["window", "causal", "window"], window=4))
    rules = [block.attn.rule for block in model.blocks]
    assert rules[0] == rules[2] and hash(rules[0]) == hash(rules[2]) and rules[0] != rules[1]
    built = []
    real = gpt.rule_mask
    monkeypatch.setattr(gpt, "rule_mask", lambda *args: built.append(args[0]) or real(*args))
    model(torch.randint(0, 50, (2, 10)))
    assert len(built) == 1
