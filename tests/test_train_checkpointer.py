"""The Checkpointer on its own: durable saves, best.json (strictly better only), pruning after the new
checkpoint is on the disk, leftovers of a killed save, loading back, every rank's RNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gptlab.config import config_to_dict
from gptlab.model import build_model
from gptlab.runs import checkpoint_dirs, load_state, read_info
from gptlab.train import checkpoint as ckpt
from gptlab.train.distributed import Dist


@pytest.fixture
def parts(tiny_model_config, tmp_path):
    """(make, run_dir): make(keep_last) -> a Checkpointer over a tiny model and its AdamW, one process."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4), dtype=torch.long))[1].backward()
    optimizer.step()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    about = {"model": config_to_dict(tiny_model_config), "tokenizer_checksum": "t", "data_fingerprint": "d"}

    def make(keep_last: int = 2) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(tmp_path / "run", keep_last, Dist(torch.device("cpu")), model, model, optimizer,
                                 list(model.state_dict()), about)

    return make, tmp_path / "run"


def best_of(run) -> dict:
    return json.loads((run / "checkpoints" / "best.json").read_text())


def test_best_moves_only_when_strictly_better_and_pruning_keeps_the_last_and_the_best(parts):
    make, run = parts
    c = make(keep_last=2)
    c.save(1, 10, {"step": 1}, val_loss=3.0, best=True)
    c.save(2, 20, {"step": 2}, val_loss=2.0, best=True)
    c.save(3, 30, {"step": 3}, val_loss=2.0, best=False)  # a tie: the validator says not best
    c.save(4, 40, {"step": 4}, val_loss=2.5, best=False)
    c.save(5, 50, {"step": 5})  # a final checkpoint without evaluation
    assert best_of(run) == {"checkpoint": "step_0000002", "val_loss": 2.0}
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002", "step_0000004", "step_0000005"]
    assert c.last.name == "step_0000005"
    assert c.save(5, 50, {"step": 5}) == c.last  # the same step again: nothing new
    info = read_info(c.last)
    assert (info["step"], info["tokens"], info["val_loss"], info["tokenizer_checksum"]) == (5, 50, None, "t")


def test_a_save_is_on_the_disk_before_it_is_renamed_marked_best_or_older_ones_pruned(parts, monkeypatch):
    make, run = parts
    c = make(keep_last=1)
    c.save(1, 10, {"step": 1}, val_loss=3.0, best=True)
    events = []

    def record(kind, real):
        return lambda path, *a, **k: (events.append((kind, Path(path).name)), real(path, *a, **k))[1]

    monkeypatch.setattr(ckpt, "fsync_file", record("fsync", ckpt.fsync_file))
    monkeypatch.setattr(ckpt, "fsync_dir", record("fsync", ckpt.fsync_dir))
    monkeypatch.setattr(os, "rename", record("rename", os.rename))
    monkeypatch.setattr(ckpt, "mark_best", record("best", lambda run_dir, path, loss: ckpt.atomic_write_json(
        Path(run_dir) / "checkpoints" / "best.json", {"checkpoint": path.name, "val_loss": loss})))
    monkeypatch.setattr(ckpt.shutil, "rmtree", record("delete", ckpt.shutil.rmtree))
    c.save(2, 20, {"step": 2}, val_loss=2.0, best=True)
    tmp = next(name for kind, name in events if kind == "rename")
    assert tmp.startswith(".step_0000002.") and tmp.endswith(".tmp")
    assert events == [("fsync", "model.safetensors"), ("fsync", "state.pt"), ("fsync", tmp), ("rename", tmp),
                      ("fsync", "step_0000002"), ("fsync", "checkpoints"),  # the folder, then the rename itself
                      ("best", "run"), ("delete", "step_0000001")]  # only then: best.json, and the older one goes
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002"]
    assert best_of(run) == {"checkpoint": "step_0000002", "val_loss": 2.0}


def test_a_folder_left_by_a_killed_save_is_removed_by_the_next_and_a_killed_best_mark_is_redone_on_load(parts):
    make, run = parts
    c = make(keep_last=1)
    c.save(1, 10, {"step": 1}, val_loss=3.0, best=True)
    stale = run / "checkpoints" / ".step_0000002.abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    path = c.save(2, 20, {"step": 2}, val_loss=2.0, best=True)
    assert not stale.exists()
    # As if killed right after the rename: best.json still names step 1, and step 1 was not pruned.
    (run / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": "step_0000001", "val_loss": 3.0}))
    state = make(keep_last=1).load(path)
    assert state["step"] == 2 and len(state["rng"]) == 1 and "optimizer" in state
    assert best_of(run) == {"checkpoint": "step_0000002", "val_loss": 2.0}
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002"]


def test_load_puts_the_optimizer_state_back(parts):
    make, _ = parts
    c = make()
    path = c.save(1, 10, {"step": 1})
    saved = c.optimizer.state_dict()
    fresh = torch.optim.AdamW(c.model.parameters(), lr=1e-3)
    c.optimizer = fresh
    c.load(path)
    for key, value in saved["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)
    state = load_state(path, torch.device("cpu"))  # weights_only: no pickle
    assert state["step"] == 1


def test_rng_streams_per_rank_and_restored_per_rank():
    ckpt.seed_everything(7, 0)
    a = torch.rand(4)
    ckpt.seed_everything(7, 1)
    b = torch.rand(4)
    ckpt.seed_everything(7)
    init = torch.rand(4)
    assert not torch.equal(a, b) and not torch.equal(a, init)
    ckpt.seed_everything(7, 1)
    saved = [None, ckpt.rng_state()]
    after = torch.rand(4)
    ckpt.restore_rng(saved, 1, 2, 7, 100)
    assert torch.equal(torch.rand(4), after)
    ckpt.restore_rng(saved, 1, 3, 7, 100)  # another world size: a fresh stream of this rank's
    x = torch.rand(4)
    ckpt.seed_everything(7, 100, 1)
    assert torch.equal(torch.rand(4), x)
