"""`gptlab sweep`: the spec's checks, the memory filter before any trial, trials as run directories in an
Optuna study, pruning, resuming (finished trials kept, a dead worker's trial resumed), two workers on one study."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import tomli_w

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.lab.sweep import (
    _sample,
    _trial_process,
    candidates,
    config_to_dict,
    load_spec,
    open_study,
    prepare_trial_data,
    run_sweep,
    trial_config,
)

# Each trial: a 1-layer, 32-wide model, 4 steps of 4 x 32 tokens, evaluated every 2 steps, on one thread.
TINY = {
    "tokenizer": {"vocab_size": 300},
    "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": 32},
    "train": {"batch_size": 4, "eval_every": 2, "eval_batches": 2, "warmup_steps": 1, "precision": "fp32",
              "compile": False, "threads": 1, "peak_flops": 1e11, "log_every": 1, "device": "cpu", "keep_last": 1},
}


def write_spec(tmp_path, corpus, space, name="spec", **top):
    """A spec TOML over the tiny corpus (its data prepared by the sweep), in tmp_path/sweep unless told."""
    config = {**TINY, "data": {"sources": [{"path": str(corpus)}], "val_fraction": 0.25, "shard_size": 1024,
                               "workers": 1}}
    spec = {"out": str(tmp_path / "sweep"), "sampler": "grid", "objective": "val_loss", "budget": {"steps": 4},
            "max_memory": "4GB", "pruner": "none", "seed": 0, **top, "config": config, "space": space}
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(spec), encoding="utf-8")
    return path


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def run_trial_here(spec, trial, run: str, pruner: str, max_memory: int) -> dict:
    """What a trial's child process sends back, run in this process (its data prepared, val_loss the objective)."""
    cfg = trial_config(spec, _sample(spec, trial)[0])
    cfg.train.data_dir = str(prepare_trial_data(cfg, spec.out, say=lambda *a, **k: None))
    cfg.train.run_dir = str(spec.out / "trials" / run)
    receive, send = multiprocessing.Pipe(duplex=False)
    _trial_process({"study": spec.name, "storage": spec.storage, "pruner": pruner, "trial_id": trial._trial_id,
                    "config": config_to_dict(cfg), "resume": False, "objective": "val_loss", "max_memory": max_memory,
                    "verbose": False}, send)
    return receive.recv()


# --------------------------------------------------------------------------- the spec's checks


