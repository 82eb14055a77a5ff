"""Blocks written as strings (model/blocks.py): the parser, the named layouts, what a string computes."""

import pytest
import torch
from helpers import read_metrics, tiny_config

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache
from gptlab.model import gpt as gpt_module
from gptlab.model.blocks import LAYOUTS, PARTS, block_label, ends_normalised, name_parts, parse_block
from gptlab.runs import load_run

ARCTIC = ["Norm->Attn->+->Norm->MLP->+", "Norm->MLP->+"]  # Snowflake Arctic's shape, with an MLP for its MoE


def model_of(**settings) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, context_length=32, **settings)
    return GPT(cfg).eval()


def test_every_part_the_language_names_is_built_by_the_model():
    assert set(PARTS) == set(gpt_module.PARTS)


def test_named_layouts_are_strings_of_the_same_language():
    for name, text in LAYOUTS.items():
        assert parse_block(name) == parse_block(text)
    assert parse_block("pre") == [["Norm", "Attn", "+", "Norm", "MLP", "+"]]
    assert parse_block(" Norm -> Attn -> + ") == [["Norm", "Attn", "+"]]  # spaces around arrows are fine
    assert parse_block("parallel") == [["Norm", "Attn", "+"], ["Norm", "MLP", "+"]]


def test_pre_and_post_keep_the_module_names_exporters_and_old_checkpoints_use():
    def names(spec):
        return [name for branch in name_parts(parse_block(spec)) for _, name in branch if name]

    assert names("pre") == ["norm1", "attn", "norm2", "mlp"]
    assert names("post") == ["attn", "norm1", "mlp", "norm2"]
    assert names("parallel") == ["norm1", "attn", "norm2", "mlp"]
    assert names("Norm->Attn->+->Norm->Attn->+->Norm->MLP->+") == ["norm1", "attn", "norm2", "attn2", "norm3", "mlp"]
    assert names("Norm->CrossAttn->+") == ["norm1", "cross_attn"]


@pytest.mark.parametrize("spec, where, hint", [
    ("Norm->Atn->+", "Norm->[Atn]->+", "did you mean 'Attn'"),
    ("norm->MLP->+", "[norm]->MLP->+", "did you mean 'Norm'"),
    ("Norm->Attn", "Norm->[Attn]", "end every branch with + "),
    ("+->MLP->+", "[+]->MLP->+", "has no part before it"),
    ("Norm->Attn->+->=", "Norm->Attn->+->[=]", "has no part before it"),
    ("Norm->->MLP->+", "Norm->[]->MLP->+", "empty part"),
    ("paralel", "[paralel]", "did you mean 'parallel'"),
])
def test_a_malformed_string_is_one_line_pointing_at_the_bad_token(spec, where, hint):
    with pytest.raises(GptlabError) as e:
        parse_block(spec)
    message = str(e.value)
    assert where in message and hint in message and "\n" not in message
    assert "Norm, Attn, MLP, MoE, CrossAttn, KAN" in message or "end every branch" in message


def test_an_empty_list_or_a_non_string_branch_is_refused():
    for spec in ([], ["Norm->Attn->+", 3]):
        with pytest.raises(GptlabError):
            parse_block(spec)


