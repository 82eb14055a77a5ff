"""The sweep report: results.md / results.csv / sweep.png / compare/ from an Optuna study in SQLite."""

from __future__ import annotations

import csv

import optuna
import pytest
from helpers import tiny_config
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from gptlab.errors import GptlabError
from gptlab.lab.sweep_report import (
    format_bytes,
    format_count,
    format_skipped,
    format_table,
    format_value,
    load_study,
    trial_rows,
    write_report,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

KEYS = ["model.n_layer", "train.lr", "model.norm"]
DISTRIBUTIONS = {"model.n_layer": IntDistribution(1, 4), "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
                 "model.norm": CategoricalDistribution(["layernorm", "rmsnorm"])}
SKIP_REASON = "predicted 2.31 GiB > budget 2.00 GiB"
ERROR = "RuntimeError: the kernel fell over"


def new_study(sweep_dir, name="tiny"):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.toml").write_text(f'name = "{name}"\nsampler = "tpe"\npruner = "median"\n', encoding="utf-8")
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}", direction="minimize")
    study.set_user_attr("objective", "val_bpb")
    study.set_user_attr("keys", KEYS)
    study.set_user_attr("max_memory", 2 * 2**30)
    study.set_user_attr("budget", {"tokens": 1_000_000})
    return study


def add(study, state, params, value=None, intermediate=None, **attrs):
    study.add_trial(create_trial(params=params, distributions={k: DISTRIBUTIONS[k] for k in params}, value=value,
                                 state=state, user_attrs=attrs, intermediate_values=intermediate or {}))


def ran(run_dir, **extra):
    return dict(run_dir=run_dir, predicted_memory=300 * 2**20, peak_memory=270 * 2**20, parameters=123_456,
                tokens=2_500_000, elapsed=93.0, tokens_per_s=26_881.7, stopped="budget", **extra)


