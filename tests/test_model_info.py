"""Presets reproduce the seeds' sizes; parameter, FLOP and memory accounting match what PyTorch measures."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gptlab.config import MODEL_PRESETS, ModelConfig, load_config
from gptlab.errors import GptlabError
from gptlab.model import GPT, activation_bytes, model_info

pytestmark = pytest.mark.usefixtures("single_thread")

# (low, high) parameters; the vocabulary where the preset leaves it to the tokenizer
PRESET_SIZES = {
    "gpt2-124m": (124_439_808, 124_439_808),  # Hugging Face's gpt2 has exactly this many
    "gpt2.5-124m": (120e6, 128e6),
    "smollgpt-130m": (125e6, 140e6),
    "aurelius-845k": (0.80e6, 0.89e6),
    "defaultgpt-0.5m": (0.45e6, 0.55e6),
    "defaultgpt-0.5m-short-thick": (0.45e6, 0.55e6),
    "defaultgpt-0.5m-tall-skinny": (0.45e6, 0.55e6),
    "tiny-1m": (0.8e6, 1.5e6),
    "tiny-4m": (3.5e6, 4.5e6),
    "tiny-16m": (14e6, 18e6),
}


def preset(name: str) -> ModelConfig:
    cfg = load_config(None, [f"--model.preset={name}"]).model
    return cfg if cfg.vocab_size else cfg.model_copy(update={"vocab_size": 4096})


def test_every_preset_has_a_stated_size():
    assert set(PRESET_SIZES) == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", sorted(PRESET_SIZES))
def test_preset_parameter_count(name):
    low, high = PRESET_SIZES[name]
    info = model_info(preset(name), batch_size=1)
    assert low <= info["parameters"] <= high
    assert info["parameters"] == info["embedding_parameters"] + info["non_embedding_parameters"]


def test_presets_reproduce_the_seeds_architectures():
    g25 = preset("gpt2.5-124m")
    assert (g25.norm, g25.block, g25.mlp, g25.ff_dim, g25.position, g25.bias) == (
        "rmsnorm", "pre", "swiglu", 2048, "rope", False)
    smoll = preset("smollgpt-130m")
    assert (smoll.n_layer, smoll.n_head, smoll.d_model, smoll.context_length) == (8, 8, 768, 1024)
    aurelius = preset("aurelius-845k")
    assert (aurelius.block, aurelius.position, aurelius.n_layer, aurelius.norm, aurelius.init) == (
        "post", "sinusoidal", 6, "layernorm", "pytorch")
    assert aurelius.vocab_size == 2000
    for name in ["defaultgpt-0.5m", "defaultgpt-0.5m-short-thick", "defaultgpt-0.5m-tall-skinny"]:
        d = preset(name)
        assert d.kv_heads < d.n_head and d.position == "rope" and d.norm == "rmsnorm" and d.mlp == "swiglu"
    thick, tall = preset("defaultgpt-0.5m-short-thick"), preset("defaultgpt-0.5m-tall-skinny")
    assert thick.n_layer < preset("defaultgpt-0.5m").n_layer < tall.n_layer
    assert thick.ff_dim > tall.ff_dim
    t4 = preset("tiny-4m")
    assert (t4.n_layer, t4.d_model, t4.context_length) == (4, 256, 256)


def test_user_keys_win_over_the_preset():
    cfg = load_config(None, ["--model.preset=gpt2-124m", "--model.n_layer=2", "--model.context_length=64"]).model
    assert (cfg.n_layer, cfg.context_length, cfg.d_model) == (2, 64, 768)


def test_num_params_counts_tied_weights_once():
    model = GPT(ModelConfig(vocab_size=100, n_layer=1, d_model=16, n_head=2, position="learned", context_length=8))
    every = sum(p.numel() for p in model.parameters())
    assert model.num_params() == every
    assert model.num_params(non_embedding=True) == every - 100 * 16 - 8 * 16


@pytest.mark.parametrize("parts", [{}, {"mlp": "swiglu", "n_kv_head": 1, "tie_embeddings": False}])
def test_flops_per_token_matches_pytorch_flop_counter(parts):
    """6N + 12 L d T: the matmuls and (full, unmasked) attention of forward + backward. The plain attention
    path, because the counter does not see inside the fused CPU kernel."""
    cfg = ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, context_length=64, attention="plain", **parts)
    model = GPT(cfg)
    x = torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    counted = counter.get_total_flops() / x.numel()
    assert model.flops_per_token() == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize(
    "parts",
    [
        {},
        {"mlp": "swiglu", "n_kv_head": 1},
        {"norm": "layernorm", "position": "learned", "bias": True},
        {"attention": "plain"},
        {"block": "sandwich", "qk_norm": True},
        {"dropout": 0.1},
    ],
)
def test_activation_estimate_is_close_to_what_autograd_keeps(parts):
    cfg = ModelConfig(vocab_size=512, n_layer=2, d_model=128, n_head=4, context_length=128, **parts)
    model = GPT(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, 512, (4, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x)
    estimate = activation_bytes(cfg, batch_size=4, bytes_per_value=4)
    assert 0.75 < estimate / sum(saved.values()) < 1.3


def test_model_info_memory_adds_up():
    info = model_info(preset("tiny-4m"), batch_size=16)
    n = info["parameters"]
    fp32, bf16 = info["memory_bytes"]["fp32"], info["memory_bytes"]["bf16"]
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    # the peak: gradients are set to None between steps, so they and the activations are never all there at once
    v, d = 4096, 256
    forward = fp32["activations"] + fp32["loss"]
    assert fp32["total"] == fp32["weights"] + fp32["optimizer"] + max(forward, fp32["gradients"] + 4 * v * d) + fp32["runtime"] + fp32["process"]
    assert fp32["total"] < sum(v for k, v in fp32.items() if k != "total")
    assert model_info(preset("tiny-4m"), batch_size=16, loss="plain")["memory_bytes"]["fp32"]["loss"] == 0
    assert bf16["activations"] < fp32["activations"]
    assert model_info(preset("tiny-4m"), batch_size=32)["memory_bytes"]["fp32"]["activations"] == pytest.approx(
        2 * fp32["activations"], rel=1e-6
    )
    assert info["flops_per_step"] == info["flops_per_token"] * 16 * 256


def test_model_info_needs_a_vocabulary():
    with pytest.raises(GptlabError, match="vocab_size is not set"):
        model_info(ModelConfig(), batch_size=1)
