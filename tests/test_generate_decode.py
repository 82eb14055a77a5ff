"""The decode step: KVCache.step()'s fixed shapes give the eager path's logits; compiling changes no token."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.generate import sample_tokens
from gptlab.generate.decode import COMPILE_MIN_SECONDS, Decoder, worth_compiling
from gptlab.model import GPT, KVCache
from gptlab.model.gpt import written_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def model_of(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 4, "context_length": 32,
                         "init": "gpt2", "init_std": 0.1, **overrides})
    return GPT(cfg).eval()


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "MQA"])
def test_a_fixed_shape_step_gives_the_logits_of_a_full_forward(position, n_kv_head):
    model = model_of(position=position, n_kv_head=n_kv_head)
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    full, _ = model(x)
    cache = KVCache(batch_size=2, max_len=32)
    with torch.no_grad():
        prefill, _ = model(x[:, :7], cache=cache)
        steps = [model(x[:, t : t + 1], cache=cache.step())[0] for t in range(7, 20)]
    assert cache.length == 20 and cache.column.item() == 19 and cache.seen.tolist() == [[20], [20]]
    assert (torch.cat([prefill, *steps], dim=1) - full[:, 6:]).abs().max() < 1e-5


def test_steps_after_left_padding_and_after_a_rewind_see_only_real_tokens():
    model = model_of()
    short, long = [5, 9, 2], [7, 1, 3, 3, 8, 4]
    with torch.no_grad():
        cache = KVCache(2, 32)
        model(torch.tensor([[0, 0, 0] + short, long]), cache=cache, valid=torch.tensor([[False] * 3 + [True] * 3, [True] * 6]))
        stepped, _ = model(torch.tensor([[11], [12]]), cache=cache.step())
        assert (stepped[0, -1] - model(torch.tensor([short + [11]]))[0][0, -1]).abs().max() < 1e-5
        assert (stepped[1, -1] - model(torch.tensor([long + [12]]))[0][0, -1]).abs().max() < 1e-5
        # two more tokens, then rewound to before them (as HellaSwag scoring rewinds): a step forgets them
        model(torch.tensor([[20, 21], [22, 23]]), cache=cache)
        cache.length = 7
        again, _ = model(torch.tensor([[15], [16]]), cache=cache.step())
    assert (again[0, -1] - model(torch.tensor([short + [11, 15]]))[0][0, -1]).abs().max() < 1e-5
    assert (again[1, -1] - model(torch.tensor([long + [12, 16]]))[0][0, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("queries", [1, 10], ids=["decode", "training"])
def test_written_attention_is_the_fused_kernels(heads, kv_heads, queries):
    """The attention a compiled CPU step writes out (a decode step's one query; bf16 training, causal)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, t, 8, generator=g) for h, t in ((heads, queries), (kv_heads, 10), (kv_heads, 10)))
    grouped = kv_heads != heads
    if queries == 1:
        mask = torch.rand(3, 1, 1, 10, generator=g) > 0.4
        mask[:, ..., 0] = True  # every row sees a key
        fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
    else:
        mask, fused = None, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
    assert (written_attention(q, k, v, mask) - fused).abs().max() < 1e-5


def test_auto_compiles_only_long_generations():
    cpu = COMPILE_MIN_SECONDS["cpu"]
    assert not worth_compiling(0.001, 200, "cpu")  # a sample of 200 tokens at 1,000 tokens/s
    assert worth_compiling(0.001, int(cpu * 1000) + 1, "cpu")
    assert not worth_compiling(1.0, 10**6, "mps")  # nothing compiles there
    new, _ = sample_tokens(model_of(), [[1, 2, 3]], 20, temperature=0, stats=(stats := {}))
    assert stats["compile_seconds"] == 0.0 and len(new[0]) == 20


def test_compile_true_where_it_cannot_work_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("gptlab.generate.decode.can_compile", lambda device: False)
    with pytest.raises(GptlabError, match="compile=false"):
        Decoder(model_of(), greedy=True, compile=True)


@pytest.mark.slow
def test_a_compiled_decode_step_generates_the_eager_tokens():
    """torch.compile (inductor, g++) on a tiny model: ~10-60 s of compiling on a busy 2-core machine."""
    from gptlab.device import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    model = model_of(context_length=16)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 4]]  # left padded; 30 tokens run past the context (a restart)
    eager, eager_scores = sample_tokens(model, prompts, 30, temperature=0, compile=False)
    stats = {}
    compiled, scores = sample_tokens(model, prompts, 30, temperature=0, compile=True, stats=stats)
    assert compiled == eager and scores == pytest.approx(eager_scores, abs=1e-4)
    assert stats["compile_seconds"] > 0
    # sampled (not greedy): the compiled step hands back logits, the draw stays eager and seeded
    draws = [sample_tokens(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(7),
                           compile=c)[0] for c in (False, True)]
    assert draws[0] == draws[1]
