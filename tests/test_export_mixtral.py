"""MoE runs leave as Mixtral: transformers' MixtralForCausalLM computes their logits, `gptlab import` brings one
back (gptlab's or transformers' own), GGUF carries its experts to llama.cpp, and what Mixtral cannot express
is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import main
from gptlab.export import export_gguf, export_hf, import_hf
from gptlab.export.families import FAMILIES, Llama
from gptlab.runs import load_run

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("single_thread")

MOE = "Norm->Attn->+->Norm->MoE->+"
MIXTRAL = dict(norm="rmsnorm", position="rope", mlp="swiglu", block=MOE, moe_experts=4, moe_topk=2)
TEXT = "Once upon a time there was a little cat named Tom. One day, Lily found a red ball!"

VARIANTS = {
    "mixtral-gqa-untied": dict(MIXTRAL, n_kv_head=2, tie_embeddings=False),
    "mixtral-geglu-top1-expert-width-capacity": dict(MIXTRAL, mlp="geglu", moe_experts=3, moe_topk=1, moe_d_ff=40,
                                                     moe_capacity=1.0, rope_theta=500.0),
}


def _logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_computes_the_logits_of_an_exported_moe(make_export_run, tmp_path, name):
    run = make_export_run(name, **VARIANTS[name])
    result = export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert result["architecture"] == "MixtralForCausalLM" == config["architectures"][0]
    ours, tokenizer, cfg = load_run(run)
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (cfg.model.moe_experts, cfg.model.moe_topk)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()

    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    ours_logits, theirs_logits = _logits(ours.eval(), ids), _logits(theirs, ids)
    assert ours_logits.std() > 0.5  # far from uniform, so agreement means something
    torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-4, rtol=0)


def test_an_exported_moe_imports_back_exactly(make_export_run, tmp_path):
    run = make_export_run("mixtral-gqa-untied", **VARIANTS["mixtral-gqa-untied"])
    export_hf(run, tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert result["architecture"] == "MixtralForCausalLM"
    original, _, original_cfg = load_run(run)
    imported, _, cfg = load_run(tmp_path / "imported")
    m = cfg.model
    assert (m.block, m.moe_experts, m.moe_topk, m.moe_shared) == (MOE, 4, 2, 0)
    assert m.moe_aux_weight == pytest.approx(original_cfg.model.moe_aux_weight)
    a, b = original.state_dict(), imported.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_mixtral_saved_by_transformers_imports_with_its_logits(make_export_run, tmp_path):
    """A Mixtral of transformers' own making (its defaults: rope_theta 1e6, untied, no head_dim), with the
    tokenizer of an exported run."""
    run = make_export_run("mixtral-gqa-untied", **VARIANTS["mixtral-gqa-untied"])
    export_hf(run, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=24,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                        num_local_experts=5, num_experts_per_tok=3, max_position_embeddings=64,
                                        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    theirs = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norms away from the identity
    theirs.save_pretrained(tmp_path / "native")
    tokenizer.save_pretrained(tmp_path / "native")

    assert main(["import", "hf", str(tmp_path / "native"), "--run", str(tmp_path / "run")]) == 0
    ours, our_tokenizer, cfg = load_run(tmp_path / "run")
    assert (cfg.model.moe_experts, cfg.model.moe_topk, cfg.model.rope_theta) == (5, 3, 1e6)
    ids = [our_tokenizer.eos_id, *our_tokenizer.encode(TEXT)]
    ours_logits = _logits(ours.eval(), ids)
    assert ours_logits.std() > 0.5
    torch.testing.assert_close(_logits(theirs, ids), ours_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,model,blocker", [
    ("moe-shared", dict(MIXTRAL, moe_shared=1), "model.moe_shared=1 cannot be expressed by Mixtral"),
    ("moe-layernorm", dict(MIXTRAL, norm="layernorm"), "model.norm=layernorm cannot be expressed by Mixtral"),
    ("moe-arctic", dict(MIXTRAL, block=["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"]), "(its MoE)"),
])
def test_what_mixtral_cannot_express_is_one_line(make_export_run, tmp_path, capsys, name, model, blocker):
    run = make_export_run(name, **model)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert blocker in err and "Mixtral" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_dense_families_name_the_moe_part():
    from gptlab.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_head=4, **MIXTRAL)
    for family in FAMILIES:
        if family.name != "Mixtral":
            assert any("(its MoE)" in b for b in family.blockers(cfg)), family.name
    assert not [f for f in FAMILIES if f.name == "Mixtral"][0].blockers(cfg)
    assert Llama().blockers(cfg)[0] == f"model.block={MOE} (its MoE)"


# --------------------------------------------------------------------------- GGUF


def _moe_ffn(h, w, i, k):
    """llama.cpp's build_moe_ffn for Mixtral: softmax over the experts, top k, weights renormalised, SwiGLU experts."""
    probs = (h @ w[f"blk.{i}.ffn_gate_inp.weight"].T).softmax(-1)
    top, chosen = probs.topk(k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    gate, up, down = (w[f"blk.{i}.ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))  # [E, out, in]
    out = torch.zeros_like(h)
    for t in range(h.size(0)):
        for weight, e in zip(top[t], chosen[t]):
            out[t] += weight * ((F.silu(gate[e] @ h[t]) * (up[e] @ h[t])) @ down[e].T)
    return out


def test_gguf_carries_the_experts(make_export_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    run = make_export_run("mixtral-gqa-untied", **VARIANTS["mixtral-gqa-untied"])
    export_gguf(run, tmp_path / "moe.gguf")
    gpt, tokenizer, cfg = load_run(run)
    m = cfg.model
    reader = gguf.GGUFReader(tmp_path / "moe.gguf")
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.expert_count"], meta["llama.expert_used_count"], meta["llama.feed_forward_length"]) == (4, 2, m.ff_dim)
    w = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert tuple(w["blk.0.ffn_gate_exps.weight"].shape) == (4, m.ff_dim, m.d_model)
    assert tuple(w["blk.1.ffn_down_exps.weight"].shape) == (4, m.d_model, m.ff_dim)
    assert tuple(w["blk.0.ffn_gate_inp.weight"].shape) == (4, m.d_model)
    assert not any(".ffn_gate.weight" in name or ".ffn_up.weight" in name for name in w)

    # the experts read back, run as llama.cpp runs them, give the MoE part's output
    moe = gpt.blocks[1].moe.eval()
    h = torch.randn(6, m.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = moe(h[None], None)[0]
    torch.testing.assert_close(_moe_ffn(h, w, 1, m.moe_topk), expected, atol=1e-5, rtol=1e-5)


def test_llamacpp_runs_the_exported_moe(make_export_run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    run = make_export_run("mixtral-gqa-untied", **VARIANTS["mixtral-gqa-untied"])
    export_gguf(run, tmp_path / "moe.gguf")
    gpt, tokenizer, cfg = load_run(run)
    llm = llama_cpp.Llama(str(tmp_path / "moe.gguf"), n_ctx=cfg.model.context_length, n_threads=1,
                          n_batch=cfg.model.context_length, logits_all=True, verbose=False, seed=0)
    ids = [tokenizer.eos_id, *tokenizer.encode("Once upon a time there was")]
    llm.eval(ids)
    ours = _logits(gpt.eval(), ids)[0].numpy()
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - ours).max() < 1e-2  # float32 both; summation order differs


def test_gguf_refuses_geglu_experts(make_export_run, tmp_path, capsys):
    run = make_export_run("mixtral-geglu", **dict(MIXTRAL, mlp="geglu"))
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.mlp=geglu" in err and len(err.splitlines()) == 1
