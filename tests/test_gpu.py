"""On a CUDA GPU, the paths a CPU never takes: bf16 and fp16 (GradScaler) training, resume, flash attention
through SDPA, torch.compile, fused AdamW, KV-cache generation, NCCL DDP and FSDP on one GPU.

Marked `cuda` and skipped without a GPU. benchmarks/gpu_check.sh runs them, then trains the gpt2.5-124m
preset, in one go; alone: python -m pytest -m cuda tests/test_gpu.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import read_metrics, tiny_config, weights

from gptlab.config import ModelConfig, TrainConfig, save_config
from gptlab.generate.sampling import sample_tokens
from gptlab.model import GPT
from gptlab.runs import checkpoint_dirs, load_run
from gptlab.train import resume_config, train
from gptlab.train.optim import build_optimizer

DEVICE = "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def on_gpu(data_dir, run_dir, precision: str, *extra):
    """tests/helpers.py's tiny training config on the GPU, in `precision`."""
    return tiny_config(data_dir, run_dir, f"--train.device={DEVICE}", f"--train.precision={precision}", *extra)


def losses(run_dir) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(run_dir)]


def last_state(run_dir) -> dict:
    return torch.load(checkpoint_dirs(run_dir)[-1] / "state.pt", weights_only=True)


def logits_and_loss(model, x, y):
    logits, _ = model(x)
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_learns_without_nan(tiny_shards, tmp_path, precision):
    run = tmp_path / "run"
    summary = train(on_gpu(tiny_shards, run, precision, "--train.max_steps=16"), verbose=False)
    assert (summary["device"], summary["precision"], summary["steps"]) == (DEVICE, precision, 16)
    curve = losses(run)
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    assert math.isfinite(summary["val_loss"])
    scaler = last_state(run)["scaler"]  # fp16 trains through a GradScaler, whose state the checkpoint keeps
    assert (scaler.get("scale", 0) > 0) if precision == "fp16" else scaler == {}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_on_the_gpu_continues_the_run_with_its_scaler_and_rng(tiny_shards, tmp_path, precision):
    """3 steps + SIGTERM + resume to 8 == 8 steps straight: losses, weights, the fp16 scaler's state (dropout on,
    so the CUDA generator's state matters too)."""
    extra = ("--model.dropout=0.1",)
    straight = train(on_gpu(tiny_shards, tmp_path / "straight", precision, *extra), verbose=False)

    def stop_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(on_gpu(tiny_shards, tmp_path / "split", precision, *extra), on_step=stop_at_3, verbose=False)
    assert (first["stopped"], first["steps"]) == ("interrupted", 3)
    assert "cuda" in last_state(tmp_path / "split")["rng"][0]  # rank 0's generators
    second = train(resume_config(tmp_path / "split"), resume=True, verbose=False)
    assert second["steps"] == straight["steps"] == 8 and second["device"] == DEVICE

    # Not bit-exact: attention's backward on a GPU may accumulate in another order from one run to the next.
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), abs=1e-3)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-3, rtol=1e-2)
    # The scaler was restored, not started afresh: its growth tracker counts all 8 steps in both.
    assert last_state(tmp_path / "split")["scaler"] == last_state(tmp_path / "straight")["scaler"]


def test_sdpa_runs_flash_attention_and_matches_the_plain_reference():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg = ModelConfig(vocab_size=256, n_layer=2, d_model=128, n_head=2, context_length=256)  # heads of 64
    torch.manual_seed(0)
    fused = GPT(cfg).to(DEVICE)
    plain = GPT(ModelConfig(**{**cfg.model_dump(), "attention": "plain"})).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randint(0, 256, (2, 4, 256), device=DEVICE)

    # Only the flash kernel allowed: SDPA raises rather than fall back; the profiler names the kernel that ran.
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel([SDPBackend.FLASH_ATTENTION]), \
            torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits, loss = logits_and_loss(fused, x, y)
        loss.backward()
    ops = {event.key for event in prof.key_averages()}
    assert any("flash_attention" in op for op in ops), sorted(ops)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref_logits, ref_loss = logits_and_loss(plain, x, y)
        ref_loss.backward()

    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=3e-2, rtol=3e-2)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=5e-3)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert (p.grad - q.grad).norm() <= 0.05 * q.grad.norm() + 1e-6, name


