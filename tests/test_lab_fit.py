"""`gptlab model fit`: the answer is the boundary of the memory estimate, and the CLI prints it as overrides."""

import math
import re
from dataclasses import replace

import pytest
import torch

from gptlab.cli import main
from gptlab.config import load_config
from gptlab.errors import GptlabError
from gptlab.lab.fit import fit_batch, fit_model
from gptlab.model.gpt import GPT
from gptlab.model.info import TrainingSetup, memory_parts

MiB = 2**20


def preset(name: str, *overrides: str):
    return load_config(None, [f"--model.preset={name}", "--model.vocab_size=4096", *overrides]).model


def peak(model_cfg, setup: TrainingSetup) -> int:
    return memory_parts(model_cfg, setup)["total"]


def test_batch_is_the_largest_that_fits_and_the_step_keeps_its_tokens():
    model_cfg, setup = preset("tiny-1m"), TrainingSetup(batch_size=64, grad_accum=4)
    memory = 600 * MiB
    fit = fit_batch(model_cfg, setup, memory)
    sequences = 64 * 4
    largest = fit["largest"]
    # the boundary, each micro-batch priced with the accumulation it needs (gradients beside the activations)
    assert 1 < largest < sequences
    assert peak(model_cfg, replace(setup, batch_size=largest, grad_accum=math.ceil(sequences / largest))) <= memory
    assert peak(model_cfg, replace(setup, batch_size=largest + 1, grad_accum=math.ceil(sequences / (largest + 1)))) > memory
    # the answer fits and covers the step's tokens
    assert fit["batch_size"] <= largest and fit["peak"] <= memory
    assert fit["batch_size"] * fit["grad_accum"] >= sequences
    assert fit["tokens_per_step"] >= 64 * 4 * model_cfg.context_length == fit["asked_tokens_per_step"]
    assert fit["overrides"] == [f"--train.batch_size={fit['batch_size']}", f"--train.grad_accum={fit['grad_accum']}"]
    rows = {row["batch"]: row for row in fit["rows"]}
    assert rows[largest]["fits"] and not rows[largest + 1]["fits"] and rows[1]["fits"]


def test_batch_with_room_to_spare_needs_no_accumulation():
    model_cfg = preset("tiny-1m")
    fit = fit_batch(model_cfg, TrainingSetup(batch_size=8), 2**30, tokens_per_step=16 * model_cfg.context_length)
    assert (fit["batch_size"], fit["grad_accum"]) == (16, 1)
    assert fit["largest"] > 16
    assert peak(model_cfg, TrainingSetup(batch_size=fit["largest"] + 1)) > 2**30 >= peak(model_cfg, TrainingSetup(batch_size=fit["largest"]))


def test_batch_per_process_under_data_parallel():
    model_cfg = preset("tiny-1m")
    setup = TrainingSetup(batch_size=16, grad_accum=2, processes=4, distributed="ddp")  # 128 sequences a step
    fit = fit_batch(model_cfg, setup, 600 * MiB)
    assert fit["batch_size"] * fit["grad_accum"] * 4 >= 128
    assert fit["overrides"][0] == f"--train.batch_size={fit['batch_size'] * 4}"  # train.batch_size is over all processes


@pytest.mark.parametrize("scale", ["depth", "width", "both"])
def test_model_grows_to_the_budget(scale):
    model_cfg, setup = preset("defaultgpt-0.5m"), TrainingSetup(batch_size=4)
    memory = 2 * peak(model_cfg, setup)
    fit = fit_model(model_cfg, setup, memory, scale)
    assert fit["peak"] <= memory
    with torch.device("meta"):
        own = GPT(model_cfg).num_params()
    assert fit["parameters"] > own
    if scale == "depth":
        assert fit["d_model"] == model_cfg.d_model and fit["overrides"] == [f"--model.n_layer={fit['n_layer']}"]
    if scale == "width":  # heads of the same size, as many queries per K/V head, the MLP at its ratio
        assert fit["n_layer"] == model_cfg.n_layer and fit["d_model"] > model_cfg.d_model
        assert fit["n_head"] * 16 == 2 * fit["d_model"] and fit["n_head"] == 4 * fit["n_kv_head"]
        assert fit["d_ff"] == 2 * fit["d_model"]
    if scale == "both":
        assert fit["n_layer"] > model_cfg.n_layer and fit["d_model"] > model_cfg.d_model
    # the next candidate does not fit
    rows = {row["size"]: row for row in fit["rows"]}
    assert not rows[fit["size"] + 1]["fits"] and rows[fit["size"] + 1]["peak"] > memory
    assert any(row["config"] for row in fit["rows"])
    # its overrides give the model it priced
    grown = preset("defaultgpt-0.5m", *fit["overrides"])
    assert peak(grown, setup) == fit["peak"]


def test_nothing_fits_says_what_the_smallest_needs():
    with pytest.raises(GptlabError, match=r"micro-batch of 1 x 256 tokens needs .*MiB.*checkpointing"):
        fit_batch(preset("tiny-1m"), TrainingSetup(), 10 * MiB)
    with pytest.raises(GptlabError, match=r"smallest model \(1 layer x 128\) needs"):
        fit_model(preset("tiny-1m"), TrainingSetup(), 10 * MiB, "depth")


def test_cli_prints_the_overrides(capsys):
    assert main(["model", "fit", "tiny-1m", "--model.vocab_size=4096", "--memory", "600MB", "--batch-size", "64",
                 "--grad-accum", "4", "--checkpointing", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^priced: bf16 autocast, micro-batch \d+ x 256, grad-accum \d+, AdamW, eager, activation "
                     r"checkpointing, cpu$", out, re.M)
    batch, accum = map(int, re.search(r"--train.batch_size=(\d+) --train.grad_accum=(\d+)", out).groups())
    assert batch * accum >= 256 and "<- the largest that fits" in out
    assert main(["model", "fit", "defaultgpt-0.5m", "--memory", "1GB", "--scale", "depth", "-q"]) == 0
    assert re.search(r"^  --model.n_layer=\d+$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("flags, message", [
    (["--memory", "8XB"], "--memory '8XB' is not an amount of memory"),
    (["--memory", "10MB"], "nothing fits in 9.5 MiB"),
    (["--memory", "10MB", "--scale", "width"], "nothing fits in 9.5 MiB: the smallest model"),
    (["--tokens-per-step", "0"], "--tokens-per-step 0 is not a count"),
])
def test_cli_errors_are_one_line_exit_2(flags, message, capsys):
    assert main(["model", "fit", "tiny-1m", "--model.vocab_size=4096", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