def full_study(sweep_dir):
    """Trials 0..5: complete 1.90, complete 1.70, complete 2.10 (its run dir missing), pruned at 2.40,
    skipped for memory, failed. Trials 0 and 1 are what `best=2` compares."""
    study = new_study(sweep_dir)
    add(study, TrialState.COMPLETE, {"model.n_layer": 1, "train.lr": 1e-3, "model.norm": "layernorm"}, 1.9,
        {4: 2.3, 8: 1.9}, **ran("trials/0000"))
    add(study, TrialState.COMPLETE, {"model.n_layer": 2, "train.lr": 3e-3, "model.norm": "rmsnorm"}, 1.7,
        {4: 2.2, 8: 1.7}, **ran("trials/0001"))
    add(study, TrialState.COMPLETE, {"model.n_layer": 3, "train.lr": 3e-4, "model.norm": "rmsnorm"}, 2.1,
        {4: 2.5, 8: 2.1}, **ran("trials/0002"))
    add(study, TrialState.PRUNED, {"model.n_layer": 2, "train.lr": 1e-2, "model.norm": "layernorm"}, None,
        {4: 2.6, 8: 2.4}, **ran("trials/0003"))
    add(study, TrialState.PRUNED, {"model.n_layer": 4, "train.lr": 1e-3, "model.norm": "rmsnorm"},
        predicted_memory=int(2.31 * 2**30), parameters=9_876_543, skipped=SKIP_REASON)
    add(study, TrialState.FAIL, {"model.n_layer": 1, "train.lr": 5e-3, "model.norm": "rmsnorm"},
        run_dir="trials/0005", predicted_memory=200 * 2**20, error=ERROR)
    return study


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_shards):
    """Two real tiny run directories (4 steps each), in a sweep folder as trials/0000 and trials/0001."""
    from gptlab.train import train

    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweeps" / "tiny"
    for number, lr in ((0, "1e-3"), (1, "3e-3")):
        train(tiny_config(tiny_shards, sweep_dir / "trials" / f"{number:04d}", "--train.max_steps=4", "--train.eval_every=2",
                          f"--train.lr={lr}"), verbose=False)
    return sweep_dir


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_of_every_kind_of_trial(two_runs):
    sweep_dir = two_runs
    full_study(sweep_dir)
    result = write_report(sweep_dir, best=2)  # the study loaded from spec.toml's name and SWEEP_DIR/study.db

    md = (sweep_dir / "results.md").read_text(encoding="utf-8")
    assert result["markdown"] == str(sweep_dir / "results.md")
    assert "val_bpb" in md and "2.00 GiB" in md and "budget: 1M tokens per trial" in md and "sampler: tpe, pruner: median" in md
    assert "3 complete, 1 pruned, 1 skipped for memory, 1 failed (6 in all)" in md
    assert "best: trial 1, val_bpb 1.7000 bpb" in md
    results = md.split("## Results")[1].split("## Skipped")[0]
    rows = [line for line in results.splitlines() if "| complete |" in line or "| pruned |" in line]
    trials = [int(line.split("|")[2]) for line in rows]
    assert trials == [1, 0, 2, 3]  # complete by objective, then the pruned one (not ranked)
    assert rows[0].startswith("| 1 | 1 | complete | 2 | 0.003 | rmsnorm | 1.7000 |")
    assert "2.4000 (step 8)" in rows[3] and rows[3].startswith("|  | 3 | pruned")
    assert "270 MiB" in rows[0] and "300 MiB" in rows[0] and "0.90x" in rows[0] and "2.5M" in rows[0] and "1.55" in rows[0]
    skipped = md.split("## Skipped for memory (never started)")[1].split("## Failed")[0]
    assert "| 4 | n_layer=4, lr=0.001, norm=rmsnorm | 2.31 GiB | " + SKIP_REASON + " |" in skipped
    assert ERROR in md.split("## Failed")[1]
    assert "compare/compare.md" in md and "trial 1, trial 0" in md

    with open(result["csv"], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["number"] for r in table] == ["0", "1", "2", "3", "4", "5"]
    assert [r["state"] for r in table] == ["complete", "complete", "complete", "pruned", "skipped", "failed"]
    assert float(table[1]["value"]) == 1.7 and table[1]["rank"] == "1" and table[3]["value"] == "2.4"
    assert table[3]["last_step"] == "8" and table[4]["skipped"] == SKIP_REASON and table[5]["error"] == ERROR
    assert table[1]["model.norm"] == "rmsnorm" and float(table[1]["train.lr"]) == 3e-3
    assert int(table[0]["peak_memory"]) == 270 * 2**20 and float(table[0]["memory_ratio"]) == pytest.approx(0.9)

    import matplotlib.image

    image = matplotlib.image.imread(result["plot"])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600

    assert result["compare"] == str(sweep_dir / "compare")
    compared = (sweep_dir / "compare" / "compare.md").read_text(encoding="utf-8")
    assert "0001" in compared and "0000" in compared and "0002" not in compared
    assert (sweep_dir / "compare" / "compare.png").is_file()

    assert result["best"] == {"number": 1, "value": 1.7, "params": {"model.n_layer": 2, "train.lr": 3e-3, "model.norm": "rmsnorm"},
                              "run_dir": "trials/0001"}
    lines = result["table"].splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert lines[0].split()[:6] == ["rank", "trial", "state", "n_layer", "lr", "norm"]
    assert [line.split()[1] for line in lines[2:]] == ["1", "0", "2", "3"]


