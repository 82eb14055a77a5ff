"""The configurable GPT: every part builds and learns, the two attention paths agree, bad shapes are one line."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig, load_config
from gptlab.errors import GptlabError
from gptlab.model import GPT, build_model, check_vocab, gpt
from gptlab.model.gpt import CosineNorm, RMSNorm, written_attention

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(vocab_size=64, n_layer=2, d_model=32, n_head=4, context_length=32)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def batch(B=2, T=16, V=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize(
    "parts",
    [
        {"norm": "layernorm", "block": "pre", "position": "learned", "mlp": "gelu", "bias": True},
        {"norm": "rmsnorm", "block": "post", "position": "sinusoidal", "mlp": "relu"},
        {"norm": "cosinenorm", "block": "sandwich", "position": "rope", "mlp": "swiglu", "n_kv_head": 1},
        {"norm": "rmsnorm", "norm_affine": False, "position": "none", "mlp": "geglu", "n_kv_head": 2, "qk_norm": True},
        {"mlp": "relu2", "tie_embeddings": False, "init": "pytorch", "dropout": 0.1},
        {"mlp": "silu", "init": "trunc_normal", "head_size": 16, "n_head": 4, "d_model": 40},
        # written blocks (model/blocks.py) with the parts beyond attention and MLP
        {"block": "Norm->Attn->+->Norm->KAN->+"},
        {"block": "Attn->+->Norm->=->KAN->+->Norm->=", "norm": "layernorm"},
        {"block": ["Norm->Attn->+", "Norm->KAN->+"]},
        {"block": "Norm->Attn->+->Norm->MoE->+", "moe_experts": 4, "moe_topk": 2, "mlp": "swiglu"},
        {"block": ["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"], "moe_experts": 2, "moe_topk": 1, "moe_shared": 1},
        {"mask": ["window", "causal"], "window": 4},
    ],
)
def test_every_part_builds_and_learns(parts):
    model = tiny(**parts).train()
    x, _ = batch()
    y = torch.roll(x, -1, dims=1)  # a pattern it can learn: the next token of a fixed sequence
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits, first = model(x, y, return_logits=True)
    assert logits.shape == (2, 16, 64)
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first.item()


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    model = tiny().eval()
    x, y = batch()
    y[0, :5] = -1
    logits, loss = model(x, y, return_logits=True)
    assert model(x, y)[0] is None and torch.equal(model(x, y)[1], loss)
    keep = y != -1
    expected = F.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert model(x)[1] is None


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_plain_attention_matches_sdpa(n_kv_head, position):
    fused = tiny(n_kv_head=n_kv_head, position=position, qk_norm=True).eval()
    plain = GPT(fused.cfg.model_copy(update={"attention": "plain"})).eval()
    plain.load_state_dict(fused.state_dict())
    x, y = batch(T=32)
    (a, loss_a), (b, loss_b) = fused(x, y, return_logits=True), plain(x, y, return_logits=True)
    assert (a - b).abs().max() < 1e-5
    assert abs(loss_a.item() - loss_b.item()) < 1e-5


@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_written_attention_in_causal_slices_is_the_fused_kernels(blocks):
    """The causal slices (each query slice against the keys up to its last position, the diagonal masked by an
    added -inf) give the fused kernel's causal attention and its gradients (the scores' backward is written out:
    QueryKeyScores), slices of unequal size and grouped heads included."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)]
    grad_out = torch.randn(2, 4, 30, 8)
    results = []
    for attention in (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      lambda q, k, v: written_attention(q, k, v, None, blocks)):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        y = attention(q, k, v)
        y.backward(grad_out)
        results.append([y, q.grad, k.grad, v.grad])
    for expected, written in zip(*results):
        assert (written - expected).abs().max() < 1e-5


def test_written_gelu_is_the_exact_gelu():
    """The GELU a compiled CPU step runs (a rational erf, its derivative written out) gives F.gelu's values and
    gradients to fp32 rounding, erf's tails included; a GELU MLP uses it."""
    x = torch.linspace(-12, 12, 20_001)
    assert (gpt.rational_erf(x) - torch.erf(x)).abs().max() < 1e-6
    written, exact = (x.clone().requires_grad_() for _ in range(2))
    grad_out = torch.randn_like(x)
    gpt.WrittenGelu.apply(written).backward(grad_out)
    F.gelu(exact).backward(grad_out)
    assert (gpt.WrittenGelu.apply(x) - F.gelu(x)).abs().max() < 2e-6
    assert (written.grad - exact.grad).abs().max() < 2e-6
    assert gpt.MLPS["gelu"][1] is gpt.gelu and gpt.MLPS["geglu"][1] is gpt.gelu


