"""The KAN part (experimental): B-spline bases, a layer that learns a curve, a GPT with KAN blocks that learns,
MLP-sized parameters and init, torch.compile, bf16 autocast and the KV cache."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.model import GPT, KVCache
from gptlab.model.kan import GRID_RANGE, KANMLP, KANLayer, b_spline_bases, kan_hidden, uniform_knots

pytestmark = pytest.mark.usefixtures("single_thread")

KAN_BLOCK = "Norm->Attn->+->Norm->KAN->+"
TINY = dict(vocab_size=64, n_layer=2, d_model=32, n_head=4, context_length=32, block=KAN_BLOCK)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def reference_basis(x: float, knots: list[float], i: int, p: int) -> float:
    """B_{i,p}(x) by the textbook recursion, one scalar at a time."""
    if p == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + p] - knots[i]) * reference_basis(x, knots, i, p - 1)
    right = (knots[i + p + 1] - x) / (knots[i + p + 1] - knots[i + 1]) * reference_basis(x, knots, i + 1, p - 1)
    return left + right


@pytest.mark.parametrize("grid, order", [(5, 3), (3, 1), (8, 2)])
def test_bases_match_the_recursion_and_partition_unity(grid, order):
    knots = uniform_knots(grid, order)
    assert len(knots) == grid + 2 * order + 1 and knots[order] == GRID_RANGE[0] and knots[-order - 1] == GRID_RANGE[1]
    x = torch.linspace(-5, 5, 203)
    bases = b_spline_bases(x, knots, order)
    assert bases.shape == (203, grid + order)
    expected = torch.tensor([[reference_basis(v, knots.tolist(), i, order) for i in range(grid + order)] for v in x.tolist()])
    torch.testing.assert_close(bases, expected, atol=1e-5, rtol=0)
    assert (bases >= 0).all() and ((bases > 0).sum(-1) <= order + 1).all()
    inside = (x >= GRID_RANGE[0]) & (x < GRID_RANGE[1])
    torch.testing.assert_close(bases[inside].sum(-1), torch.ones(int(inside.sum())))
    assert bases[x.abs() > 2 + order * 4 / grid].sum() == 0  # beyond the extended knots only SiLU acts


def test_a_layer_learns_curves_a_linear_layer_cannot():
    """y = the mean of sin(3 x_i) over 8 inputs: a sum of one curve per edge, which a KAN layer is made of and
    a linear layer cannot follow (sin(3x) has almost no linear part under N(0, 1))."""
    torch.manual_seed(0)
    x = torch.randn(1024, 8)
    y = torch.sin(3 * torch.nn.functional.rms_norm(x, (8,))).mean(-1, keepdim=True)  # the layer sees x at unit RMS

    def fit(layer):
        opt = torch.optim.Adam(layer.parameters(), lr=2e-2)
        for _ in range(300):
            loss = (layer(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item() / y.var().item()

    assert fit(KANLayer(8, 1, grid=8, order=3)) < 0.01  # measured: ~3e-4 of the variance left
    assert fit(torch.nn.Linear(8, 1)) > 0.8  # measured: ~0.99


def test_hidden_width_keeps_the_mlps_parameter_count():
    for mlp in ("gelu", "swiglu"):
        mlp_model, kan_model = tiny(mlp=mlp, block="pre"), tiny(mlp=mlp)
        mlp_weights, kan_weights = mlp_model.num_params(non_embedding=True), kan_model.num_params(non_embedding=True)
        assert abs(kan_weights - mlp_weights) / mlp_weights < 0.03, (mlp, kan_weights, mlp_weights)
    cfg = ModelConfig(**TINY)
    assert kan_hidden(cfg) == round(2 * 128 / (2 * 9))  # d_ff = 4 * 32, G + k + 1 = 9
    kan = KANMLP(cfg)
    assert kan.fc.weight.shape == (kan.hidden, 32 * 9) and kan.proj.weight.shape == (32, kan.hidden * 9)


def test_init_treats_the_kan_mlp_as_an_mlp():
    model = tiny(d_model=64, n_layer=4, init_std=0.02)
    kan = model.blocks[0].kan
    assert kan.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert kan.proj.weight.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)  # residual projection
    # a KAN layer's output has the scale of a linear layer's at that init: std ~ init_std * sqrt(fan-in)
    x = torch.randn(512, 64)
    assert kan.fc(x).std().item() == pytest.approx(0.02 * 64**0.5, rel=0.25)
    own = tiny(init="pytorch").blocks[0].kan.fc.weight.view(-1, 32, 9)  # efficient-kan: SiLU weights as nn.Linear's
    assert own[..., 0].abs().max() <= 32**-0.5 and own[..., 1:].abs().max() <= 0.1 * 32**-0.5


def test_causal_and_cached_generation_match():
    model = tiny().eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        full, _ = model(idx)
        changed = idx.clone()
        changed[:, 8] = (changed[:, 8] + 1) % 64
        torch.testing.assert_close(model(changed)[0][:, :8], full[:, :8])  # a later token changes nothing before it
        cache = KVCache(2, 32)
        steps = [model(idx[:, :6], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache.step())[0] for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_and_no_graph_breaks():
    model = tiny().eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = model(idx)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert (bf16.float() - fp32).abs().max().item() < 0.05 * fp32.abs().max().item() + 1e-3
    explanation = torch._dynamo.explain(model)(idx, torch.roll(idx, -1, 1))
    assert explanation.graph_break_count == 0, explanation.break_reasons
