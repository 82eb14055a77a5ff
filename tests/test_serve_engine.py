"""The continuous-batching engine: requests joining and leaving a running batch give what they give alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.generate import sample_tokens
from gptlab.model import GPT
from gptlab.model.cache import SlotCache
from gptlab.serve import DoneEvent, Engine, EngineBusy, GenerationRequest, TokenEvent


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, context_length=48, init_std=0.2, position="rope")
    return GPT(cfg).eval()


@pytest.fixture
def engine(model, single_thread):
    engine = Engine(model, slots=4, max_queue=8)
    yield engine
    engine.close()


def greedy_alone(model, prompt, n):
    new, _ = sample_tokens(model, [prompt], n, temperature=0)
    return new[0]


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_slot_cache_matches_the_full_forward(position):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, context_length=40, position=position)).eval()
    a, b = torch.randint(0, 50, (1, 12)), torch.randint(0, 50, (1, 5))
    cache = SlotCache(3, 40)
    with torch.no_grad():
        model(a[:, :9], cache=cache.rows([2]))  # slot 2: 9 tokens; slot 0: 5 tokens; then one more each at once
        model(b, cache=cache.rows([0]))
        both, _ = model(torch.tensor([[int(a[0, 9])], [7]]), cache=cache.rows([2, 0]))
        want_a, _ = model(a[:, :10])
        want_b, _ = model(torch.cat([b, torch.tensor([[7]])], dim=1))
    torch.testing.assert_close(both[0, -1], want_a[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, -1], want_b[0, -1], atol=1e-5, rtol=0)
    assert cache.lengths == [6, 0, 10]


def test_greedy_requests_joining_a_running_batch_give_what_they_give_alone(model, engine):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [3, 3, 3, 3], [40, 41], [7, 8, 9]]
    results, done = {}, threading.Event()
    lock = threading.Lock()

    def listener(i):
        def on_event(event):
            with lock:
                results.setdefault(i, []).append(event)
                if sum(isinstance(e[-1], DoneEvent) for e in results.values()) == len(prompts):
                    done.set()
        return on_event

    for i, p in enumerate(prompts):  # 6 requests on 4 slots, arriving while others run
        engine.submit(GenerationRequest(p, max_tokens=10 + i, temperature=0), listener(i))
        time.sleep(0.002)
    assert done.wait(30)
    for i, p in enumerate(prompts):
        tokens = [e.token for e in results[i] if isinstance(e, TokenEvent)]
        assert tokens == greedy_alone(model, p, 10 + i), i
        assert results[i][-1].reason == "length" and results[i][-1].completion_tokens == 10 + i
    assert engine.stats.steps > 0 and engine.stats.batched_tokens / engine.stats.steps > 1  # they shared passes


def test_prompts_arriving_together_share_prefill_passes(model, single_thread):
    engine = Engine(model, slots=8)
    try:
        prompts = [[1, 2, 3], [4, 5, 6], [7] * 9, [8, 9], [10] * 12, [11, 12, 13, 14], [15], [16, 17, 18]]
        events = [[] for _ in prompts]
        with engine.wake:  # hold the loop so that all of them are waiting when it looks
            for p, seen in zip(prompts, events):
                engine.submit(GenerationRequest(p, max_tokens=6, temperature=0), seen.append)
        deadline = time.monotonic() + 30
        while not all(seen and isinstance(seen[-1], DoneEvent) for seen in events) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.prefills == 1  # 8 prompts of 1 to 12 tokens: one pass, left-padded
        for p, seen in zip(prompts, events):
            assert [e.token for e in seen if isinstance(e, TokenEvent)] == greedy_alone(model, p, 6), p
    finally:
        engine.close()


def test_seeded_sampling_does_not_depend_on_the_batch(model, engine):
    request = GenerationRequest([4, 5, 6], max_tokens=12, temperature=1.0, top_k=20, seed=7)
    alone = engine.complete(request).tokens
    others = [engine.submit(GenerationRequest([i + 1] * 3, max_tokens=30, temperature=1.0), lambda e: None) for i in range(3)]
    assert engine.complete(request).tokens == alone
    for h in others:
        h.cancel()
    assert engine.complete(GenerationRequest([4, 5, 6], max_tokens=12, temperature=1.0, top_k=20, seed=8)).tokens != alone


def test_stop_tokens_logprobs_and_alternatives(model, engine):
    greedy = greedy_alone(model, [1, 2, 3], 8)
    result = engine.complete(GenerationRequest([1, 2, 3], max_tokens=8, temperature=0, top_logprobs=3,
                                               stop_ids=frozenset({greedy[4]})))
    assert result.done.reason == "stop" and result.tokens == greedy[: greedy.index(greedy[4])]
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    want = torch.log_softmax(logits[0, -1].float(), -1)
    assert result.logprobs[0] == pytest.approx(want[greedy[0]].item(), abs=1e-5)
    assert [t for t, _ in result.top[0]] == torch.topk(want, 3).indices.tolist()
    assert result.top[0][0][0] == result.tokens[0]  # greedy: the chosen token is the most likely one


def test_a_request_ends_at_the_end_of_the_context(model, engine):
    result = engine.complete(GenerationRequest(list(range(1, 41)), max_tokens=100, temperature=0))
    assert result.done.reason == "length" and len(result.tokens) == 48 - 40 + 1


def test_the_prompt_cache_reuses_a_slot_that_holds_the_start_of_the_prompt(model, engine):
    first = engine.complete(GenerationRequest([9, 8, 7, 6, 5], max_tokens=4, temperature=0))
    longer = [9, 8, 7, 6, 5] + first.tokens[:3] + [11]
    result = engine.complete(GenerationRequest(longer, max_tokens=5, temperature=0))
    assert result.done.cached_tokens == 8 and result.tokens == greedy_alone(model, longer, 5)
    assert engine.complete(GenerationRequest([9, 8, 7, 6, 5], max_tokens=4, temperature=0)).tokens == first.tokens


def test_cancelled_and_timed_out_requests_free_their_slots(single_thread):
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, context_length=100_000, position="rope")).eval()
    engine = Engine(model, slots=1, max_queue=2, queue_timeout=0.1)
    try:
        events = []
        running = engine.submit(GenerationRequest([1, 2], max_tokens=10_000, temperature=1.0), events.append)
        time.sleep(0.05)
        late = engine.complete(GenerationRequest([3], max_tokens=2), timeout=5)  # the one slot is taken
        assert late.done.reason == "timeout" and late.done.error
        with pytest.raises(EngineBusy):
            for _ in range(3):
                engine.submit(GenerationRequest([3], max_tokens=2), lambda e: None)
        running.cancel()
        deadline = time.monotonic() + 5
        while not (events and isinstance(events[-1], DoneEvent)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events[-1].reason == "cancelled" and 0 < events[-1].completion_tokens < 10_000
        engine.queue_timeout = None
        assert engine.complete(GenerationRequest([3], max_tokens=2), timeout=5).done.reason == "length"
    finally:
        engine.close()


def test_bad_prompts_are_refused_before_they_reach_the_model(engine):
    for prompt in ([], [64], [-1], list(range(48))):
        with pytest.raises(ValueError):
            engine.submit(GenerationRequest(prompt), lambda e: None)


def test_a_listener_that_fails_ends_only_its_own_request(engine):
    def broken(event):
        raise RuntimeError("client gone")

    engine.submit(GenerationRequest([1, 2], max_tokens=50), broken)
    assert engine.complete(GenerationRequest([1, 2], max_tokens=5, temperature=0)).done.reason == "length"