@pytest.mark.parametrize("top, space, words", [
    ({"samplr": "tpe"}, {"model.n_layer": [1]}, "unknown key 'samplr' (did you mean 'sampler'?)"),
    ({}, {"model.n_layers": [1, 2]}, "space key 'model.n_layers' is not a config key (did you mean 'model.n_layer'?)"),
    ({"sampler": "tpe", "trials": 2}, {"train.lr": {"low": 1e-2, "high": 1e-4}}, "low = 0.01 must be below high"),
    ({"sampler": "tpe", "trials": 2}, {"train.lr": {"low": "a", "high": 1e-2}}, "must both be numbers"),
    ({"sampler": "tpe", "trials": 2}, {"train.lr": {"low": 0.0, "high": 1e-2, "log": True}}, "a log range needs low > 0"),
    ({}, {"model.n_layer": ["two", 4]}, "choice 'two' is not a int"),
    ({"sampler": "tpe", "trials": 2}, {"model.n_layer": {"low": 1.5, "high": 4}}, "is an int key"),
    ({}, {"train.lr": {"low": 1e-4, "high": 1e-2}}, "grid needs choices or an int range with step"),
    ({"budget": {"hours": 1}}, {"model.n_layer": [1]}, "is not a budget"),
    ({"objective": "accuracy"}, {"model.n_layer": [1]}, "objective = 'accuracy' is not known"),
    ({"sampler": "bayes"}, {"model.n_layer": [1]}, "sampler = 'bayes' is not known"),
    ({"pruner": "early"}, {"model.n_layer": [1]}, "pruner = 'early' is not known"),
    ({"max_memory": "lots"}, {"model.n_layer": [1]}, "max_memory 'lots' is not an amount of memory"),
    ({"sampler": "random"}, {"model.n_layer": [1]}, "needs a number of trials"),
])
def test_bad_specs_are_one_line_errors(tmp_path, tiny_corpus, top, space, words):
    path = write_spec(tmp_path, tiny_corpus, space, **top)
    with pytest.raises(GptlabError) as e:
        load_spec(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_command_exits_2_with_one_line(tmp_path, tiny_corpus, capsys):
    path = write_spec(tmp_path, tiny_corpus, {"model.n_layers": [1, 2]})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'model.n_layer'" in err


@pytest.mark.parametrize("content, words", [
    (b"sampler = grid\n", "is not valid TOML"),  # a string without quotes
    (b"\x00\xff\x89PNG binary", "is not valid TOML"),
])
def test_a_spec_that_is_not_toml_is_one_line(tmp_path, content, words, capsys):
    path = tmp_path / "spec.toml"
    path.write_bytes(content)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "sweep spec not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- the memory filter


def test_memory_filter_skips_big_and_invalid_points_before_anything_runs(tmp_path, tiny_corpus, capsys):
    path = write_spec(tmp_path, tiny_corpus, {"model.d_model": [32, 4096], "model.n_head": [2, 3]}, max_memory="1GB")
    points = {(p["params"]["model.d_model"], p["params"]["model.n_head"]): p for p in candidates(load_spec(path))}
    assert points[(32, 2)]["reason"] is None and points[(32, 2)]["predicted"] < 2**30
    assert "GiB > budget 0.93 GiB" in points[(4096, 2)]["reason"]
    assert "n_head=3 does not divide model.d_model=32" in points[(32, 3)]["reason"]

    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 grid points, 1 within 0.93 GiB" in out and "predicted" in out
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def test_an_empty_space_names_what_the_smallest_configuration_needs(tmp_path, tiny_corpus):
    path = write_spec(tmp_path, tiny_corpus, {"model.n_layer": [1, 2], "model.d_model": [32, 64]})
    with pytest.raises(GptlabError) as e:
        run_sweep(load_spec(path, max_memory="1MB"))
    message = str(e.value)
    assert message.startswith("search space is empty under 0.00 GiB: the smallest configuration "
                              "(model.n_layer=1, model.d_model=32) needs 0.")
    assert not (tmp_path / "sweep" / "trials").exists()


def test_conditions_leave_a_parameter_out_where_they_do_not_hold(tmp_path, tiny_corpus):
    path = write_spec(tmp_path, tiny_corpus, {
        "model.position": ["rope", "learned"],
        "model.rope_theta": {"choices": [100.0, 10000.0], "when": {"model.position": "rope"}}})
    params = [p["params"] for p in candidates(load_spec(path))]
    assert params == [{"model.position": "rope", "model.rope_theta": 100.0},
                      {"model.position": "rope", "model.rope_theta": 10000.0}, {"model.position": "learned"}]


# --------------------------------------------------------------------------- trials


def test_grid_sweep_trains_each_point_that_fits_as_a_run_directory(tmp_path, tiny_corpus):
    path = write_spec(tmp_path, tiny_corpus, {"model.n_layer": [1, 2], "model.d_model": [32, 4096]}, max_memory="1GB")
    study = run_sweep(load_spec(path), quiet=True, report=False)["study"]
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    skipped = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert len(done) == 2 and len(skipped) == 2
    assert all("GiB > budget" in t.user_attrs["skipped"] and "run_dir" not in t.user_attrs for t in skipped)
    assert all(t.user_attrs["predicted_memory"] > 10**9 for t in skipped)  # the report lists what they needed
    for t in done:
        run = tmp_path / "sweep" / t.user_attrs["run_dir"]
        assert t.user_attrs["run_dir"] == f"trials/{t.number:04d}" and (run / "summary.json").is_file()
        assert t.value > 0 and t.params["model.d_model"] == 32
        assert t.user_attrs["stopped"] == "max_steps" and t.user_attrs["tokens"] == 4 * 4 * 32
        assert t.user_attrs["predicted_memory"] > 0 and t.user_attrs["peak_memory"] > 0 and t.user_attrs["parameters"] > 0
        assert 2 in t.intermediate_values  # the curve, reported at each evaluation
    assert study.user_attrs["objective"] == "val_loss" and study.user_attrs["keys"] == ["model.n_layer", "model.d_model"]
    assert "model.d_model=4096" in (tmp_path / "sweep" / "skipped.md").read_text()
    assert len(list((tmp_path / "sweep" / "data").glob("*/meta.json"))) == 1  # one data folder for every trial

    path.write_text(path.read_text().replace('objective = "val_loss"', 'objective = "val_bpb"'))
    with pytest.raises(GptlabError, match="was made with another spec"):
        run_sweep(load_spec(path), quiet=True, report=False)


def test_the_pruner_stops_a_trial_worse_than_the_median(tmp_path, tiny_corpus):
    """The child's on_eval reports the objective at each evaluation and stops the trial when the pruner says so."""
    import optuna

    spec = load_spec(write_spec(tmp_path, tiny_corpus, {"train.lr": {"low": 1e-3, "high": 1.0, "log": True}},
                                sampler="random", trials=3, pruner="median"))
    spec.out.mkdir(parents=True)
    study = open_study(spec)
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}
    for _ in range(2):  # two finished trials far better than any 4-step model: the median to beat
        study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-3}, distributions=dist, value=0.01,
                                                  intermediate_values={2: 0.01, 4: 0.01}))
    result = run_trial_here(spec, study.ask(), "0002", pruner="median", max_memory=2**40)
    assert result["summary"]["stopped"] == "pruned" and result["summary"]["steps"] == 2
    assert list(study.trials[2].intermediate_values) == [2]


