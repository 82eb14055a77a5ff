"""The output head's loss (model/loss.py): fused equals plain, evaluation computes no gradients, one kind of result."""

from __future__ import annotations

import pytest
import torch

import gptlab.model.loss as loss_module
from gptlab.config import ModelConfig
from gptlab.model import GPT, build_model
from gptlab.model.loss import LOSSES, fused_cross_entropy, loss_for, plain_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def _model_and_batch(loss: str, tie: bool = True, vocab: int = 96, B: int = 3, T: int = 20):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=1, d_model=16, n_head=2, context_length=32, tie_embeddings=tie)
    model = GPT(cfg, loss=loss)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)
    y[0, :7] = -1  # ignored positions, also across a chunk boundary
    y[2, -3:] = -1
    return model.train(), x, y


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_loss_equals_the_plain_loss_and_its_gradients(tie, monkeypatch):
    monkeypatch.setattr(loss_module, "FUSED_CHUNK", 16)  # 60 rows: 4 chunks, the last one short
    results = {}
    for name in LOSSES:
        model, x, y = _model_and_batch(name, tie)
        params = list(model.parameters())
        logits, loss = model(x, y)
        assert logits is None  # the same kind of result whichever loss was chosen
        results[name] = loss, torch.autograd.grad(loss / 3, params)  # scaled, as with gradient accumulation
        with torch.no_grad():  # evaluation: the loss alone
            assert abs(model(x, y)[1].item() - loss.item()) < 1e-6
    (plain, plain_grads), (fused, fused_grads) = results["plain"], results["fused"]
    assert abs(fused.item() - plain.item()) < 1e-5
    for a, b in zip(plain_grads, fused_grads):
        assert (a - b).abs().max() < 1e-5, a.shape


def _matmuls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


def test_fused_loss_under_no_grad_computes_no_gradients(monkeypatch):
    """Defect: LinearCrossEntropy decided from ctx.needs_input_grad, True under no_grad too: 3 matmuls a chunk."""
    monkeypatch.setattr(loss_module, "FUSED_CHUNK", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 16, generator=g, requires_grad=True)  # 4 chunks
    weight = torch.randn(96, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 96, (60,), generator=g)
    with torch.no_grad():
        assert _matmuls(lambda: fused_cross_entropy(x, weight, targets)) == 4  # the logits' alone
        evaluated = fused_cross_entropy(x, weight, targets)
    assert _matmuls(lambda: fused_cross_entropy(x, weight, targets)) == 12  # training: + both gradients
    trained = fused_cross_entropy(x, weight, targets)
    assert trained.requires_grad and not evaluated.requires_grad
    assert torch.equal(evaluated, trained.detach())  # the same chunks, the same sums: identical
    assert torch.allclose(evaluated, plain_cross_entropy(x, weight, targets), atol=1e-5)


def test_forward_returns_logits_only_when_asked_with_targets():
    model, x, y = _model_and_batch("fused")
    logits, loss = model(x, y, return_logits=True)  # distillation wants both
    assert logits.shape == (3, 20, 96) and abs(loss.item() - model(x, y)[1].item()) < 1e-5
    assert model(x)[0].shape == (3, 20, 96) and model(x)[1] is None


def test_the_loss_is_chosen_once_per_device():
    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, context_length=8)
    assert build_model(cfg).loss is fused_cross_entropy  # built on the CPU, where the fused loss pays
    assert build_model(cfg, "cpu").loss is fused_cross_entropy
    assert loss_for("cuda") == "plain" and loss_for(torch.device("cuda", 0)) == "plain"
    assert GPT(cfg).loss is plain_cross_entropy


def test_fused_loss_compiles_without_graph_breaks():
    model, x, y = _model_and_batch("fused")
    explanation = torch._dynamo.explain(lambda x, y: model(x, y))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
