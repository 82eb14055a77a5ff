"""The CrossAttn part: attention from the sequence to a second one (memory). Shapes, what each position sees,
one-line errors, cached generation, and a toy copy task it solves and a model without it cannot."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

CROSS_BLOCK = "Norm->Attn->+->Norm->CrossAttn->+->Norm->MLP->+"
NO_CROSS_BLOCK = "Norm->Attn->+->Norm->MLP->+"
TINY = dict(vocab_size=64, n_layer=2, d_model=32, n_head=4, context_length=32, block=CROSS_BLOCK)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def inputs(B=2, T=12, S=10, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (B, T), generator=g), torch.randn(B, S, D, generator=g)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_shapes_and_loss(position):
    model = tiny(position=position)
    idx, memory = inputs()
    logits, _ = model(idx, memory=memory)
    assert logits.shape == (2, 12, 64)
    _, loss = model.train()(idx, torch.roll(idx, -1, 1), memory=memory)
    loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "cross_attn" in name)
    shared, _ = model.eval()(idx, memory=memory[:1])  # a batch-1 memory is read by every row
    torch.testing.assert_close(shared[0], model(idx[:1], memory=memory[:1])[0][0])


def test_causal_in_the_sequence_but_sees_all_the_memory():
    model = tiny()
    idx, memory = inputs()
    with torch.no_grad():
        logits, _ = model(idx, memory=memory)
        later = idx.clone()
        later[:, 7] = (later[:, 7] + 1) % 64
        torch.testing.assert_close(model(later, memory=memory)[0][:, :7], logits[:, :7])  # no peeking ahead
        for s in (0, 9):  # the first query already reads the memory's first and last positions
            changed = memory.clone()
            changed[:, s] += 1.0
            assert (model(idx, memory=changed)[0][:, 0] - logits[:, 0]).abs().max() > 1e-4


def test_cross_attention_alone_reads_the_memory():
    """Without the CrossAttn part, the memory changes nothing."""
    model = tiny(block=NO_CROSS_BLOCK)
    idx, memory = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(idx, memory=memory)[0], model(idx)[0])


@pytest.mark.parametrize(
    "memory, message",
    [
        (None, "has a CrossAttn part but was given no second sequence"),
        (torch.zeros(2, 10, 16), "memory has shape [2, 10, 16]; CrossAttn reads [batch, length, d_model] = [2, S, 32]"),
        (torch.zeros(3, 10, 32), "memory has shape [3, 10, 32]"),
        (torch.zeros(2, 40, 32), "memory of 40 positions is longer than model.context_length=32"),
    ],
)
def test_bad_memory_is_one_line(memory, message):
    model = tiny()
    idx, _ = inputs()
    with pytest.raises(GptlabError, match=message.replace("[", r"\[")) as e:
        model(idx, memory=memory)
    assert "\n" not in str(e.value)


def test_a_long_memory_is_fine_without_rope():
    model = tiny(position="learned")
    idx, _ = inputs()
    assert model(idx, memory=torch.randn(2, 100, 32))[0].shape == (2, 12, 64)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_cached_generation_equals_uncached(position):
    model = tiny(position=position, n_kv_head=2, qk_norm=True)
    idx, memory = inputs(T=12)
    with torch.no_grad():
        full, _ = model(idx, memory=memory)
        cache = KVCache(2, 32)
        steps = [model(idx[:, :5], cache=cache, memory=memory)[0]]  # prefill: the last prompt position's logits
        steps += [model(idx[:, t : t + 1], cache=cache.step(), memory=memory)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-4)


def test_cached_generation_of_left_padded_rows():
    """Rows of different lengths in one batch: each row's logits are those of the row alone."""
    model = tiny()
    idx, memory = inputs(T=8)
    short = idx[1, 3:]  # row 1 has 5 real tokens, left-padded to 8
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    with torch.no_grad():
        cache = KVCache(2, 32)
        batched = model(idx, cache=cache, valid=valid, memory=memory)[0]
        alone = [model(idx[:1], memory=memory[:1])[0][:, -1:], model(short[None], memory=memory[1:])[0][:, -1:]]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)


def copy_task_accuracy(block: str, steps: int = 300, V: int = 16, T: int = 8) -> float:
    """Train a 1-layer model to write out a random source sequence given only as memory (its own token
    embeddings of the source); return the held-out accuracy of predicting each source token."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V + 1, n_layer=1, d_model=32, n_head=2, context_length=T, block=block))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        source = torch.randint(1, V + 1, (n, T), generator=g)  # token 0 starts every target sequence
        idx = torch.cat((torch.zeros(n, 1, dtype=torch.long), source[:, :-1]), dim=1)  # teacher forcing
        return idx, source, model.tok_emb(source)

    model.train()
    for _ in range(steps):
        idx, source, memory = batch(32)
        _, loss = model(idx, source, memory=memory)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        idx, source, memory = batch(256)
        logits, _ = model(idx, memory=memory)
    return (logits.argmax(-1) == source).float().mean().item()


def test_toy_copy_task_needs_cross_attention():
    """Position t's target is source token t, which the sequence so far (the source's first t - 1 tokens,
    random) says nothing about: only reading the memory solves it. ~3 s on one core."""
    assert copy_task_accuracy(CROSS_BLOCK) > 0.97
    assert copy_task_accuracy(NO_CROSS_BLOCK) < 0.15  # chance: 1/16
