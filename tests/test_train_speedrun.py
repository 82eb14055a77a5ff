"""`gptlab speedrun`: a time budget from scratch, then bits per byte of a held-out file, every byte once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.evaluate import evaluate_text
from gptlab.runs import load_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model.preset=tiny-1m", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context_length=32",
        "--train.batch_size=4", "--train.compile=false", "--train.threads=1", "--train.peak_flops=1e11",
        "--train.max_time=1.5", "--train.warmup_steps=2", "--tokenizer.vocab_size=300", "--data.workers=1"]


def _recipe(tmp_path: Path, corpus: Path, score: Path) -> list[str]:
    return [str(REPO / "recipes" / "speedrun_cpu.toml"), *TINY,
            f"--data.sources=[{{path = {str(corpus)!r}}}]", f"--eval.data=[{str(score)!r}]",
            f"--data.out_dir={str(tmp_path / 'data')!r}", f"--train.run_dir={str(tmp_path / 'run')!r}"]


@pytest.fixture
def score_text(tmp_path) -> Path:
    path = tmp_path / "held-out.txt"
    path.write_text("Tim had a red ball. He liked to play with it.\n\nOne day the ball rolled away. Tim was sad.\n\n"
                    "His mom helped him find it. They were happy — «très» happy.\n\n", encoding="utf-8")
    return path


def test_speedrun_trains_for_its_budget_and_scores_every_byte_of_the_held_out_file(tiny_corpus, score_text, tmp_path, capsys):
    assert main(["speedrun", *_recipe(tmp_path, tiny_corpus, score_text)]) == 0
    out = capsys.readouterr().out
    assert "[4/4] score" in out and "leaderboard row" in out
    result_line = out.strip().splitlines()[-1]
    assert result_line.startswith("RESULT bpb=")

    result = json.loads((tmp_path / "run" / "speedrun.json").read_text())
    assert result["train_s"] >= 1.5 and result["steps"] >= 1 and result["tokens"] == result["steps"] * 4 * 32
    assert result["score_bytes"] == len(score_text.read_bytes())
    # the score is the last checkpoint's bits per byte of the file's raw text, whatever the batch size
    model, tokenizer, _ = load_run(tmp_path / "run", "last")
    again = evaluate_text(model, tokenizer, score_text.read_text(encoding="utf-8"), batch_size=1, topk=[1])
    assert math.isfinite(result["bpb"]) and result["bpb"] == pytest.approx(again["bpb"], rel=1e-5)
    assert f"bpb={result['bpb']:.4f}" in result_line

    assert main(["speedrun", *_recipe(tmp_path, tiny_corpus, score_text)]) == 2  # always from scratch
    assert "already holds a run" in capsys.readouterr().err


def test_speedrun_refuses_to_score_on_training_text(tiny_corpus, score_text, tmp_path, capsys):
    assert main(["speedrun", *_recipe(tmp_path, tiny_corpus, tiny_corpus)]) == 2
    assert "is also a training source" in capsys.readouterr().err

    assert main(["speedrun", str(tmp_path / "missing.toml")]) == 2
    assert "speedrun recipe not found" in capsys.readouterr().err


def test_speedrun_needs_exactly_one_score_file(tiny_corpus, score_text, tmp_path, capsys):
    argv = _recipe(tmp_path, tiny_corpus, score_text)
    assert main(["speedrun", *argv, f"--eval.data=[{str(score_text)!r}, {str(score_text)!r}]"]) == 2
    assert "scores one text file" in capsys.readouterr().err
    assert main(["speedrun", *argv, f"--eval.data=[{str(tmp_path / 'nope.txt')!r}]"]) == 2
    assert "not found" in capsys.readouterr().err
