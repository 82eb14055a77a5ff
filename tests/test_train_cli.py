"""`gptlab train`, `gptlab sample` and `gptlab quickstart` through gptlab.cli.main."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.quickstart import DEMO_PROMPTS, demo_corpus, quickstart_config

TINY = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context_length=32",
        "--train.batch_size=4", "--train.precision=fp32", "--train.compile=false", "--train.threads=1",
        "--train.peak_flops=1e11", "--train.warmup_steps=2"]


def test_train_sample_and_resume_from_the_command_line(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(tiny_shards), "--run", str(run), "--train.max_steps=3", "--train.eval_every=3", *TINY]) == 0
    printed = capsys.readouterr().out
    startup = [line for line in printed.splitlines() if line.startswith("gptlab train:")]
    assert len(startup) == 1
    for part in ["cpu", "1 threads", "fp32", "compile off", "parameters", "128 tokens/step", "384 tokens to go"]:
        assert part in startup[0]

    assert main(["sample", str(run), "--prompt", "Once", "--max-new-tokens", "6", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once") and len(first) > len("Once\n")
    assert main(["sample", str(run), "--prompt", "Once", "--max-new-tokens", "6", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text

    assert main(["sample", str(run), "-p", "Once", "-p", "The dog", "--num-samples", "2", "-n", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 4 and "of 'The dog'" in out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Lily\n\nThe cat\n", encoding="utf-8")
    assert main(["sample", str(run), "-p", "Once", "--prompt-file", str(prompts), "-n", "3", "-t", "0", "--sample.top_k=none"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1 of 'Once'", "--- sample 1 of 'Lily'", "--- sample 1 of 'The cat'"]

    assert main(["train", "--resume", str(run), "--train.max_steps=5", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("argv, message", [
    (["train", "--resume", "no/such/run"], "run directory not found: no/such/run"),
    (["train", "--resume", ".", "--config", "x.toml"], "--resume continues a run with its own config.toml"),
    (["train", "--data-dir", "no/such/data", "--train.max_steps=1"], "no meta.json"),
    (["sample", "no/such/run"], "run directory not found"),
    (["quickstart", "--config", "x.toml"], "quickstart has its own settings"),
    (["run", "no/such/recipe.toml"], "config file not found: no/such/recipe.toml"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_quickstart_runs_every_stage_and_a_rerun_reuses_them(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--data", str(tiny_corpus), "--minutes", "0.01", "--out", str(out), *TINY,
            "--tokenizer.vocab_size=300", "--data.val_fraction=0.34", "--data.workers=1", "--sample.max_new_tokens=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/4] tokenizer" in printed and "[4/4] samples" in printed
    for name in ["tokenizer.json", "data/meta.json", "metrics.csv", "loss.png", "lr.png", "samples.md", "summary.json"]:
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["stopped"] == "max_time"

    assert main(argv) == 0  # everything is done: nothing is trained again
    assert "already trained" in capsys.readouterr().out

    assert main([*argv, "--tokenizer.vocab_size=280"]) == 2
    assert "with other settings (tokenizer.vocab_size)" in capsys.readouterr().err


def test_quickstart_defaults_are_a_1m_model_on_the_bible_chapters():
    from gptlab.text import iter_source_documents

    cfg = quickstart_config()
    assert cfg.data.sources[0].group_by == "chapter" and cfg.sample.prompts == DEMO_PROMPTS
    model = ModelConfig.model_validate({**cfg.model.model_dump(), "vocab_size": cfg.tokenizer.vocab_size})
    from gptlab.model import model_info

    assert 0.9e6 < model_info(model, 1)["parameters"] < 1.3e6
    # the first model a user trains goes to every export target: Hugging Face (llama) and GGUF
    from gptlab.export.families import Llama, family_for
    from gptlab.export.llamacpp import check_gguf_exportable

    assert isinstance(family_for(model), Llama)
    assert check_gguf_exportable(model, SimpleNamespace(kind=cfg.tokenizer.kind)) == "LLAMA"
    assert cfg.profile == "cpu-fast" and cfg.train.optimizer == "muon" and cfg.train.schedule == "wsd"
    chapters = iter_source_documents(demo_corpus())
    genesis_1 = next(chapters)
    assert genesis_1.startswith("In the beginning God created the heaven and the earth.")
    assert "And the evening and the morning were the sixth day." in genesis_1
    assert next(chapters).startswith("Thus the heavens and the earth were finished")
