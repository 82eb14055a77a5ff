"""`gptlab export RUN --gguf FILE`: read back with gguf.GGUFReader, and run the way llama.cpp would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_copy_with

from gptlab.cli import main
from gptlab.config import TokenizerConfig
from gptlab.export import export_gguf
from gptlab.runs import load_run
from gptlab.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
TEXT = "Once upon a time there was a little cat named Tom."


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


# the feed-forward of each llama.cpp architecture gptlab writes: llama (SwiGLU), arcee (up -> relu^2 -> down)
LLAMACPP_MLP = {
    "llama": lambda h, b: (F.silu(h @ b("ffn_gate").T) * (h @ b("ffn_up").T)) @ b("ffn_down").T,
    "arcee": lambda h, b: F.relu(h @ b("ffn_up").T).square() @ b("ffn_down").T,
}


def llamacpp_forward(meta: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits as llama.cpp's llama (or arcee) graph computes them: RMSNorm, RoPE on interleaved pairs
    (x[2i], x[2i+1]) with the file's base, grouped-query causal attention, the architecture's MLP;
    output.weight or, if absent, token_embd."""
    arch = meta["general.architecture"]
    meta = {k.removeprefix(f"{arch}."): v for k, v in meta.items()}
    H, K, C = meta["attention.head_count"], meta["attention.head_count_kv"], meta["rope.dimension_count"]
    eps, base = meta["attention.layer_norm_rms_epsilon"], meta["rope.freq_base"]
    T = len(ids)

    def rms(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    def rope(x):  # [T, heads, C]
        angle = torch.arange(T)[:, None] * base ** (-torch.arange(0, C, 2) / C)  # [T, C/2]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    x = w["token_embd.weight"][ids]
    for i in range(meta["block_count"]):
        b = lambda name, i=i: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = rms(x, b("attn_norm"))
        q, k, v = (h @ b(n).T for n in ("attn_q", "attn_k", "attn_v"))
        q, k, v = rope(q.view(T, H, C)), rope(k.view(T, K, C)), v.view(T, K, C)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + att.transpose(0, 1).reshape(T, H * C) @ b("attn_output").T
        h = rms(x, b("ffn_norm"))
        x = x + LLAMACPP_MLP[arch](h, b)
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("name,model,arch", [
    ("gguf-gqa-untied", dict(LLAMA, n_kv_head=2, tie_embeddings=False, rope_theta=500.0), "llama"),
    ("gguf-mha-tied-headsize", dict(LLAMA, head_size=16, norm_eps=1e-6), "llama"),
    ("arcee-relu2-gqa", dict(norm="rmsnorm", position="rope", mlp="relu2", n_kv_head=2), "arcee"),
])
def test_gguf_reads_back_and_computes_the_same_logits(make_export_run, tmp_path, name, model, arch, single_thread):
    run = make_export_run(name, **model)
    path = tmp_path / "model.gguf"
    export_gguf(run, path)
    gpt, tokenizer, cfg = load_run(run)
    m = cfg.model
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)

    assert meta["general.architecture"] == arch
    expected = {
        f"{arch}.context_length": m.context_length, f"{arch}.embedding_length": m.d_model, f"{arch}.block_count": m.n_layer,
        f"{arch}.feed_forward_length": m.ff_dim, f"{arch}.attention.head_count": m.n_head,
        f"{arch}.attention.head_count_kv": m.kv_heads, f"{arch}.rope.dimension_count": m.head_dim,
        f"{arch}.vocab_size": tokenizer.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.eos_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.add_bos_token": True,  # the defaults put EOS between documents: a prompt starts after it
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(m.rope_theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(m.norm_eps)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.eos_id] == "<|endoftext|>"
    assert [tokenizer.token_to_id(t) for t in tokens] == list(range(tokenizer.vocab_size))
    assert meta["tokenizer.ggml.token_type"][tokenizer.eos_id] == int(gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1

    weights = _tensors(reader)
    per_block = {"attn_norm": (m.d_model,), "attn_q": (m.n_head * m.head_dim, m.d_model),
                 "attn_k": (m.kv_heads * m.head_dim, m.d_model), "attn_v": (m.kv_heads * m.head_dim, m.d_model),
                 "attn_output": (m.d_model, m.n_head * m.head_dim), "ffn_norm": (m.d_model,),
                 "ffn_gate": (m.ff_dim, m.d_model), "ffn_up": (m.ff_dim, m.d_model), "ffn_down": (m.d_model, m.ff_dim)}
    if arch == "arcee":  # no gate: up -> relu^2 -> down
        del per_block["ffn_gate"]
    shapes = {"token_embd.weight": (m.vocab_size, m.d_model), "output_norm.weight": (m.d_model,)}
    shapes |= {f"blk.{i}.{n}.weight": s for i in range(m.n_layer) for n, s in per_block.items()}
    if not m.tie_embeddings:
        shapes["output.weight"] = (m.vocab_size, m.d_model)
    assert {n: tuple(t.shape) for n, t in weights.items()} == shapes

    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    with torch.no_grad():
        ours = gpt(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(llamacpp_forward(meta, weights, ids), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,model,message,fix", [
    ("gpt2-bias-tied", dict(norm="layernorm", position="learned", mlp="gelu", bias=True), "GPT-2-shaped",
     "train with --model.norm=rmsnorm --model.position=rope --model.mlp=swiglu"),
    ("gguf-bias", dict(LLAMA, bias=True), "model.bias=true", "train with --model.bias=false"),
    ("arcee-gelu", dict(norm="rmsnorm", position="rope", mlp="gelu"), "model.mlp=gelu",
     "train with --model.mlp=swiglu or --model.mlp=relu2"),
    ("gguf-geglu", dict(LLAMA, mlp="geglu"), "model.mlp=geglu", "train with --model.mlp=swiglu"),
    ("refused-block", dict(norm="layernorm", block="post", position="sinusoidal", mlp="relu", bias=True),
     "model.block=post", None),
])
def test_gguf_refuses_what_llamacpp_cannot_run(make_export_run, tmp_path, capsys, name, model, message, fix):
    """One line naming the setting that blocks, and the setting to train with instead."""
    run = make_export_run(name, **model)
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert fix is None or (fix in err and "--to hf" in err)
    assert list(tmp_path.iterdir()) == []


def test_gguf_refuses_a_char_tokenizer_and_an_existing_file(make_export_run, tmp_path, tiny_corpus_text, capsys):
    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="char"))
    assert main(["export", str(make_export_run("gguf-char", tokenizer=tok, **LLAMA)), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "char tokenizer" in err and "--tokenizer.kind=bpe" in err
    run = str(make_export_run("gguf-mha-tied-headsize", **dict(LLAMA, head_size=16, norm_eps=1e-6)))
    (tmp_path / "m.gguf").write_bytes(b"mine")
    assert main(["export", run, "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "m.gguf").read_bytes() == b"mine"
    assert main(["export", run, "--gguf", str(tmp_path / "m.gguf"), "--force"]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("data,starts_with", [({}, "eos"), ({"add_eos": False}, None), ({"add_bos": True}, "bos")])
def test_gguf_starts_a_prompt_as_gptlab_sample_does(make_export_run, tmp_path, tiny_corpus_text, data, starts_with):
    """llama.cpp puts bos_token_id first when add_bos_token is set: that must be the run's start token, or nothing."""
    from gptlab.generate import start_id

    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="bpe", vocab_size=300, bos_token="<s>"))
    run = run_copy_with(make_export_run("gguf-start-bos", tokenizer=tok, **LLAMA), tmp_path / "run", **data)
    export_gguf(run, tmp_path / "m.gguf")
    meta = _fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    _, tokenizer, cfg = load_run(run)
    start = start_id(tokenizer, cfg.data)
    assert start == {"eos": tokenizer.eos_id, "bos": tokenizer.bos_id, None: None}[starts_with]
    assert meta["tokenizer.ggml.add_bos_token"] == (start is not None)
    assert meta["tokenizer.ggml.bos_token_id"] == (tokenizer.bos_id if start is None else start)
