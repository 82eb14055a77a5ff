"""How long a run will take: the start-up guess counts its evaluations, and the measured first steps correct it."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_config

from gptlab.train import distributed, train
from gptlab.train.estimate import SETTLE_SECONDS, WARMUP_STEPS, RunEstimate
from gptlab.train.trainer import Trainer


def test_seconds_left_counts_each_evaluation_the_last_step_and_the_samples():
    estimate = RunEstimate({"step": 1.0, "eval": 10.0, "sample": 3.0}, eval_every=20, sample_every=40)
    # steps 20, 40, 60, 80, 100 are evaluated; 40 and 80 also sampled
    assert estimate.seconds_left(0, 100, None) == {"train": 100.0, "pauses": 56.0, "total": 156.0}
    # 90 steps: 20..80, and the last step (90) is evaluated too
    assert estimate.seconds_left(0, 90, None)["pauses"] == 5 * 10.0 + 2 * 3.0
    # from step 45 with 30 s of max_time left: steps 46..75, evaluations at 60 and 75, a sample at none
    assert estimate.seconds_left(45, None, 30.0) == {"train": 30.0, "pauses": 20.0, "total": 50.0}
    # whichever limit comes first: 10 steps before 30 s
    assert estimate.seconds_left(45, 10, 30.0)["train"] == 10.0
    assert estimate.seconds_left(100, 0, None)["total"] == 0.0  # nothing left, not even an evaluation


def test_measured_steps_replace_the_guess_and_scale_the_pauses_not_measured_yet():
    estimate = RunEstimate({"step": 0.5, "eval": 4.0, "sample": 1.0}, eval_every=10, sample_every=0)
    trained = 0.0
    for step in range(1, 8):  # the warm-up steps (compiling) take 60 s, the rest 2 s each
        trained += 60.0 if step <= WARMUP_STEPS else 2.0
        estimate.timed_step(step, trained)
    assert estimate.pace("step") == pytest.approx(2.0)
    assert estimate.pace("eval") == pytest.approx(16.0)  # the guess, 4x off like the steps' guess
    estimate.timed_pause("eval", 7.0)
    assert estimate.pace("eval") == 7.0 and estimate.pace("sample") == pytest.approx(4.0)


def test_the_estimate_settles_after_two_evaluations_or_half_a_minute_of_training():
    estimate = RunEstimate({"step": 1.0, "eval": 1.0, "sample": 0.0}, eval_every=5, sample_every=0)
    for step in range(1, WARMUP_STEPS + 3):
        estimate.timed_step(step, float(step))
    assert not estimate.settled(10.0)  # two steps timed after the warm-up: too few
    estimate.timed_step(WARMUP_STEPS + 3, 10.0)
    assert not estimate.settled(10.0)
    estimate.timed_pause("eval", 2.0)
    assert not estimate.settled(10.0)  # the first evaluation also draws the plots the first time
    assert estimate.settled(SETTLE_SECONDS)
    estimate.timed_pause("eval", 1.0)
    assert estimate.settled(10.0)


def test_an_aurelius_like_run_is_estimated_within_a_quarter_once_its_first_steps_are_measured():
    """recipes/aurelius.toml's case: 600 steps, an evaluation over the whole validation split every 20 steps. The
    start-up guess (a typical MFU) was 25x too short; the run simulated here takes 1.3 s a step (+-30%) and 9 s an
    evaluation (12 s the first), and the corrected estimate is measured against its total."""
    rng = random.Random(0)
    estimate = RunEstimate({"step": 0.05, "eval": 0.5, "sample": 0.1}, eval_every=20, sample_every=200)
    planned, trained, wall, corrected = 600, 0.0, 0.0, None
    for step in range(1, planned + 1):
        took = 20.0 if step == 1 else 1.3 * rng.uniform(0.7, 1.3)
        trained, wall = trained + took, wall + took
        estimate.timed_step(step, trained)
        if corrected is None and estimate.settled(trained):
            corrected = wall + estimate.seconds_left(step, planned - step, None)["total"]
        if step % 20 == 0:
            pause = (12.0 if step == 20 else 9.0) + (2.0 if step % 200 == 0 else 0.0)
            estimate.timed_pause("eval", pause - (2.0 if step % 200 == 0 else 0.0))
            if step % 200 == 0:
                estimate.timed_pause("sample", 2.0)
            wall += pause
    startup = RunEstimate({"step": 0.05, "eval": 0.5, "sample": 0.1}, 20, 200).seconds_left(0, planned, None)["total"]
    assert startup < 0.1 * wall
    assert corrected == pytest.approx(wall, rel=0.25)


def test_the_start_up_guess_includes_every_evaluation_of_the_whole_validation_split(tiny_shards, tmp_path, single_thread):
    def left(*extra):
        cfg = tiny_config(tiny_shards, tmp_path / "run", "--train.max_steps=40", "--train.eval_batches=none", *extra)
        return Trainer(cfg, False, False, distributed.Dist(torch.device("cpu")))._time_left()

    rare, often = left("--train.eval_every=1000"), left("--train.eval_every=4")
    assert rare["train"] == often["train"] > 0
    assert often["pauses"] == pytest.approx(10 * rare["pauses"])  # 10 evaluations instead of 1 (the last step's)


def test_a_run_corrects_its_estimate_from_its_first_steps_and_reports_it(tiny_shards, tmp_path, single_thread, capsys):
    summary = train(tiny_config(tiny_shards, tmp_path / "run", "--train.max_steps=60", "--train.eval_every=5",
                                "--train.eval_batches=none", "--train.log_every=10"), verbose=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gptlab train:")]
    assert "evaluating and saving" in printed[0]  # the tiny model trains fast: the pauses are most of the run
    assert printed[1].startswith("gptlab train: measured") and "s an evaluation" in printed[1]
    estimate = summary["estimate"]
    assert estimate["corrected_at_step"] < 20 and estimate["startup_s"] > 0
    assert estimate["corrected_s"] == pytest.approx(summary["wall_s"], rel=0.25)
