"""`gptlab model info`: a preset or a TOML config in, a table of parameters, FLOPs and memory out."""

import re

import pytest

from gptlab.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_info_of_a_preset(capsys):
    assert main(["model", "info", "gpt2-124m", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "12 layers x 768" in out and "vocab 50,257" in out
    assert "124.44M" in out  # parameters
    assert re.search(r"batch 8 x 1024 = 8,192 tokens", out)
    for row in ["weights", "gradients", "AdamW moments", "activations (estimate)", "total"]:
        assert row in out


def test_info_of_a_config_file_with_overrides(tmp_path, capsys):
    toml = tmp_path / "model.toml"
    toml.write_text('[model]\npreset = "aurelius-845k"\nn_layer = 3\n[train]\nbatch_size = 4\n')
    assert main(["model", "info", str(toml), "--model.d_model=64"]) == 0
    out = capsys.readouterr().out
    assert "3 layers x 64" in out and "block post: Attn->+->Norm->=" in out and "batch 4 x 512" in out


def test_vocab_comes_from_the_tokenizer_section(capsys):
    assert main(["model", "info", "tiny-4m", "--tokenizer.vocab_size=8192"]) == 0
    assert "vocab 8,192" in capsys.readouterr().out
    assert main(["model", "info", "tiny-4m", "--tokenizer.kind=gpt2"]) == 0
    assert "vocab 50,257" in capsys.readouterr().out


def test_list_presets(capsys):
    assert main(["model", "info", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert "gpt2.5-124m" in names and "defaultgpt-0.5m-tall-skinny" in names


@pytest.mark.parametrize(
    "args, message",
    [
        (["model", "info", "gpt5"], "unknown model preset 'gpt5'"),
        (["model", "info", "missing.toml"], "config file not found: missing.toml"),
        (["model", "info", "tiny-1m", "--model.n_head=3"], "model.n_head=3 does not divide model.d_model=128"),
        (["model", "info", "tiny-1m", "--tokenizer.kind=char"], "pass --model.vocab_size"),
        (["model", "info", "tiny-1m", "--batch-size", "0"], "train.batch_size = 0 is not allowed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
