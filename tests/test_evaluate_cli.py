"""`gptlab eval`, `gptlab compare` and `gptlab plot` on tiny trained runs, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import OFFICIAL, PREPROCESSED, TINY_STORIES, write_jsonl

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


def test_a_text_file_scores_as_the_same_file_prepared_as_a_split(run, tmp_path):
    """eval --data FILE reads the file as `data prepare` did for the run: its source settings (paragraphs as
    documents), the run's normalisation (Gutenberg header and licence cut, whitespace), EOS after each document."""
    from gptlab.config import SourceConfig
    from gptlab.data import load_meta, prepare_data
    from gptlab.runs import load_run_config, save_run_config

    book = tmp_path / "book.txt"
    header = "The Project Gutenberg eBook of Tales\n\nTitle: Tales\n\n*** START OF THE PROJECT GUTENBERG EBOOK TALES ***\n\n"
    body = "\n\n".join(f"{a}   {b}\t\n{c}" for a, b, c in zip(TINY_STORIES, TINY_STORIES[1:], TINY_STORIES[2:]))
    book.write_text(header + body + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TALES ***\n\nLicence text.\n", encoding="utf-8")
    source = SourceConfig(path=str(book), documents="blank_lines")
    cfg = load_run_config(run)
    cfg.text.normalize = ["strip_gutenberg", "whitespace"]
    cfg.data.sources = [source]
    save_run_config(cfg, run)
    prepared = cfg.model_copy(deep=True)
    prepared.data.val_sources, prepared.data.out_dir, prepared.data.workers = [source], str(tmp_path / "prepared"), 1
    prepare_data(prepared, run / "tokenizer.json")

    assert main(["eval", str(run), "--data", str(book), "--data", str(tmp_path / "prepared"), "--no-samples", "-q"]) == 0
    text, split = json.loads((run / "eval.json").read_text())["datasets"]
    assert text["kind"] == "text" and split["kind"] == "split"
    assert text["tokens"] == split["tokens"] and text["bytes"] == split["bytes"]
    assert text["documents"] == load_meta(tmp_path / "prepared")["splits"]["val"]["documents"] == 4
    assert abs(text["loss"] - split["loss"]) < 1e-6 and abs(text["bpb"] - split["bpb"]) < 1e-6


def write_run(path, rows, summary=None):
    """A run folder holding only metrics.csv (rows of step, tokens, loss, val_loss, tokens_per_s, elapsed)."""
    path.mkdir()
    lines = ["step,tokens,loss,val_loss,val_bpb,lr,grad_norm,tokens_per_s,mfu,elapsed"]
    lines += [f"{s},{t},{loss},{'' if v is None else v},,1e-3,0.8,{speed},0.1,{e}" for s, t, loss, v, speed, e in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    if summary:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_png_without_validation_has_one_panel_and_short_token_ticks(tmp_path, monkeypatch):
    """No validation rows: no empty validation panel; 1.6M tokens: ticks like 400k, 1.2M, never 6-digit numbers run together."""
    from gptlab.evaluate import compare as compare_module

    figures = []
    monkeypatch.setattr(compare_module, "save_figure", lambda fig, path: figures.append(fig))
    runs = [write_run(tmp_path / f"r{k}", [(s, s * 40_000, 4 - s / 20 - k / 10, None, 9000, s) for s in range(1, 41)])
            for k in (1, 2)]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path)]) == 0
    (fig,) = figures
    (ax,) = fig.axes
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "no validation" in ax.get_title() and len(labels) >= 3
    assert all(label[-1] in "kM" and len(label) <= 5 for label in labels if label != "0"), labels
    assert "1.2M" in labels or "1.6M" in labels


def test_compare_tokens_per_s_leaves_out_the_compile_interval(tmp_path):
    """A compiled run's first interval holds the compilation: the overall average (in summary.json) hides it."""
    rows = [(10, 10_000, 3.0, None, 500, 20.0)] + [(10 * i, 10_000 * i, 3.0, None, 9000 + i, 20 + i) for i in range(2, 12)]
    run = write_run(tmp_path / "compiled", rows, {"tokens_per_s": 5238.1, "compile": True, "tokens": 110_000})
    assert main(["compare", str(run), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "compare.md").read_text()
    assert "| 9,006 |" in markdown and "5,238" not in markdown  # the median of 9,002 ... 9,011
    assert "tokens/s: steady state" in markdown
