"""Faults as a crash meets them: a training run SIGKILLed at seeded random moments -- inside a step, as
validation starts, while a checkpoint is being written, renamed or the older ones pruned -- and resumed each
time ends with the weights of a run never interrupted, and every checkpoint left on disk loads. The same for
`gptlab data prepare` killed between two of its checkpoints: resumed, it writes the same shards, byte for byte.

The kills come from inside: each attempt runs in a subprocess whose chosen function kills the process on its
n-th call (DRIVER), so a kill lands exactly where it is meant to, on any machine, however busy.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import torch
from helpers import TINY_STORIES, read_metrics, tiny_config, weights

from gptlab.config import load_config, save_config
from gptlab.data import prepare_data
from gptlab.runs import checkpoint_dirs, load_run, load_state
from gptlab.train import train

DRIVER = r"""
import os, signal, sys

import gptlab.data
from gptlab.data.loader import BatchLoader
from gptlab.data.prepare import Preparation
from gptlab.train import checkpoint

POINTS = {
    "step": (BatchLoader, "next_batch", False),  # a step's micro-batch (two a step: also between them)
    "eval": (gptlab.data, "iter_eval_batches", False),  # validation starting
    "save": (checkpoint.torch, "save", False),  # a checkpoint's weights written, its state.pt not
    "rename": (checkpoint, "_rename_durably", False),  # a complete temporary folder, not renamed into place
    "prune": (checkpoint, "prune_checkpoints", False),  # renamed and marked best, older ones not deleted yet
    "prepare": (Preparation, "_add", True),  # tokens written past data prepare's last checkpoint
}


def kill_on_call(owner, name, after, n):
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


point, n = sys.argv[1], int(sys.argv[2])
if point in POINTS:
    kill_on_call(*POINTS[point], n)
from gptlab.cli import main

sys.exit(main(sys.argv[3:]))
"""

# How many calls of each point one attempt may make before its kill: few enough that every kill lands.
TRAIN_POINTS = {"step": 8, "eval": 2, "save": 2, "rename": 2, "prune": 2}
SETTINGS = ["--model.dropout=0.1", "--train.max_steps=16", "--train.eval_every=4", "--train.grad_accum=2",
            "--train.keep_last=2", "--train.log_every=2", "--train.schedule=cosine"]


def attempt(point: str, n: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, point, str(n), *argv], capture_output=True, text=True,
                          check=False, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_training_killed_at_random_moments_and_resumed_ends_with_the_uninterrupted_weights(tiny_shards, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(tiny_shards, straight, *SETTINGS), verbose=False)

    run, config = tmp_path / "run", tmp_path / "config.toml"
    save_config(tiny_config(tiny_shards, run, *SETTINGS), config)
    choice, kills = random.Random(29), []  # kills mid-step, before a rename, as validation starts
    for _ in range(4):  # three kills, then a last attempt left alone
        point = choice.choice(sorted(TRAIN_POINTS)) if len(kills) < 3 else "none"
        n = choice.randint(1, TRAIN_POINTS.get(point, 1))
        start = ["--resume", str(run)] if checkpoint_dirs(run) else ["--config", str(config)]
        done = attempt(point, n, "train", *start, "-q")
        if done.returncode == -signal.SIGKILL:
            kills.append(f"{point}:{n}")
        else:
            assert done.returncode == 0, done.stderr[-3000:]
        for folder in checkpoint_dirs(run):  # whatever a kill left behind loads
            load_run(folder)
            assert load_state(folder, torch.device("cpu"))["step"] == int(folder.name.split("_")[1])
        if done.returncode == 0:
            break
    assert len(kills) == 3, kills
    assert json.loads((run / "summary.json").read_text())["steps"] == 16

    def curve(r):
        return [(row["step"], row["loss"], row["val_loss"]) for row in read_metrics(r)]

    assert curve(run) == curve(straight)
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".*"))  # the temporary folder of the killed save was removed
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == json.loads((straight / "checkpoints" / "best.json").read_text())


def test_data_prepare_killed_midway_and_resumed_writes_the_same_shards(tiny_tokenizer, tmp_path):
    # ~1.5 MB of numbered stories: two of data prepare's 1 MB chunks, a few dozen shards
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{i}. {s}\n<|endoftext|>\n" for i in range(4500) for s in TINY_STORIES[i % 6:][:4]),
                      encoding="utf-8")
    args = ["--data", str(corpus), "--tokenizer", str(tiny_tokenizer), "--data.shard_size=20000", "--data.workers=1"]

    whole = tmp_path / "whole"
    cfg = load_config(None, [f"--data.sources=[{{path={json.dumps(str(corpus))}}}]", f"--data.out_dir={json.dumps(str(whole))}",
                             "--data.shard_size=20000", "--data.workers=1"])
    prepare_data(cfg, tiny_tokenizer)

    out = tmp_path / "resumed"
    killed = attempt("prepare", 1, "data", "prepare", *args, "--out", str(out), "-q")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "meta.json").exists() and list(out.glob("*.bin"))  # some shards were done, not the folder
    finished = attempt("none", 0, "data", "prepare", *args, "--out", str(out), "-q")
    assert finished.returncode == 0, finished.stderr[-3000:]

    shards = sorted(p.name for p in whole.glob("*.bin"))
    assert len(shards) > 10 and shards == sorted(p.name for p in out.glob("*.bin"))
    assert all((whole / name).read_bytes() == (out / name).read_bytes() for name in shards)
    assert json.loads((out / "meta.json").read_text())["splits"] == json.loads((whole / "meta.json").read_text())["splits"]
    assert not list(out.glob(".*"))  # no partial shard or progress file left
