"""Throughput work: `gptlab bench peak`, the cached peak FLOP/s that MFU uses, and the fused loss of GPT.forward."""

from __future__ import annotations

import json

import pytest
import torch

import gptlab.device as dev
import gptlab.model.gpt as gpt
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "peak.json"


def test_bench_peak_prints_saves_and_caches_what_training_uses(cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "peak.json"
    assert main(["bench", "peak", "--device", "cpu", "--seconds", "0.3", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu capability" in printed and "GFLOP/s" in printed and "fp32" in printed

    result = json.loads(out.read_text())
    assert {"device", "device_name", "threads", "cpu_capability", "cpu_features", "matmul", "peak_flops",
            "mfu_peak_flops", "cache"} <= result.keys()
    assert result["threads"] == 1 and result["device"] == "cpu"
    assert {"fp32", "bf16"} <= result["peak_flops"].keys()
    assert all(row["flops"] > 0 and row["size"] > 0 for row in result["matmul"])
    assert result["peak_flops"]["fp32"] == max(r["flops"] for r in result["matmul"] if r["dtype"] == "fp32")

    # the trainer's peak comes from that cache: no second measurement
    monkeypatch.setattr(dev, "measure_matmul", lambda *a, **k: pytest.fail("measured again instead of using the cache"))
    assert dev.peak_flops(CPU, FP32) == result["mfu_peak_flops"]["fp32"]


def test_peak_is_measured_once_per_device_dtype_and_threads(cache, monkeypatch):
    calls = []

    def fake(device, dtype, seconds=1.0, sizes=None):
        calls.append((dtype, torch.get_num_threads()))
        return {256: 5e9, 512: 7e9}

    monkeypatch.setattr(dev, "measure_matmul", fake)
    assert dev.peak_flops(CPU, FP32) == 7e9
    assert dev.peak_flops(CPU, FP32) == 7e9
    assert len(calls) == 1 and cache.exists()
    dev.peak_flops(CPU, torch.bfloat16)
    torch.set_num_threads(2)
    dev.peak_flops(CPU, FP32)
    assert calls == [(FP32, 1), (torch.bfloat16, 1), (FP32, 2)]


def test_cache_keeps_the_best_measurement_and_survives_a_broken_file(cache):
    assert dev.store_peak(CPU, FP32, 9e9, {1024: 9e9}) == 9e9
    assert dev.store_peak(CPU, FP32, 4e9, {1024: 4e9}) == 9e9  # a busier machine does not lower the peak
    assert dev.peak_flops(CPU, FP32) == 9e9
    cache.write_text("{not json")
    assert dev.read_peak_cache() == {}
    assert dev.peak_flops(CPU, FP32, seconds=0.05) > 1e8  # measured again, and cached again
    assert json.loads(cache.read_text())


def test_slow_sizes_are_skipped_not_waited_for(monkeypatch):
    monkeypatch.setattr(dev, "_matmul_flops", lambda device, dtype, n, seconds: 1e6)  # an emulated dtype's pace
    assert list(dev.measure_matmul(CPU, torch.bfloat16, 0.4, sizes=(256, 512, 1024))) == [256]


def test_bad_arguments_are_one_line(cache, capsys):
    assert main(["bench", "peak", "--seconds", "0"]) == 2
    assert "--seconds" in capsys.readouterr().err


# --------------------------------------------------------------------------- fused output head + cross-entropy


def _model_and_batch(tie: bool, vocab: int = 96, B: int = 3, T: int = 20):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=1, d_model=16, n_head=2, context_length=32, tie_embeddings=tie))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)
    y[0, :7] = -1  # ignored positions, also across a chunk boundary
    y[2, -3:] = -1
    return model.train(), x, y


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_loss_equals_the_plain_loss_and_its_gradients(tie, monkeypatch):
    monkeypatch.setattr(gpt, "FUSED_LOSS_CHUNK", 16)  # 60 rows: 4 chunks, the last one short
    model, x, y = _model_and_batch(tie)
    params = [p for p in model.parameters()]
    logits, plain = model(x, y, return_logits=True)
    plain_grads = torch.autograd.grad(plain / 3, params)  # a scaled loss, as with gradient accumulation
    none, fused = model(x, y, return_logits=False)
    fused_grads = torch.autograd.grad(fused / 3, params)
    assert none is None and logits.shape == (3, 20, 96)
    assert abs(fused.item() - plain.item()) < 1e-5
    for p, a, b in zip(params, plain_grads, fused_grads):
        assert (a - b).abs().max() < 1e-5, p.shape
    with torch.no_grad():  # evaluation: the loss alone, no gradients kept
        assert abs(model(x, y, return_logits=False)[1].item() - plain.item()) < 1e-5


def test_fused_loss_is_chosen_for_big_logits_only(monkeypatch):
    model, x, y = _model_and_batch(tie=True)
    assert model(x, y)[0] is not None  # 3 x 20 x 96 logits: small, returned as before
    monkeypatch.setattr(gpt, "FUSED_LOSS_MIN_LOGITS", 3 * 20 * 96)
    logits, loss = model(x, y)
    assert logits is None and loss.requires_grad
    assert model(x, y, return_logits=True)[0].shape == (3, 20, 96)
    assert model(x)[0].shape == (3, 20, 96)  # no targets: logits, whatever their size


def test_fused_loss_compiles_without_graph_breaks():
    model, x, y = _model_and_batch(tie=True)
    explanation = torch._dynamo.explain(lambda x, y: model(x, y, return_logits=False))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