def test_attention_dropout_keeps_the_fused_kernel():
    """Defect: with dropout_p > 0 PyTorch's CPU SDPA left its flash kernel for the math path (T x T
    probabilities and a T x T random mask): training with dropout 0.1 was ~5x slower a step."""
    model = tiny(dropout=0.1).train()
    x, y = batch(T=32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, y)[1].backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert not torch.equal(model(x)[0], model(x)[0])  # dropout still acts in training
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_causal_no_token_sees_the_future():
    for attention, placement in itertools.product(["sdpa", "plain"], ["pre", "post", "sandwich"]):
        model = tiny(attention=attention, block=placement).eval()
        x, _ = batch()
        changed = x.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % 64
        a, b = model(x)[0], model(changed)[0]
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
        assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_norms():
    x = torch.randn(3, 8) * 5
    assert torch.allclose(CosineNorm(8)(x).norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(RMSNorm(8)(x).pow(2).mean(-1), torch.ones(3), atol=1e-4)
    assert len(list(RMSNorm(8, affine=False).parameters())) == 0


def test_positions_break_permutation_symmetry_only_when_configured():
    """Without positions, one attention layer sees the earlier tokens as a set: swapping two changes nothing."""
    x, _ = batch(B=1)
    swapped = x.clone()
    swapped[0, [2, 5]] = x[0, [5, 2]]
    for position in ["none", "learned", "sinusoidal", "rope"]:
        model = tiny(position=position, init="pytorch", n_layer=1).eval()  # one layer: a set of tokens
        same = torch.allclose(model(x)[0][0, -1], model(swapped)[0][0, -1], atol=1e-5)
        assert same == (position == "none"), position


def test_tied_and_untied_embeddings():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)


def test_gpt2_init_scales_residual_projections():
    model = tiny(n_layer=8, d_model=128, init="gpt2", bias=True)
    std = lambda t: t.std().item()  # noqa: E731
    assert std(model.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.1)
    assert std(model.blocks[0].attn.proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert std(model.blocks[0].mlp.proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0
    trunc = tiny(init="trunc_normal", init_std=0.05)
    assert trunc.blocks[0].mlp.fc.weight.abs().max() <= 0.15


def test_head_size_apart_from_width():
    """DefaultGPT: 8 query heads of 16 on a 64-wide stream (q is 128 wide), 2 key/value heads."""
    model = tiny(d_model=64, n_head=8, n_kv_head=2, head_size=16)
    assert model.blocks[0].attn.qkv.weight.shape == (8 * 16 + 2 * 2 * 16, 64)
    assert model.blocks[0].attn.proj.weight.shape == (64, 8 * 16)
    assert model(batch()[0])[0].shape == (2, 16, 64)


def test_sequence_longer_than_positions_allow():
    x = torch.zeros(1, 33, dtype=torch.long)
    for position in ["learned", "sinusoidal", "rope"]:
        with pytest.raises(GptlabError, match="longer than model.context_length=32"):
            tiny(position=position)(x)
    assert tiny(position="none")(x)[0].shape == (1, 33, 64)  # no positions, no limit


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.d_model=30", "--model.n_head=4"], "does not divide model.d_model=30"),
        (["--model.n_head=4", "--model.n_kv_head=3"], "model.n_kv_head=3 does not divide model.n_head=4"),
        (["--model.position=rope", "--model.d_model=36", "--model.n_head=4"], "RoPE needs an even head size"),
        (["--model.mlp=mish"], "model.mlp"),
    ],
)
def test_bad_shapes_are_one_line(overrides, message):
    with pytest.raises(GptlabError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_vocab_must_be_set_and_match_the_tokenizer():
    class Tok:
        vocab_size = 100

    with pytest.raises(GptlabError, match="vocab_size is not set"):
        build_model(ModelConfig())
    assert check_vocab(ModelConfig(), Tok()).vocab_size == 100
    assert check_vocab(ModelConfig(vocab_size=100), Tok()).vocab_size == 100
    with pytest.raises(GptlabError, match="model.vocab_size=64 but the tokenizer has 100 tokens"):
        check_vocab(ModelConfig(vocab_size=64), Tok())


def test_checkpoint_of_another_architecture_is_one_line():
    model = tiny()
    model.load_weights(tiny().state_dict())  # the same architecture loads
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.load_weights(state)  # a tied matrix stored once (as safetensors does) loads too
    for other in [tiny(d_model=64), tiny(n_layer=3), tiny(norm="layernorm", bias=True)]:
        with pytest.raises(GptlabError, match="does not fit this model") as e:
            model.load_weights(other.state_dict(), "runs/x/model.safetensors")
        assert "\n" not in str(e.value)


def test_training_forward_has_no_graph_breaks():
    """torch.compile sees the whole forward as one graph: no .item(), no data-dependent Python branches."""
    model = tiny(n_kv_head=2, qk_norm=True, mlp="swiglu")
    x, y = batch()
    explanation = torch._dynamo.explain(model)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_safetensors_round_trip(tiny_model, tiny_model_config, tmp_path):
    from safetensors.torch import load_file, save_model

    save_model(tiny_model, tmp_path / "model.safetensors")  # stores the tied matrix once
    fresh = GPT(tiny_model_config.model_copy(update={"init": "pytorch"})).eval()
    fresh.load_weights(load_file(tmp_path / "model.safetensors"))
    x = batch()[0]
    assert torch.equal(fresh(x)[0], tiny_model(x)[0])
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # still tied after loading


def test_compiled_bf16_cpu_step_writes_attention_out_and_keeps_the_loss_and_gradients(monkeypatch):
    """Compiled in bf16 on a CPU, attention is written out in causal blocks (faster than the fused kernel's
    backward there) and GELU with a rational erf: the loss and gradients stay the eager step's, within bf16's
    precision."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, context_length=30))
    x, y = torch.randint(0, 64, (2, 30)), torch.randint(0, 64, (2, 30))
    called, written = [], gpt.written_attention
    monkeypatch.setattr(gpt, "written_attention", lambda *args: called.append(args[-1]) or written(*args))
    results = []
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(x, y)[1]
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert called and set(called) == {gpt.CAUSAL_BLOCKS}  # traced into the compiled step, not the eager one
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert abs(eager_loss - compiled_loss) < 2e-2
    for a, b in zip(eager_grads, compiled_grads):
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-6