def test_a_bad_block_fails_as_the_config_is_read_with_exit_2(capsys):
    assert main(["model", "info", "tiny-1m", "--model.vocab_size=64", "--model.block=Norm->Foo->+->MLP->+"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Norm->[Foo]->+->MLP->+" in err and "Traceback" not in err


def test_configs_saved_with_norm_placement_read_as_the_layout_of_that_name():
    assert ModelConfig(norm_placement="sandwich").block == "sandwich"
    assert ModelConfig.model_validate({"norm_placement": "post", "n_layer": 2}).block == "post"


def _parts(block):
    return {name: module for name, module in block.named_children()}


def test_each_layout_computes_the_formula_its_name_stands_for():
    """The generic Block, run from the layout strings, against each layout's formula written by hand."""
    x = torch.randn(2, 5, 32)
    for layout, formula in {
        "pre": lambda p, x, c: (y := x + p["attn"](p["norm1"](x), c)) + p["mlp"](p["norm2"](y)),
        "post": lambda p, x, c: p["norm2"]((y := p["norm1"](x + p["attn"](x, c))) + p["mlp"](y)),
        "sandwich": lambda p, x, c: (y := x + p["norm2"](p["attn"](p["norm1"](x), c))) + p["norm4"](p["mlp"](p["norm3"](y))),
        "parallel": lambda p, x, c: x + p["attn"](p["norm1"](x), c) + p["mlp"](p["norm2"](x)),
        "arctic": lambda p, x, c: (y := x + p["attn"](p["norm1"](x), c)) + p["mlp"](p["norm2"](y)) + p["mlp2"](p["norm3"](x)),
    }.items():
        model = model_of(block=ARCTIC if layout == "arctic" else layout)
        ctx = gpt_module.Context(torch.arange(5)[None], model.positions.rotation(torch.arange(5)[None]))
        block = model.blocks[0]
        with torch.no_grad():
            torch.testing.assert_close(block(x, ctx), formula(_parts(block), x, ctx), msg=layout)


def test_a_string_equal_to_a_layout_is_that_layout():
    named, written = model_of(block="pre"), model_of(block=LAYOUTS["pre"])
    assert list(named.state_dict()) == list(written.state_dict())
    idx = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(named(idx)[0], written(idx)[0])
    assert block_label(LAYOUTS["pre"]) == "pre: Norm->Attn->+->Norm->MLP->+"
    assert block_label(ARCTIC) == "Norm->Attn->+->Norm->MLP->+ | Norm->MLP->+"


def test_the_final_norm_is_left_out_only_when_the_stream_leaves_a_block_normalised():
    assert ends_normalised(parse_block("post")) and not ends_normalised(parse_block("pre"))
    assert isinstance(model_of(block="post").norm_f, torch.nn.Identity)
    assert isinstance(model_of(block="Norm->Attn->+->Norm->MLP->+->Norm->=").norm_f, torch.nn.Identity)
    assert not isinstance(model_of(block="parallel").norm_f, torch.nn.Identity)


@pytest.mark.parametrize("block", ["post", "sandwich", "parallel", ARCTIC, "Norm->Attn->+->Norm->Attn->+->Norm->MLP->+"])
def test_written_blocks_are_causal_and_cached_generation_equals_the_full_pass(block):
    model = model_of(block=block)
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 64
    with torch.no_grad():
        full, _ = model(idx)
        torch.testing.assert_close(model(changed)[0][:, :8], full[:, :8])  # no position sees a later token
        cache = KVCache(2, 32)
        steps = [model(idx[:, :6], cache=cache)[0][:, -1]]
        for t in range(6, 12):
            steps.append(model(idx[:, t : t + 1], cache=cache.step())[0][:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:12], atol=1e-5, rtol=1e-4)


def test_training_a_parallel_arctic_block_from_the_command_line_lowers_the_loss(tiny_shards, tmp_path, single_thread):
    from gptlab.train.trainer import train

    run = tmp_path / "run"
    cfg = tiny_config(tiny_shards, run, f"--model.block={ARCTIC!r}".replace("'", '"'), "--train.max_steps=30",
                      "--train.eval_every=30")
    train(cfg)
    losses = [float(row["loss"]) for row in read_metrics(run)]
    assert losses[-1] < losses[0] - 0.5
    assert load_run(run)[0].cfg.block == ARCTIC  # the run's saved config reads back as the same list


def test_export_names_the_block_that_no_family_can_express(make_export_run, tmp_path, capsys):
    run = make_export_run("parallel-block", norm="rmsnorm", position="rope", mlp="swiglu", block="parallel")
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.block=parallel" in err and len(err.strip().splitlines()) == 1
