"""train(on_step=..., on_eval=...): the hooks a sweep prunes and guards memory with; the summary's peak memory."""

import json

import pytest
from helpers import read_metrics, tiny_config

from gptlab.device import free_memory, parse_memory, peak_memory
from gptlab.errors import GptlabError
from gptlab.runs import run_status
from gptlab.train import train


def test_on_eval_sees_each_evaluation_and_its_reason_stops_the_run(tiny_shards, tmp_path):
    seen = []

    def on_eval(step, result):
        seen.append((step, result["loss"]))
        return "pruned" if step >= 4 else None

    summary = train(tiny_config(tiny_shards, tmp_path / "run", "--train.eval_every=2"), on_eval=on_eval, verbose=False)
    assert [step for step, _ in seen] == [2, 4]  # eval_every=2: the run stopped at the second evaluation
    assert summary["stopped"] == "pruned" and summary["steps"] == 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"] == "pruned"
    assert run_status(tmp_path / "run")["reason"] == "pruned"
    assert read_metrics(tmp_path / "run")[-1]["val_loss"] != ""  # the stopping step was evaluated and logged


def test_on_step_reason_stops_after_that_step_with_a_checkpoint(tiny_shards, tmp_path):
    summary = train(tiny_config(tiny_shards, tmp_path / "run"), on_step=lambda step: "out_of_memory" if step == 3 else None,
                    verbose=False)
    assert summary["stopped"] == "out_of_memory" and summary["steps"] == 3
    assert summary["checkpoint"] is not None  # resumable from where it stopped


def test_summary_has_the_process_peak_memory(tiny_shards, tmp_path):
    summary = train(tiny_config(tiny_shards, tmp_path / "run", "--train.max_steps=2"), verbose=False)
    assert 50 * 2**20 < summary["peak_memory"] == pytest.approx(peak_memory(__import__("torch").device("cpu")), rel=0.5)


def test_activation_checkpointing_trains_the_same_model(tiny_shards, tmp_path):
    plain = train(tiny_config(tiny_shards, tmp_path / "plain"), verbose=False)
    recomputed = train(tiny_config(tiny_shards, tmp_path / "ckpt", "--train.checkpointing=true"), verbose=False)
    assert recomputed["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
    assert recomputed["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5)


@pytest.mark.parametrize("text,expected", [("8GB", 8 * 10**9), ("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6),
                                           ("1.5g", 1.5e9), (4096, 4096), ("300mib", 300 * 2**20)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == int(expected)


@pytest.mark.parametrize("text", ["eight", "-1GB", "3XB", "0", ""])
def test_parse_memory_refuses_what_is_not_an_amount(text):
    with pytest.raises(GptlabError, match="--memory .* amount of memory"):
        parse_memory(text, "--memory")


def test_free_memory_is_some_of_the_machine():
    import psutil

    assert 0 < free_memory() <= psutil.virtual_memory().total