def test_compiled_training_matches_eager(tiny_shards, tmp_path):
    eager = train(on_gpu(tiny_shards, tmp_path / "eager", "fp32"), verbose=False)
    compiled = train(on_gpu(tiny_shards, tmp_path / "compiled", "fp32", "--train.compile=true"), verbose=False)
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_adamw_is_fused_on_the_gpu_and_steps_as_the_foreach_kernel_does(optimizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, context_length=32)).to(DEVICE)
    reference = copy.deepcopy(model)
    built = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2), torch.device(DEVICE))
    adamw = built.optimizers[0] if optimizer == "muon" else built
    assert adamw.defaults["fused"] is True
    if optimizer == "muon":
        return
    # The same groups over the reference's parameters, stepped by the multi-tensor (foreach) kernel instead.
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(reference.named_parameters())
    unfused = torch.optim.AdamW([{**g, "params": [params[names[id(p)]] for p in g["params"]], "fused": None,
                                  "foreach": True} for g in adamw.param_groups])
    x, y = torch.randint(0, 64, (2, 4, 32), device=DEVICE)
    for _ in range(3):
        for net, opt in ((model, adamw), (reference, unfused)):
            logits_and_loss(net, x, y)[1].backward()
            opt.step()
            opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], atol=1e-6, rtol=1e-5)


def test_kv_cache_generation_batched_equals_one_by_one_and_the_cpu():
    # Weights far from zero spread the logits, so that greedy choices are not near ties between devices.
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, context_length=48, init_std=0.2)
    torch.manual_seed(0)
    cpu_model = GPT(cfg).eval()
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [4, 4]]
    new = 40  # within the context (6 + 40 < 48): past it, a padded batch starts its window again earlier
    batched, _ = sample_tokens(gpu_model, prompts, new, temperature=0)
    alone = [sample_tokens(gpu_model, [p], new, temperature=0)[0][0] for p in prompts]
    reference, _ = sample_tokens(cpu_model, prompts, new, temperature=0)
    assert all(len(row) == new for row in batched)
    assert batched == alone == reference


@pytest.mark.parametrize("mode, precision, tolerance", [("ddp", "fp32", 1e-4), ("fsdp", "bf16", 0.1)])
def test_one_gpu_under_torchrun_trains_over_nccl_as_one_process(tiny_shards, tmp_path, mode, precision, tolerance):
    """torchrun --nproc_per_node 1: the NCCL process group, DDP or FSDP2 around the model, sharded checkpoints;
    the same curve as a single process (under FSDP's bf16 weights the residual stream is bf16 too: looser)."""
    single = tmp_path / "single"
    train(on_gpu(tiny_shards, single, precision), verbose=False)
    run = tmp_path / "run"
    save_config(on_gpu(tiny_shards, run, precision, f"--train.distributed={mode}"), tmp_path / "config.toml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "gptlab", "train", "-c", str(tmp_path / "config.toml"), "-q"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "NCCL INFO" in proc.stdout, proc.stdout[-3000:]  # the communicator NCCL set up
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["device"], summary["processes"], summary["distributed"]) == (DEVICE, 1, mode)
    assert losses(run) == pytest.approx(losses(single), abs=tolerance)
    assert losses(run)[-1] < losses(run)[0] - tolerance  # it learns
    assert (checkpoint_dirs(run)[-1] / "dcp").is_dir()
    model, _, _ = load_run(run, "last", device=DEVICE)  # the gathered model.safetensors reads as any run's
    assert model.cfg.n_layer == 2
