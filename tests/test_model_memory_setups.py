"""The memory estimator's setups against what PyTorch really holds, on tiny models (CPU): Muon's and AdamW's
optimizer state, activation checkpointing (what autograd keeps, and that it changes no number), and the
per-process terms of DDP and FSDP."""

from dataclasses import replace

import pytest
import torch

from gptlab.config import ModelConfig, TrainConfig, load_config
from gptlab.model import GPT, activation_bytes
from gptlab.model.info import TrainingSetup, memory_parts
from gptlab.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


def tiny(**parts) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 512, "n_layer": 2, "d_model": 64, "n_head": 4, "context_length": 64, **parts})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("parts", [{}, {"mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False, "bias": True}])
def test_optimizer_state_is_what_the_optimizer_keeps(optimizer, parts):
    cfg = tiny(**parts)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer), CPU)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    model(x, x)[1].backward()
    opt.step()
    kept = sum(t.nbytes for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    predicted = memory_parts(cfg, TrainingSetup(batch_size=2, optimizer=optimizer))["optimizer"]
    assert predicted == pytest.approx(kept, rel=0.03)
    if optimizer == "muon":  # one momentum for the blocks' matrices: well under AdamW's two moments
        assert predicted < 0.8 * memory_parts(cfg, TrainingSetup(batch_size=2))["optimizer"]


def saved_for_backward(model: GPT, x: torch.Tensor) -> dict:
    """Bytes of the distinct storages autograd keeps from one forward pass (weights aside): outside the blocks,
    the blocks' inputs (what a checkpointed block keeps to run again), and each block's own (its activations,
    which a checkpointed block makes again in backward, one block at a time)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    outside, inputs, blocks, running = {}, {}, [{} for _ in model.blocks], []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            (blocks[running[-1]] if running else outside)[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            storage = args[0].untyped_storage()
            inputs[storage.data_ptr()] = storage.nbytes()
            running.append(i)
        return hook

    def leave(module, args, output):
        running.pop()  # returns None: a forward hook's result would replace the block's output

    hooks = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(model.blocks)]
    hooks += [block.register_forward_hook(leave) for block in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    for hook in hooks:
        hook.remove()
    kept = {**outside, **inputs, **{k: v for block in blocks for k, v in block.items()}}
    own = [sum(v for k, v in block.items() if k not in inputs) for block in blocks]
    return {"kept": sum(kept.values()), "outside": outside, "inputs": inputs, "blocks": own}


@pytest.mark.parametrize("parts", [{}, {"mlp": "swiglu", "n_kv_head": 2}, {"n_layer": 4, "attention": "plain"}])
def test_checkpointing_keeps_block_inputs_and_one_block(parts):
    cfg = tiny(d_model=128, context_length=128, **parts)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (4, cfg.context_length))
    whole = saved_for_backward(model, x)
    model.checkpointing = True
    checkpointed = saved_for_backward(model, x)
    # a checkpointed block keeps nothing through autograd's hooks inside it; checkpoint() itself saves its
    # inputs, outside the block, and they are what it runs again from
    assert not any(checkpointed["blocks"]) and set(checkpointed["inputs"]) <= set(checkpointed["outside"])
    # at its peak backward holds what the checkpointed forward kept plus one block's own activations again
    peak = sum(checkpointed["outside"].values()) + max(whole["blocks"])
    assert peak < 0.6 * whole["kept"]
    # the estimate is high by what it counts outside the blocks for the plain loss (the logits, ~1 MiB
    # here), a larger share of a checkpointed model's few activations than of a whole one's
    estimate = activation_bytes(cfg, batch_size=4, bytes_per_value=4, checkpointing=True)
    assert 0.8 < estimate / peak < 1.25
    assert 0.75 < activation_bytes(cfg, batch_size=4, bytes_per_value=4) / whole["kept"] < 1.3


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_changes_no_loss_and_no_gradient(dropout):
    cfg = tiny(dropout=dropout)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    results = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG in its second run)
        _, loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_checkpointing_is_set_from_the_config(tmp_path):
    cfg = load_config(None, ["--train.checkpointing=true"])
    assert cfg.train.checkpointing
    from gptlab.model.info import setup_for

    assert setup_for(cfg, "cpu").checkpointing


def per_process(cfg: ModelConfig, n: int, distributed: str) -> dict:
    return memory_parts(cfg, TrainingSetup(batch_size=4, processes=n, distributed=distributed))


def test_fsdp_shards_what_ddp_copies():
    cfg = load_config(None, ["--model.preset=tiny-16m", "--model.vocab_size=4096"]).model  # 15.7M parameters
    with torch.device("meta"):
        model = GPT(cfg)
    params = model.num_params()
    assert params > 10e6
    one = memory_parts(cfg, TrainingSetup(batch_size=4))
    for n in (4, 8):
        ddp, fsdp = per_process(cfg, n, "ddp"), per_process(cfg, n, "fsdp")
        assert fsdp["total"] < ddp["total"]
        # DDP: a whole model a process, and a flat copy of the gradients being averaged
        assert (ddp["weights"], ddp["optimizer"], ddp["gradients"]) == (one["weights"], one["optimizer"], 2 * one["gradients"])
        # FSDP: 1/n of the weights and of the optimizer state, the same activations as DDP
        assert fsdp["optimizer"] == one["optimizer"] // n
        assert fsdp["activations"] == ddp["activations"] == one["activations"]
        assert fsdp["weights"] < one["weights"]
    # twice the processes: the shards halve, what is gathered (a block or two, the embeddings) stays
    four, eight = per_process(cfg, 4, "fsdp"), per_process(cfg, 8, "fsdp")
    assert four["weights"] - eight["weights"] == pytest.approx(4 * params / 8, abs=8)
    assert four["total"] > eight["total"]
    # one process is no distribution at all
    assert per_process(cfg, 1, "fsdp") == one == per_process(cfg, 1, "ddp")


def test_fsdp_on_cuda_gathers_in_the_compute_dtype():
    cfg = load_config(None, ["--model.preset=tiny-16m", "--model.vocab_size=4096"]).model
    setup = TrainingSetup(batch_size=4, device="cuda", processes=8, distributed="fsdp")
    fp32, bf16 = memory_parts(cfg, setup), memory_parts(cfg, replace(setup, precision="bf16"))
    assert bf16["weights"] < fp32["weights"] and bf16["total"] < fp32["total"]
