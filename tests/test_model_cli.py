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


def test_info_prices_the_setup_the_flags_give(capsys):
    base = ["model", "info", "tiny-4m", "--model.vocab_size=4096", "--batch-size", "16", "--precision", "bf16"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    header = plain.split("training memory")[1].splitlines()[1].split()
    assert "micro-batch 16 x 256, AdamW, eager, cpu" in plain and header == ["bf16", "autocast"]  # one column
    assert main([*base, "--optimizer", "muon", "--checkpointing"]) == 0
    lean = capsys.readouterr().out
    assert "Muon + AdamW state" in lean and "activation checkpointing" in lean

    def mib(out, row):
        value, unit = re.search(rf"{row}.*?\s+([\d.]+) (MiB|GiB)", out).groups()
        return float(value) * (1024 if unit == "GiB" else 1)

    assert mib(lean, "activations") < mib(plain, "activations") / 2  # only the blocks' inputs and one block
    assert mib(lean, r"Muon \+ AdamW state") < mib(plain, "AdamW moments")  # one buffer a block matrix, not two


def test_info_per_process_on_gpus(capsys):
    args = ["model", "info", "gpt2-124m", "--batch-size", "64", "--device", "cuda", "--nproc", "8", "--grad-accum", "2"]
    assert main([*args, "--distributed", "fsdp"]) == 0
    fsdp = capsys.readouterr().out
    assert "micro-batch 8 x 1,024, grad-accum 2" in fsdp and "8 processes (FSDP), per process, CUDA" in fsdp
    assert "batch 128 x 1024 = 131,072 tokens" in fsdp  # a step: batch_size x grad_accum
    assert "total (peak, per process)" in fsdp and "CUDA context" in fsdp
    assert main([*args, "--distributed", "ddp"]) == 0
    ddp = capsys.readouterr().out
    weights = [re.search(r"weights \(\+ bf16 copies\)\s+([\d.]+) MiB", out).group(1) for out in (fsdp, ddp)]
    # each FSDP process holds a shard, plus two blocks and the embeddings gathered
    assert float(weights[0]) < 0.6 * float(weights[1])