def test_a_trial_over_the_memory_budget_while_training_is_stopped(tmp_path, tiny_corpus):
    spec = load_spec(write_spec(tmp_path, tiny_corpus, {"model.n_layer": [1]}), max_memory="1MB")
    spec.out.mkdir(parents=True)
    study = open_study(spec)
    result = run_trial_here(spec, study.ask(), "0000", pruner="none", max_memory=2**20)
    assert result["summary"]["stopped"] == "out_of_memory" and result["step"] == 1 and result["used"] > 2**20


@pytest.mark.slow
def test_running_again_continues_the_sweep(tmp_path, tiny_corpus):
    path = write_spec(tmp_path, tiny_corpus, {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                      sampler="random", trials=2)
    study = run_sweep(load_spec(path), quiet=True, report=False)["study"]
    assert states(study) == ["COMPLETE", "COMPLETE"]
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "trials").glob("*/summary.json")}
    study = run_sweep(load_spec(path, trials=3), quiet=True, report=False)["study"]
    assert states(study) == ["COMPLETE"] * 3
    assert {p: p.stat().st_mtime_ns for p in first} == first  # the finished trials were not trained again
    assert sorted(p.name for p in (tmp_path / "sweep" / "trials").iterdir()) == ["0000", "0001", "0002"]


@pytest.mark.slow
def test_a_dead_workers_trial_is_resumed_from_its_checkpoint(tmp_path, tiny_corpus):
    from helpers import read_metrics

    from gptlab.train import train

    spec = load_spec(write_spec(tmp_path, tiny_corpus, {"model.n_layer": [1]}, trials=1))
    spec.out.mkdir(parents=True)
    (spec.out / "spec.toml").write_text(spec.path.read_text())
    study = open_study(spec, heartbeat=1, grace=2)
    trial = study.ask()  # a worker took trial 0, trained 2 of its 4 steps and died
    params, _ = _sample(spec, trial)
    trial.set_user_attr("run_dir", "trials/0000")
    cfg = trial_config(spec, params)
    cfg.train.data_dir = str(prepare_trial_data(cfg, spec.out, say=lambda *a, **k: None))
    cfg.train.run_dir = str(spec.out / "trials" / "0000")
    assert train(cfg, on_step=lambda step: "interrupted" if step == 2 else None, verbose=False)["steps"] == 2
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)

    study = run_sweep(spec, quiet=True, report=False, heartbeat=1, grace=2)["study"]
    assert states(study) == ["FAIL", "COMPLETE"]
    retry = study.trials[1]
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["run_dir"] == "trials/0000"
    steps = [int(r["step"]) for r in read_metrics(spec.out / "trials" / "0000") if r.get("loss")]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 continued the run: nothing trained twice
    assert not (spec.out / "trials" / "0001").exists()


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, tiny_corpus):
    path = write_spec(tmp_path, tiny_corpus, {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                      sampler="random", trials=4)
    study = run_sweep(load_spec(path), workers=2, quiet=True, report=False)["study"]
    trials = study.get_trials()
    assert states(study) == ["COMPLETE"] * 4
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers trained
    assert sorted(t.user_attrs["run_dir"] for t in trials) == [f"trials/{n:04d}" for n in range(4)]
    assert len({t.params["train.lr"] for t in trials}) == 4


SWEEP_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("recipe", SWEEP_RECIPES, ids=lambda p: p.name)
def test_sweep_recipes_check_and_price_their_space(recipe, tmp_path, monkeypatch):
    """The worked example's spec stays valid: its base and keys read, and the memory filter splits its space."""
    monkeypatch.chdir(tmp_path)  # its out folder is relative to where it runs
    spec = load_spec(recipe)
    points = candidates(spec)
    fitting = [p for p in points if p["reason"] is None]
    assert fitting and len(fitting) < len(points)  # the budget matters: some configurations are skipped
    assert all(p["predicted"] <= spec.max_memory for p in fitting)
    assert all("budget" in p["reason"] for p in points if p not in fitting)


@pytest.mark.slow
def test_a_resumed_grid_point_is_not_run_twice_and_no_point_is_lost(tmp_path, tiny_corpus):
    spec = load_spec(write_spec(tmp_path, tiny_corpus, {"model.n_layer": [1, 2]}))
    spec.out.mkdir(parents=True)
    (spec.out / "spec.toml").write_text(spec.path.read_text())
    study = open_study(spec, heartbeat=1, grace=2)
    trial = study.ask()  # a worker took one grid point and died before it finished
    params, _ = _sample(spec, trial)
    trial.set_user_attr("run_dir", "trials/0000")
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)

    study = run_sweep(spec, quiet=True, report=False, heartbeat=1, grace=2)["study"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["model.n_layer"] for t in done) == [1, 2]  # each point once, the retried one included
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)  # when the stale one is seen
    assert retry.params == params and retry.state.name == "COMPLETE"
