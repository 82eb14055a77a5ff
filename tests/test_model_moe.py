"""MoE parts: routing and dispatch against a dense reference, capacity, causality, cached generation, the
auxiliary losses in training (and only there), active-parameter FLOPs, Muon, torch.compile, DDP, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import read_metrics, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from gptlab.cli import main
from gptlab.config import ModelConfig, load_config
from gptlab.model import GPT, KVCache
from gptlab.model.moe import MoE
from gptlab.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

MOE = "Norm->Attn->+->Norm->MoE->+"
ARCTIC = ["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"]  # Snowflake Arctic: a dense MLP and a MoE residual side by side
TRAIN = ["--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.context_length=32", "--train.batch_size=4",
         "--train.max_steps=16", "--train.eval_every=8", "--train.eval_batches=2", "--train.log_every=1",
         "--train.warmup_steps=2", "--train.lr=3e-3", "--train.precision=fp32", "--train.compile=false",
         "--train.peak_flops=1e11", "--train.threads=1"]
TINY = dict(vocab_size=64, n_layer=2, d_model=32, n_head=4, context_length=32, block=MOE, moe_experts=4, moe_topk=2,
            d_ff=48)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


class Context:
    aux_losses: list

    def __init__(self):
        self.aux_losses = []


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the routing weights (zero outside a token's top k)."""
    tokens = x.reshape(-1, x.size(-1))
    probs = moe.router(tokens).float().softmax(-1)
    top, chosen = probs.topk(moe.topk, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))  # [N, E]
    every = torch.stack([moe.mlp(tokens, moe.fc.weight[e], moe.proj.weight[e]) for e in range(moe.n_experts)], 1)
    out = (every * gates[..., None]).sum(1)  # [N, D]
    if hasattr(moe, "shared_fc"):
        for s in range(moe.shared_fc.weight.size(0)):
            out = out + moe.mlp(tokens, moe.shared_fc.weight[s], moe.shared_proj.weight[s])
    return out.view_as(x)


@pytest.mark.parametrize("parts", [dict(mlp="swiglu"), dict(mlp="gelu", moe_shared=2, moe_d_ff=24),
                                   dict(mlp="geglu", moe_experts=5, moe_topk=1), dict(mlp="relu2", moe_topk=4)])
