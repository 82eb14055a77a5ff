"""Shape traces (gptlab.lab.trace, `gptlab model trace`): every module of a model with the shapes it took in
and gave out, in the order they ran, its parameters; for every part and layout; from a preset, a TOML file
or a run directory; bad input is one line."""

import json

import pytest
import torch

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.lab import format_trace, trace, trace_model
from gptlab.model import GPT
from gptlab.model.moe import ExpertWeights

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(vocab_size=100, n_layer=2, d_model=64, n_head=4, context_length=32)
F32 = "float32"


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def idx(B=2, T=16):
    return torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(0))


def by_name(rows):
    return {row.name: row for row in rows}


def by_name_json(rows):
    return {row["name"]: row for row in rows}


def test_every_module_with_its_shapes_and_parameters():
    model = tiny(n_kv_head=2)
    rows = trace(model, idx())
    assert [row.name for row in rows][0] == "" and {row.name for row in rows} == {n for n, _ in model.named_modules()}
    row = by_name(rows)
    assert row[""].inputs == ["[2, 16] int64"] and row[""].outputs == ["[2, 16, 100] float32", "None"]
    assert row["tok_emb"].outputs == [f"[2, 16, 64] {F32}"]
    assert row["blocks.0"].inputs == [f"[2, 16, 64] {F32}", "Context"] and row["blocks.0"].outputs == [f"[2, 16, 64] {F32}"]
    assert row["blocks.1.attn"].outputs == [f"[2, 16, 64] {F32}"]
    assert row["blocks.1.attn.qkv"].outputs == [f"[2, 16, {64 + 2 * 2 * 16}] {F32}"]  # Q, then K and V of 2 heads
    assert row["blocks.0.mlp.fc"].outputs == [f"[2, 16, 256] {F32}"]
    assert row["lm_head"].outputs == [f"[2, 16, 100] {F32}"]
    # parameters: each counted once (the tied head holds none of its own), containers sum what is under them
    assert sum(r.params for r in rows) == model.num_params() == row[""].total
    assert row["lm_head"].params == 0 and row["lm_head"].tied == ["tok_emb.weight"]
    assert row["blocks.0.attn"].total == 64 * 128 + 64 * 64 and row["blocks.0.attn"].params == 0
    assert row["blocks"].total == sum(row[f"blocks.{i}"].total for i in range(2))
    assert row["blocks"].calls == 0 and row["blocks"].ran_inside  # a ModuleList never runs itself


def test_rows_follow_the_order_modules_run():
    rows = trace(tiny(block="post"), idx())
    block = [row.name for row in rows if row.name.startswith("blocks.0.") and row.depth == 3]
    assert block == ["blocks.0.attn", "blocks.0.norm1", "blocks.0.mlp", "blocks.0.norm2"]  # registered: norms first
    top = [row.name for row in rows if row.depth == 1]
    assert top[:2] == ["tok_emb", "drop"] and top.index("blocks") < top.index("norm_f") < top.index("lm_head")


@pytest.mark.parametrize(
    "parts",
    [
        {"block": "pre", "position": "learned", "norm": "layernorm", "bias": True},
        {"block": "post", "mlp": "swiglu"},
        {"block": "sandwich", "norm": "cosinenorm", "qk_norm": True},
        {"block": "parallel", "position": "sinusoidal"},
        {"block": "Norm->Attn->+->Norm->KAN->+"},
        {"block": "Norm->Attn->+->Norm->CrossAttn->+->Norm->MLP->+"},
        {"block": "Norm->Attn->+->Norm->MoE->+", "moe_experts": 4, "moe_topk": 2},
        {"block": ["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"], "moe_experts": 2, "moe_topk": 1},
    ],
)
def test_every_part_and_layout(parts):
    model = tiny(**parts)
    rows = trace(model, idx(T=8))
    row = by_name(rows)
    for i in range(2):
        assert row[f"blocks.{i}"].inputs[0] == row[f"blocks.{i}"].outputs[0] == f"[2, 8, 64] {F32}"
    read_not_run = {name for name, module in model.named_modules() if isinstance(module, ExpertWeights)}
    for name, module in model.named_modules():  # every module that holds weights ran (a CrossAttn: on a zero memory)
        if next(module.parameters(recurse=False), None) is not None and name not in read_not_run:
            assert row[name].calls >= 1, name
    if "CrossAttn" in str(parts["block"]):
        assert row[""].inputs == ["[2, 8] int64", f"memory=[2, 8, 64] {F32}"]
        assert row["blocks.0.cross_attn.kv"].outputs == [f"[2, 8, 128] {F32}"]
    if "KAN" in str(parts["block"]):
        hidden = model.blocks[0].kan.hidden
        assert row["blocks.0.kan.fc"].outputs == [f"[2, 8, {hidden}] {F32}"]
    assert sum(r.params for r in rows) == model.num_params()
    text = format_trace(rows)
    assert len(text.splitlines()) == len(rows) + 1
    # only fixed position tables (RoPE's, sinusoids), read by indexing, are never run
    not_run = [line.split()[0] for line in text.splitlines() if "(not run)" in line]
    # ... and a MoE's stacked expert weights, which it reads by slicing
    expected = [name.split(".")[-1] for name in read_not_run] + ([] if model.cfg.position == "learned" else ["positions"])
    assert sorted(not_run) == sorted(expected)