def test_nothing_or_one_complete_does_not_crash(tmp_path):
    # no trial at all
    study = new_study(tmp_path / "empty")
    result = write_report(tmp_path / "empty", study)
    assert result["best"] is None and result["compare"] is None
    assert "No trial has run yet" in (tmp_path / "empty" / "results.md").read_text(encoding="utf-8")
    assert read_csv(result["csv"]) == []
    assert matplotlib_shape(result["plot"])[0] > 100

    # only pruned / skipped / failed trials: a figure of the pruned values, no best, no comparison
    study = new_study(tmp_path / "pruned")
    add(study, TrialState.PRUNED, {"model.n_layer": 2, "train.lr": 1e-3, "model.norm": "rmsnorm"}, None, {4: 2.6},
        **ran("trials/0000"))
    add(study, TrialState.PRUNED, {"model.n_layer": 4}, predicted_memory=3 * 2**30, skipped=SKIP_REASON)
    add(study, TrialState.FAIL, {"model.n_layer": 1}, error=ERROR)
    result = write_report(tmp_path / "pruned", study)
    assert result["best"] is None and result["compare"] is None
    assert "best: none yet" in (tmp_path / "pruned" / "results.md").read_text(encoding="utf-8")
    assert len(read_csv(result["csv"])) == 3
    matplotlib_shape(result["plot"])

    # one complete trial: a best, but nothing to compare it with
    study = new_study(tmp_path / "one")
    add(study, TrialState.COMPLETE, {"model.n_layer": 2, "train.lr": 1e-3, "model.norm": "rmsnorm"}, 1.8, {4: 1.8},
        **ran("trials/0000"))
    result = write_report(tmp_path / "one", study)
    assert result["best"]["number"] == 0 and result["compare"] is None
    assert "Not compared: 0 complete trials with a run directory" in (tmp_path / "one" / "results.md").read_text(encoding="utf-8")
    assert not (tmp_path / "one" / "compare").exists()
    matplotlib_shape(result["plot"])


def matplotlib_shape(path):
    import matplotlib.image

    shape = matplotlib.image.imread(path).shape
    assert len(shape) == 3
    return shape


def test_many_keys_fit_a_terminal(tmp_path):
    keys = [f"model.key_number_{i}" for i in range(8)]
    study = new_study(tmp_path)
    study.set_user_attr("keys", keys)
    distributions = {k: FloatDistribution(0.0, 1000.0) for k in keys}
    for n in range(3):
        params = {k: 100.0 * (n + 1) + i for i, k in enumerate(keys)}
        study.add_trial(create_trial(params=params, distributions=distributions, value=2.0 - n / 10, state=TrialState.COMPLETE,
                                     user_attrs=ran(f"trials/{n:04d}")))
    rows = trial_rows(study)
    table = format_table(rows, keys, "val_bpb")
    assert all(len(line) <= 100 for line in table.splitlines())
    assert [line.split()[1] for line in table.splitlines()[2:5]] == ["2", "1", "0"]
    assert matplotlib_shape(write_report(tmp_path, study)["plot"])[1] > 1000  # 8 panels and the parallel axes


def test_load_study_falls_back_to_the_only_study(tmp_path):
    study = new_study(tmp_path, name="actual")
    add(study, TrialState.COMPLETE, {"model.n_layer": 2}, 1.5)
    (tmp_path / "spec.toml").write_text('name = "renamed"\n', encoding="utf-8")
    assert load_study(tmp_path).study_name == "actual"
    optuna.create_study(study_name="second", storage=f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(GptlabError, match="holds 2 studies"):
        load_study(tmp_path)
    with pytest.raises(GptlabError, match="no study found"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere" / "study.db").exists()  # looking did not create an empty database


def test_formats():
    assert format_bytes(int(2.31 * 2**30)) == "2.31 GiB" and format_bytes(512 * 2**20) == "512 MiB" and format_bytes(None) == ""
    assert format_count(12_345_678) == "12.3M" and format_count(950) == "950" and format_count(45_600) == "45.6k"
    assert format_value(3e-4) == "3e-04" and format_value(0.1) == "0.1" and format_value(True) == "true"
    assert format_value(512) == "512" and format_value("rmsnorm") == "rmsnorm"
    skipped = format_skipped([{"params": {"model.n_layer": 12, "model.d_model": 1024}, "reason": SKIP_REASON,
                               "predicted_memory": int(2.31 * 2**30)}])
    assert skipped.splitlines()[0] == "| configuration | predicted memory | reason |"
    assert "n_layer=12, d_model=1024 | 2.31 GiB | " + SKIP_REASON in skipped
    assert format_skipped([]) == "None.\n"