def test_dropless_dispatch_is_the_dense_mixture(parts):
    moe = tiny(**parts).blocks[0].moe.train()
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    ctx = Context()
    out = moe(x, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(out, dense_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert len(ctx.aux_losses) == 2  # load balancing and z-loss, in training
    moe.eval()
    moe(x, ctx := Context())
    assert ctx.aux_losses == []


def test_the_losses_of_a_uniform_router_and_of_a_collapsed_one():
    moe = tiny(moe_aux_weight=1.0, moe_z_weight=1.0, moe_topk=1).blocks[0].moe.train()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability 1/E: E * sum_i f_i / E = 1 wherever the slots go
        moe(x, ctx := Context())
        assert [loss.item() for loss in ctx.aux_losses] == pytest.approx([1.0, math.log(4) ** 2])
        moe.router.weight[0] = 50 * x.reshape(-1, 32).mean(0)  # a large shared component: mostly expert 0
        moe(x + 10 * x.reshape(-1, 32).mean(0), ctx := Context())
    balance, z = (loss.item() for loss in ctx.aux_losses)
    assert balance > 3.5  # collapsed onto one of 4 experts: towards E = 4
    assert z > 100  # large logits


def test_capacity_drops_the_overflow_in_training_only():
    model = tiny(moe_capacity=0.5, moe_topk=1)
    moe = model.blocks[0].moe.train()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 10.0  # tokens with x[..., 0] > 0 go to expert 1, the rest to expert 0
        x[..., 0] = 1.0  # all of them: expert 1, which takes ceil(0.5 * 32 * 1 / 4) = 4
        capped = moe(x, Context())
        computed = capped.reshape(-1, 32).abs().sum(-1) > 0
        assert computed.tolist() == [True] * 4 + [False] * 28  # the first four tokens in batch order
        moe.eval()
        torch.testing.assert_close(moe(x, Context()), dense_reference(moe, x))  # no capacity outside training


def test_first_choices_are_served_before_second_ones_under_capacity():
    moe = tiny(moe_capacity=1.0, moe_topk=2, moe_experts=2).blocks[0].moe.train()
    x = torch.zeros(1, 4, 32)
    x[0, :, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # tokens 0, 1 prefer expert 1; tokens 2, 3 expert 0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 1.0
        # capacity ceil(1.0 * 4 * 2 / 2) = 4 slots an expert: all 8 fit
        torch.testing.assert_close(moe(x, Context()), dense_reference(moe, x))
        moe.capacity = 0.5  # 2 slots an expert: exactly the first choices
        out = moe(x, Context())
        tokens = x.reshape(-1, 32)
        probs = moe.router(tokens).softmax(-1)
        first = probs.max(-1)
        expected = torch.stack([first.values[t] / probs[t].sum() * moe.mlp(tokens[t], moe.fc.weight[first.indices[t]],
                                                                         moe.proj.weight[first.indices[t]]) for t in range(4)])
        torch.testing.assert_close(out.reshape(-1, 32), expected)


@pytest.mark.parametrize("block", [MOE, ARCTIC], ids=["moe", "arctic"])
def test_no_token_sees_the_future_and_the_cache_gives_the_full_forward(block):
    model = tiny(block=block, init_std=0.1).eval()
    x = tokens(T=20)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
        assert not torch.allclose(a[:, 10:], b[:, 10:])
        cache = KVCache(batch_size=2, max_len=32)
        prefill, _ = model(x[:, :7], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache.step())[0] for t in range(7, 20)]
    assert (torch.cat([prefill, *steps], dim=1) - a[:, 6:]).abs().max() < 1e-5


def test_the_arctic_block_has_a_dense_mlp_and_a_moe_side_by_side():
    model = tiny(block=ARCTIC).train()
    assert {"mlp", "moe"} <= set(dict(model.blocks[0].named_children()))
    x = tokens()
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_adds_the_aux_losses_and_evaluation_does_not():
    model = tiny(moe_aux_weight=0.5, moe_z_weight=0.1).train()
    x, y = tokens(seed=1), tokens(seed=2)
    _, train_loss = model(x, y)
    logits, _ = model(x, y, return_logits=True)
    pure = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert model.aux_loss.item() > 0.5  # the balancing loss is at least 1 (x 0.5)
    assert train_loss.item() == pytest.approx(pure.item() + model.aux_loss.item(), rel=1e-5)
    model.eval()
    _, eval_loss = model(x, y)
    assert eval_loss.item() == pytest.approx(pure.item(), rel=1e-5)


def test_every_expert_gets_a_gradient_even_without_tokens():
    """DDP (find_unused_parameters off) needs every weight in every step's graph: an expert no token chose
    gets a zero gradient, through the stacked weight the others were sliced from."""
    model = tiny(moe_experts=8, moe_topk=1)
    with torch.no_grad():
        for block in model.blocks:
            block.moe.router.weight.zero_()  # all tied: topk picks one and the same expert for every token
    x = tokens()
    model(x, x)[1].backward()
    for block in model.blocks:
        for weight in (block.moe.fc.weight, block.moe.proj.weight):
            assert weight.grad is not None
            assert (weight.grad.flatten(1).abs().sum(1) > 0).sum() == 1  # one expert worked; 7 got zeros


def test_flops_per_token_counts_the_active_experts_only():
    cfg = ModelConfig(**{**TINY, "vocab_size": 128, "d_model": 64, "context_length": 64, "attention": "plain",
                         "moe_experts": 8, "moe_topk": 2, "moe_shared": 1, "mlp": "swiglu"})
    model = GPT(cfg)
    x = torch.randint(0, 128, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    assert model.flops_per_token() == pytest.approx(counter.get_total_flops() / x.numel(), rel=0.01)
    dense = GPT(cfg.model_copy(update={"moe_topk": 8}))
    routed = sum(b.moe.fc.weight.numel() + b.moe.proj.weight.numel() for b in model.blocks)
    assert dense.num_params() == model.num_params()  # the same weights; 6 of 8 experts idle for each token
    assert dense.flops_per_token() - model.flops_per_token() == pytest.approx(6 * routed * 6 / 8)


def test_muon_orthogonalises_each_expert_and_the_model_learns():
    from gptlab.config import TrainConfig
    from gptlab.train.optim import Muon, build_optimizer

    model = tiny(mlp="swiglu").train()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.0), torch.device("cpu"))
    muon = next(o for o in opt.optimizers if isinstance(o, Muon))
    managed = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.blocks[0].moe.fc.weight) in managed and id(model.blocks[0].moe.router.weight) in managed
    assert muon.blocks[model.blocks[0].moe.fc.weight] == (48, 48)  # gate and up of each expert apart
    x = tokens()
    y = torch.roll(x, -1, dims=1)
    # one step: each expert's gate and up update orthogonalised on its own, so each one's largest singular
    # value is ~1 however small its gradient (its rank is at most its tokens: the small ones stay small)
    fc = model.blocks[0].moe.fc.weight
    before = fc.detach().clone()
    model(x, y)[1].backward()
    worked = fc.grad.flatten(1).abs().sum(1) > 0
    opt.step()
    opt.zero_grad()
    for e in torch.nonzero(worked).flatten().tolist():
        for block in (before - fc.detach())[e].split(48):  # [48, 32]: lr * 0.2 * sqrt(48) * an orthogonal matrix
            singular = torch.linalg.svdvals(block / (0.02 * 0.2 * math.sqrt(48)))
            assert 0.6 < singular.max() < 1.3, singular
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_training_through_the_cli_logs_the_aux_loss(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "-q", "--data-dir", str(tiny_shards), "--run", str(run), *TRAIN, f"--model.block={MOE}",
                 "--model.moe_experts=4", "--model.mlp=swiglu"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = read_metrics(run)
    assert list(rows[0])[-1] == "aux_loss"
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    aux = [float(r["aux_loss"]) for r in rows if r["aux_loss"]]
    assert len(aux) == 16 and all(0.01 <= a < 0.05 for a in aux)  # 0.01 x balance (1 = balanced) + 0.001 x z
    assert losses[-1] < losses[0] - 0.5
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"])


def test_plain_runs_keep_their_metrics_columns(tiny_shards, tmp_path):
    train(tiny_config(tiny_shards, tmp_path / "run", "--train.max_steps=2"), verbose=False)
    assert "aux_loss" not in read_metrics(tmp_path / "run")[0]


def test_more_experts_per_token_than_experts_is_one_line(capsys):
    assert main(["model", "info", "tiny-1m", f"--model.block={MOE}", "--model.moe_experts=4", "--model.moe_topk=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.moe_topk=5 is more than model.moe_experts=4" in err


def test_model_info_of_a_moe_model(capsys):
    assert main(["model", "info", "tiny-1m", f"--model.block={MOE}"]) == 0
    assert "MoE" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_matches_eager():
    model = tiny(mlp="swiglu").train()
    x, y = tokens(seed=1), tokens(seed=2)
    _, eager = model(x, y)
    eager_aux = model.aux_loss
    del model.aux_loss
    compiled = torch.compile(model)
    _, loss = compiled(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-4)
    assert model.aux_loss.item() == pytest.approx(eager_aux.item(), rel=1e-4)  # set from inside the compiled forward
    assert model.blocks[0].moe.fc.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_a_moe(tiny_shards, tmp_path, mode):
    """64 experts, 1 a token, 64 tokens a rank: some experts get no token on a rank, which must not stall DDP's
    gradient reduction (every expert's weights are in every step's graph)."""
    run = tmp_path / "run"
    args = ["--data-dir", str(tiny_shards), "--run", str(run), *TRAIN, f"--model.block={MOE}", "--model.moe_experts=64",
            "--model.moe_topk=1", "--train.max_steps=6", "--train.eval_every=3", f"--train.distributed={mode}"]
    proc = subprocess.run([sys.executable, "-m", "gptlab", "train", "--nproc", "2", "-q", *args],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(run)
    assert len(rows) == 6 and all(r["aux_loss"] for r in rows)
    assert load_config(run / "config.toml").model.block == MOE
