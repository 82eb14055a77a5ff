"""LoRA on its own: adapters start as the identity, merge into plain weights, and leave only themselves and
the embedding to train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab.model import build_model
from gptlab.model.lora import LoRALinear, adapter_state, add_adapters, load_adapter_state, merged_weights
from gptlab.runs import unique_tensors


@pytest.fixture
def model(tiny_model_config, single_thread):
    torch.manual_seed(0)
    return build_model(tiny_model_config.model_copy(update={"mlp": "swiglu"}))


def test_adapters_start_as_the_base_model_and_train_only_themselves_and_the_embedding(model):
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(x)[0]
    add_adapters(model, rank=4, alpha=8)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert adapted == [f"blocks.{i}.{part}" for i in range(2) for part in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    with torch.no_grad():
        assert torch.equal(model(x)[0], want)  # B = 0: exactly the base model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"tok_emb.weight", *(f"{n}.lora_{ab}" for n in adapted for ab in "AB")}
    model.train()
    model(x, x)[1].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


def test_merged_weights_are_a_plain_model_computing_the_same(model, tiny_model_config):
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    add_adapters(model, rank=2, alpha=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)  # as training leaves them
                h = torch.randn(2, 5, m.in_features)
                torch.testing.assert_close(m(h), F.linear(h, m.merged_weight()), atol=1e-5, rtol=1e-5)
        want = model(x)[0]
    plain = build_model(model.cfg)
    merged = merged_weights(model, unique_tensors(model))
    assert not any("lora" in k for k in merged)
    plain.load_weights(merged)  # strict: exactly the plain model's names and shapes
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x)[0], want, atol=1e-5, rtol=1e-5)


def test_adapter_state_restores_the_frozen_weights_and_the_adapters(model, tiny_model_config):
    add_adapters(model, rank=2, alpha=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    state = adapter_state(model)
    other = add_adapters(build_model(model.cfg), rank=2, alpha=4)
    load_adapter_state(other, state)
    for name, m in other.named_modules():
        if isinstance(m, LoRALinear):
            original = model.get_submodule(name)
            assert all(torch.equal(getattr(m, k), getattr(original, k)) for k in ("weight", "lora_A", "lora_B"))
