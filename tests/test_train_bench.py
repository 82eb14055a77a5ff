"""Throughput work: `gptlab bench peak` and the cached peak FLOP/s that MFU uses (the fused loss: test_model_loss.py)."""

from __future__ import annotations

import json

import pytest
import torch

import gptlab.device as dev
from gptlab.cli import main

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
