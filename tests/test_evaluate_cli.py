"""`gptlab eval`, `gptlab compare` and `gptlab plot` on tiny trained runs, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import OFFICIAL, PREPROCESSED, write_jsonl

from gptlab.cli import main
from gptlab.evaluate import read_metrics


@pytest.fixture()
def run(eval_runs, tmp_path):
    """A private copy of the 2-layer run (eval writes into the run directory)."""
    return shutil.copytree(eval_runs[1], tmp_path / "run")


def test_eval_on_the_runs_own_validation_split(run, capsys):
    assert main(["eval", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "eval.md" in out
    report = json.loads((run / "eval.json").read_text())
    (val,) = report["datasets"]
    assert val["kind"] == "split" and val["name"].endswith(":val")
    assert 0 < val["bpb"] < 20 and val["tokens"] > 0 and set(val["topk"]) == {"1", "5", "10"}
    assert val["topk"]["1"] <= val["topk"]["5"] <= val["topk"]["10"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())["checkpoint"]
    assert report["checkpoint"] == best and report["step"] == int(best.split("_")[1]) and report["parameters"] > 0
    assert [s["prompt"] for s in report["samples"]] == ["Once upon a time", "One day, a little girl named Lily", "The meaning of life is", ""]
    markdown = (run / "eval.md").read_text()
    first_table_row = [line for line in markdown.splitlines() if line.startswith("| ")][1]
    assert "bits per byte" in markdown.splitlines()[4] and f"**{val['bpb']:.4f}**" in first_table_row  # bpb leads
    assert "## Top-k accuracy by tokens of context" in markdown and "## Samples" in markdown


def test_eval_with_text_and_hellaswag(run, tiny_corpus, tmp_path, capsys):
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [PREPROCESSED, OFFICIAL] * 3)
    code = main(["eval", str(run), "--data", str(tiny_corpus), "--hellaswag", hellaswag, "--limit", "5",
                 "--batch-size", "2", "--no-samples", "--checkpoint", "last", "-q"])
    assert code == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["datasets"][0]["name"] == str(tiny_corpus) and report["datasets"][0]["documents"] == 120
    assert report["hellaswag"]["items"] == 5 and 0 <= report["hellaswag"]["acc_norm"] <= 1
    assert "samples" not in report and report["which"] == "last"
    assert "HellaSwag (5 items" in capsys.readouterr().out
    assert "## HellaSwag (5 items" in (run / "eval.md").read_text()


def test_eval_bad_inputs_are_one_line_exit_2(run, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Tom.\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    bad = write_jsonl(tmp_path / "bad.jsonl", [PREPROCESSED, "{oops"])
    cases = [
        (["--data", str(short)], "fewer than one window"),
        (["--data", str(empty)], "empty"),
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--hellaswag", bad], "bad.jsonl:2: not a HellaSwag item"),
        (["--limit", "0", "--hellaswag", bad], "eval.limit"),
    ]
    for flags, message in cases:
        assert main(["eval", str(run), "--no-samples", "-q", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert main(["eval", str(tmp_path / "no-run")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_compare_two_runs(eval_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", *map(str, eval_runs), "--out", str(out), "--x", "time"]) == 0
    printed = capsys.readouterr().out
    markdown = (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| model.n_layer | 1 | 2 |" in markdown and "train.run_dir" not in markdown.split("differ")[1]
    for run in eval_runs:
        rows = read_metrics(run)
        best = min(r["val_loss"] for r in rows if r["val_loss"] is not None)
        assert f"| {run.name} |" in printed and f"{best:.4f}" in printed
    assert "tokens/s" in markdown and "1,024" in markdown  # tokens seen: 8 steps x 4 x 32


def test_compare_shows_eval_results_when_present(eval_runs, run, tmp_path, tiny_corpus):
    assert main(["eval", str(run), "--data", str(tiny_corpus), "--no-samples", "-q"]) == 0
    bpb = json.loads((run / "eval.json").read_text())["datasets"][0]["bpb"]
    assert main(["compare", str(eval_runs[0]), str(run), "--out", str(tmp_path)]) == 0
    assert f"{bpb:.4f}" in (tmp_path / "compare.md").read_text()


def test_compare_a_run_without_metrics_is_one_line_exit_2(eval_runs, tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    assert main(["compare", str(eval_runs[0]), str(tmp_path / "empty-run"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "empty-run has no metrics.csv" in err and err.count("\n") == 1
    assert not (tmp_path / "compare.md").exists()


def test_plot_marks_where_validation_stopped_improving(run, tmp_path, capsys):
    rows = read_metrics(run)
    best = min((r for r in rows if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    assert main(["plot", str(run)]) == 0
    assert f"stopped improving at step {int(best['step'])}" in capsys.readouterr().out
    assert (run / "plot.png").stat().st_size > 10_000
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0 and (tmp_path / "p.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_plot_of_an_overfitting_run(tmp_path):
    """A hand-written metrics.csv whose validation loss turns up at step 30: that step is the one marked."""
    from gptlab.evaluate import plot_run

    run = tmp_path / "overfit"
    run.mkdir()
    lines = ["step,tokens,loss,val_loss,val_bpb,lr,grad_norm,tokens_per_s,mfu,elapsed"]
    for step, val in zip(range(10, 70, 10), [3.0, 2.5, 2.2, 2.4, 2.7, 3.1]):
        lines.append(f"{step},{step * 100},{3.0 - step / 40},{val},,1e-3,0.8,5000,0.1,{step / 10}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    result = plot_run(run)
    assert result["best_step"] == 30 and result["best_val_loss"] == 2.2 and result["last_step"] == 60
