"""The run directory works from anywhere: every command on a run given by any path, from any folder, after
the run (and its data folder with it) has been moved; HellaSwag needs no training data at all."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import PREPROCESSED, read_metrics, tiny_config, write_jsonl

from gptlab.cli import main
from gptlab.config import load_config, save_config
from gptlab.runs import load_run_config, save_run_config
from gptlab.train import train


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, tiny_shards):
    """(project, where it was trained): project/data (the tiny shards) and project/runs/tiny trained on it, both
    given as paths relative to the project folder (as `gptlab quickstart` and the README lay them out); moved
    away after training, so nothing is left where the run's config.toml says it was written."""
    root = tmp_path_factory.mktemp("trained")
    project = root / "project"
    shutil.copytree(tiny_shards, project / "data")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(project)
        train(tiny_config("data", "runs/tiny"), verbose=False)
    return shutil.move(project, root / "stash"), project


@pytest.fixture
def moved(trained_project, tmp_path, monkeypatch):
    """A copy of the project in another place, and the current folder a third one: (run, its data folder)."""
    project = shutil.copytree(trained_project[0], tmp_path / "elsewhere" / "project")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return project / "runs" / "tiny", project / "data"


def test_the_config_holds_absolute_paths_and_reads_them_back_where_the_run_is(trained_project, moved):
    run, data = moved
    _, trained_at = trained_project
    written = load_config(run / "config.toml")
    assert written.train.data_dir == str(trained_at / "data") and written.train.run_dir == str(trained_at / "runs" / "tiny")
    cfg = load_run_config(run)
    assert cfg.train.data_dir == str(data) and cfg.train.run_dir == str(run)
    # An override's path is as given; a path whose target did not travel with the run is kept as written.
    assert load_run_config(run, ["--train.data_dir='mine'"]).train.data_dir == "mine"
    # ... in either spelling: as typed, or as a command-line flag gave it (train --resume RUN --run-dir ...)
    both = load_run_config(run, [("train.data_dir", "flag"), "--train.max_steps=20"])
    assert both.train.data_dir == "flag" and both.train.max_steps == 20
    shutil.rmtree(data)
    assert load_run_config(run).train.data_dir == str(trained_at / "data")


def test_a_config_saved_with_relative_paths_reads_them_against_the_run(moved):
    """Runs written before paths were stored absolute held them relative to the folder trained from (the
    issue's runs/quickstart/data): read against the run, they are found too."""
    run, data = moved
    save_config(load_config(run / "config.toml", ["--train.data_dir='data'", "--train.run_dir='runs/tiny'"]), run / "config.toml")
    assert load_run_config(run).train.data_dir == str(data)


def test_every_command_works_on_a_moved_run_from_another_folder(moved, tiny_corpus, capsys):
    run, data = moved
    assert main(["sample", str(run), "--prompt", "Once", "-n", "4", "--seed", "1"]) == 0
    assert main(["eval", str(run), "--no-samples", "-q"]) == 0  # its own validation split, found beside it
    (own,) = json.loads((run / "eval.json").read_text())["datasets"]
    assert own["name"] == f"{data}:val"
    hellaswag = write_jsonl(run.parent / "hs.jsonl", [PREPROCESSED] * 3)
    assert main(["eval", str(run), "--data", str(tiny_corpus), "--hellaswag", hellaswag, "--no-samples", "-q"]) == 0
    assert main(["export", str(run), "--to", "hf", "exported"]) == 0
    assert "| source | role |" in open("exported/README.md").read()  # the card found the moved data's meta.json
    assert main(["compare", str(run), "--out", "report"]) == 0
    assert main(["plot", str(run), "--out", "plot.png"]) == 0
    prompts = run.parent / "prompts.txt"
    prompts.write_text("Once\n")
    assert main(["distill", str(run), "--prompts", str(prompts), "--out", "synthetic.jsonl", "--tokens", "20", "-n", "8"]) == 0

    assert main(["train", "--resume", str(run), "--train.max_steps=12"]) == 0
    assert read_metrics(run)[-1]["step"] == "12" and (run / "checkpoints" / "step_0000012").is_dir()
    assert load_config(run / "config.toml").train.data_dir == str(data)  # written again where it is now


def test_hellaswag_alone_needs_no_training_data(trained_project, moved, capsys):
    run, data = moved
    shutil.rmtree(data)
    hellaswag = write_jsonl(run.parent / "hs.jsonl", [PREPROCESSED] * 3)
    assert main(["eval", str(run), "--hellaswag", hellaswag, "--no-samples"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["hellaswag"]["items"] == 3 and report["datasets"] == []
    assert "validation split was not scored" in capsys.readouterr().err
    assert "## HellaSwag (3 items" in (run / "eval.md").read_text()
    assert main(["eval", str(run), "--no-samples", "-q"]) == 2  # without HellaSwag, it still says what is missing
    assert f"the run's data folder {trained_project[1] / 'data'} is not here" in capsys.readouterr().err


def test_quickstart_rerun_from_its_folder_with_relative_paths(tiny_corpus, tmp_path, monkeypatch, capsys):
    """The same-settings check compares the run's config.toml (absolute paths) with the command's (relative)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_corpus, "stories.txt")
    argv = ["quickstart", "--data", "stories.txt", "--minutes", "0.01", "--out", "runs/qs", "--model.n_layer=1",
            "--model.d_model=32", "--model.n_head=2", "--model.context_length=32", "--train.batch_size=4",
            "--train.threads=1", "--train.compile=false", "--train.peak_flops=1e11", "--tokenizer.vocab_size=300",
            "--data.val_fraction=0.34", "--data.workers=1", "--sample.max_new_tokens=4"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "already trained" in capsys.readouterr().out
    assert main([*argv, "--data.seed=7"]) == 2
    assert "with other settings (data.seed)" in capsys.readouterr().err


def test_save_run_config_leaves_the_callers_config_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("data", "runs/x")
    save_run_config(cfg, tmp_path / "run")
    assert cfg.train.data_dir == "data" and cfg.train.run_dir == "runs/x"
    saved = load_config(tmp_path / "run" / "config.toml").train
    assert saved.data_dir == str(tmp_path / "data") and saved.run_dir == str(tmp_path / "run")


def test_run_status_follows_training(tmp_path, tiny_shards):
    from gptlab.runs import run_status, write_status
    from gptlab.train import train

    run = tmp_path / "run"
    seen = []
    train(tiny_config(tiny_shards, run), verbose=False, on_step=lambda step: seen.append(run_status(run)["state"]))
    assert set(seen) == {"training"}
    assert run_status(run)["state"] == "finished" and run_status(run)["reason"] == "max_steps"
    write_status(run, "training")  # as a killed trainer leaves it, but its process is gone
    (run / "status.json").write_text((run / "status.json").read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))
    assert run_status(run)["state"] == "stopped"
    (run / "status.json").unlink()  # a run from before status.json: summary.json says how it ended
    assert run_status(run)["state"] == "finished"
    assert run_status(tmp_path / "nothing")["state"] == "new"
