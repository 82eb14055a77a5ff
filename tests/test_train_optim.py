"""Optimizer groups, learning-rate schedules, and the device / precision / compile decisions."""

from __future__ import annotations

import pytest
import torch

from gptlab import device as dev
from gptlab.config import ModelConfig, TrainConfig, load_config
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train.optim import DECAY, Muon, build_optimizer, learning_rate


def test_weight_decay_on_matrices_and_embeddings_only():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, d_model=16, n_head=2, context_length=8, bias=True, norm="layernorm"))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.tok_emb.weight for p in decay["params"])
    n_params = len(list(model.parameters()))  # the tied output matrix counts once
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")



def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, d_model=16, n_head=2, context_length=8, tie_embeddings=False))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01), torch.device("cpu"))
    adamw, muon = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_muon) == (name.startswith("blocks.") and p.dim() == 2), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))

    # it trains, and its state survives a state_dict round trip into a fresh optimizer
    x = torch.randint(0, 50, (4, 8))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    again = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01), torch.device("cpu"))
    again.load_state_dict(opt.state_dict())
    p = model.blocks[0].attn.proj.weight
    assert torch.equal(again.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])



def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_muon_makes_its_momentum_buffers_once_and_steps_in_place():
    """Defect: a zeros_like per parameter every step (setdefault's argument) and a new Nesterov update tensor."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 6))
    opt = Muon([weight], lr=0.01, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    weight.grad = torch.randn(8, 6)
    opt.step()
    buffer = opt.state[weight]["momentum_buffer"]
    weight.grad = torch.randn(8, 6)
    ops = _ops(opt.step)
    assert "aten::lerp_" in ops  # the profiler sees the step
    assert not {"aten::zeros_like", "aten::zeros", "aten::lerp"} & ops, ops
    assert opt.state[weight]["momentum_buffer"] is buffer


def test_muon_split_update_equals_orthogonalising_each_block_alone():
    torch.manual_seed(0)
    rows = (6, 2, 2)  # Q, K, V of 3 query heads and 1 key/value head, head size 2, width 6
    stacked = torch.nn.Parameter(torch.randn(10, 6))
    alone = [torch.nn.Parameter(block.detach().clone()) for block in stacked.split(rows)]
    kwargs = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    split, separate = Muon([stacked], blocks={stacked: rows}, **kwargs), Muon(alone, **kwargs)
    whole = torch.nn.Parameter(stacked.detach().clone())
    as_one = Muon([whole], **kwargs)
    for _ in range(3):
        grad = torch.randn(10, 6)
        stacked.grad, whole.grad = grad.clone(), grad.clone()
        for p, g in zip(alone, grad.split(rows)):
            p.grad = g.clone()
        split.step(), separate.step(), as_one.step()
    torch.testing.assert_close(stacked.detach(), torch.cat([p.detach() for p in alone]))
    assert (stacked - whole).abs().max() > 1e-3  # splitting changes the update


MUON = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)


def _muon_on_a_rank(rank: int, world: int, store: str, start: list, grads: list, out: str):
    """One process of a DDP-like world: Muon over copies of `start`, the same gradients as every rank."""
    import torch.distributed as dist

    import gptlab.train.optim as optim

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        calls = []
        orthogonalize = optim._orthogonalize
        optim._orthogonalize = lambda g, *a: calls.append(tuple(g.shape)) or orthogonalize(g, *a)
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = Muon(params, ranks=(rank, world), **MUON)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        torch.save({"weights": [p.detach() for p in params], "calls": calls,
                    "buffers": [opt.state[p]["momentum_buffer"] for p in params]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_muon_under_ddp_shares_the_orthogonalising_between_ranks_and_steps_as_one_process(tmp_path):
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8, 16), torch.randn(12, 12), torch.randn(6, 4), torch.randn(3, 5, 4)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    alone = Muon(params, **MUON)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        alone.step()

    torch.multiprocessing.spawn(_muon_on_a_rank, args=(2, str(tmp_path / "store"), start, grads, str(tmp_path / "out")),
                                nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in range(2)]
    for got in ranks:  # every rank ends with every weight and every momentum buffer, bit for bit one process's
        for p, w in zip(params, got["weights"]):
            assert torch.equal(w, p.detach())
        for p, b in zip(params, got["buffers"]):
            assert torch.equal(b, alone.state[p]["momentum_buffer"])
    # each rank orthogonalised only its share of the 7 matrices a step (4, and a stack of 3), the largest on rank 0
    per_step = [len(got["calls"]) // 3 for got in ranks]
    assert sum(per_step) == 7 and min(per_step) >= 1, per_step
    assert (12, 12) in ranks[0]["calls"] and (12, 12) not in ranks[1]["calls"]


def test_the_model_names_its_stacked_matrices_for_muon():
    cfg = ModelConfig(vocab_size=50, n_layer=2, d_model=16, n_head=4, n_kv_head=2, context_length=8, mlp="swiglu", d_ff=24)
    model = GPT(cfg)
    blocks = model.fused_matrices()
    assert blocks[model.blocks[1].attn.qkv.weight] == (16, 8, 8)
    assert blocks[model.blocks[0].mlp.fc.weight] == (24, 24)
    assert len(blocks) == 4 and all(sum(r) == p.size(0) for p, r in blocks.items())
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers[1]
    assert muon.blocks == blocks
    assert build_optimizer(model, TrainConfig(optimizer="muon", muon_split=False), torch.device("cpu")).optimizers[1].blocks == {}


def lr(schedule, step, progress, **kw):
    return learning_rate(TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule, **kw), step, progress)


def test_warmup_is_linear_in_steps():
    assert [lr("constant", s, 0.0) for s in (0, 4, 9, 10, 500)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", [1.0, 0.55, 0.1]),
    ("linear", [1.0, 0.55, 0.1]),
    ("constant", [1.0, 1.0, 1.0]),
    ("wsd", [1.0, 1.0, 0.1]),
])
def test_decay_shapes_from_lr_to_min_lr(schedule, expected):
    assert [lr(schedule, 100, p) for p in (0.0, 0.5, 1.0)] == pytest.approx(expected)


def test_cosine_at_a_quarter_of_the_run():
    assert lr("cosine", 100, 0.25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2**-0.5))


def test_wsd_is_flat_then_decays_over_its_last_fraction():
    assert lr("wsd", 100, 0.79, decay_fraction=0.2) == pytest.approx(1.0)
    assert lr("wsd", 100, 0.9, decay_fraction=0.2) == pytest.approx(0.55)


@pytest.mark.parametrize("peak", [5e-5, 1e-3, 1.2e-2])
@pytest.mark.parametrize("schedule", sorted(DECAY))
def test_every_schedule_falls_to_its_floor_on_the_last_step_and_never_rises(schedule, peak):
    """As the trainer calls it: progress counts the step being taken, so the last of 100 steps has progress 1."""
    cfg = TrainConfig(lr=peak, warmup_steps=10, schedule=schedule)  # the default floor: a tenth of the peak
    steps = 100
    rates = [learning_rate(cfg, s, (s + 1) / steps) for s in range(steps)]
    assert max(rates) <= peak * (1 + 1e-12)
    after_warmup = rates[cfg.warmup_steps - 1:]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after_warmup, after_warmup[1:]))
    assert rates[-1] == pytest.approx(peak if schedule == "constant" else peak * cfg.min_lr_ratio, rel=1e-12)


def test_a_low_peak_never_climbs_to_the_default_floor():
    """--train.lr=5e-5 with the defaults: an absolute 1e-4 floor made the rate rise over the run."""
    cfg = load_config(None, ["--train.lr=5e-5", "--train.max_steps=500"]).train
    rates = [learning_rate(cfg, s, (s + 1) / 500) for s in range(500)]
    assert max(rates) <= 5e-5 and rates[-1] == pytest.approx(5e-6)


def test_an_old_absolute_min_lr_is_read_as_the_same_floor_and_one_above_lr_is_refused():
    assert load_config(None, ["--train.lr=3e-3", "--train.min_lr=3e-4"]).train.min_lr_ratio == pytest.approx(0.1)
    with pytest.raises(GptlabError, match="train.min_lr=0.0001 is above train.lr=5e-05.*train.min_lr_ratio"):
        load_config(None, ["--train.lr=5e-5", "--train.min_lr=1e-4"])


def test_the_trainer_trains_its_last_step_at_the_floor(tiny_shards, tmp_path):
    from helpers import read_metrics, tiny_config

    from gptlab.train import train

    for limit in ("--train.max_steps=8", "--train.max_tokens=1000"):  # 8 steps of 128 tokens: the last ends past 1000
        run = tmp_path / limit.split(".")[1].split("=")[0]
        cfg = tiny_config(tiny_shards, run, "--train.schedule=cosine", "--train.max_steps=none", limit)
        train(cfg, verbose=False)
        last = read_metrics(run)[-1]
        assert int(last["step"]) == 8
        assert float(last["lr"]) == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-6)


def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    dev.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    assert dev.pick_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    assert dev.pick_precision("auto", cpu) == "fp32"
    assert dev.pick_precision("bf16", cpu) == "bf16"  # asked for explicitly: obeyed
    with pytest.raises(GptlabError, match="fp16 needs a CUDA GPU"):
        dev.pick_precision("fp16", cpu)


def test_compile_auto_only_for_runs_long_enough_to_pay_back(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "can_compile", lambda device: True)
    assert dev.pick_compile("auto", cpu, planned_seconds=dev.COMPILE_MIN_SECONDS["cpu"] - 1) is False
    assert dev.pick_compile("auto", cpu, planned_seconds=dev.COMPILE_MIN_SECONDS["cpu"]) is True
    assert dev.pick_compile("auto", cpu, planned_seconds=None) is True  # no limit: a long run
    assert dev.pick_compile(False, cpu, planned_seconds=10**6) is False
    monkeypatch.setattr(dev, "can_compile", lambda device: False)
    assert dev.pick_compile("auto", cpu, planned_seconds=10**6) is False
    with pytest.raises(GptlabError, match="compile=true cannot work here"):
        dev.pick_compile(True, cpu, planned_seconds=10)


def test_device_auto_and_unavailable_devices():
    assert dev.pick_device("cpu").type == "cpu"
    assert dev.pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(GptlabError, match="train.device=cuda is not available"):
            dev.pick_device("cuda")


def test_peak_flops_is_measured_on_a_cpu():
    assert dev.peak_flops(torch.device("cpu"), torch.float32) > 1e8