def test_depth_limits_the_tree_not_the_totals():
    model = tiny()
    everything = trace(model, idx())
    rows = trace(model, idx(), depth=2)
    assert max(row.depth for row in rows) == 2 and {row.name for row in rows} == {r.name for r in everything if r.depth <= 2}
    assert by_name(rows)["blocks.0"].total == by_name(everything)["blocks.0"].total
    assert [row.name for row in trace(model, idx(), depth=0)] == [""]


def test_the_model_is_left_as_it_was():
    model = tiny().train()
    trace(model, idx())
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_trace_model_defaults_to_batch_2_and_up_to_16_tokens():
    row = by_name(trace_model(ModelConfig(**TINY)))
    assert row[""].inputs == ["[2, 16] int64"]
    row = by_name(trace_model(ModelConfig(**{**TINY, "context_length": 8}), batch_size=3))
    assert row[""].inputs == ["[3, 8] int64"]


# --------------------------------------------------------------------------- the command


def test_cli_preset_with_depth_and_overrides(capsys):
    assert main(["model", "trace", "tiny-1m", "--depth", "3", "--model.block=parallel", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-1m: 4 layers x 128") and "parallel" in out.splitlines()[0]
    lines = out.splitlines()[2:]
    assert lines[0].split() == ["module", "class", "input", "output", "params", "total"]
    assert any(line.split()[:2] == ["attn", "Attention"] and "[2, 8, 128] float32" in line for line in lines)
    assert not any(line.split()[0] == "qkv" for line in lines[1:])  # depth 4
    assert "1,311,872" in lines[1]  # the model's parameters


def test_cli_toml_and_json(tmp_path, capsys):
    toml = tmp_path / "model.toml"
    toml.write_text('[model]\npreset = "aurelius-845k"\nn_layer = 2\n')
    assert main(["model", "trace", str(toml), "--json", "--batch-size", "1", "--depth", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["kind"] == "GPT" and rows[0]["inputs"] == ["[1, 16] int64"]
    assert [r["name"] for r in rows if r["depth"] == 2] == ["blocks.0", "blocks.1"]  # sinusoids: no submodules
    assert by_name_json(rows)["blocks.0"]["inputs"] == ["[1, 16, 80] float32", "Context"]
    assert rows[0]["total"] == rows[0]["params"] + sum(r["total"] for r in rows if r["depth"] == 1)


def test_cli_run_directory(make_export_run, capsys):
    run = make_export_run("trace-run", block="sandwich")
    assert main(["model", "trace", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["module", "class"]  # -q: no title line
    assert any(line.split()[:2] == ["norm4", "RMSNorm"] for line in out.splitlines())  # the run's sandwich blocks
    assert main(["model", "info", str(run), "--batch-size", "3"]) == 0  # info reads run directories the same way
    out = capsys.readouterr().out
    assert "2 layers x 32" in out and "block sandwich" in out and "batch 3 x 64" in out


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["model", "trace", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "gptlab model trace tiny-1m --depth 3" in out and "--json" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs/no-such-run"], "no such file or run directory: runs/no-such-run"),
        (["missing.toml"], "config file not found: missing.toml"),
        (["gpt5"], "unknown model preset 'gpt5'"),
        (["tiny-1m", "--depth", "-1"], "--depth -1 is negative"),
        (["tiny-1m", "--batch-size", "0"], "--batch-size 0 is not a batch"),
        (["tiny-1m", "--seq-len", "300"], "sequence of 300 tokens is longer than model.context_length=256"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["model", "trace", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
