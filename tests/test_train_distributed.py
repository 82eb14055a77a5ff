"""Distributed training under torchrun on CPU (gloo): DDP and FSDP2 against one process, checkpoints across
world sizes, two "nodes" on localhost, a killed worker restarted, a hung rank timing out.

Every run is launched the way users launch it -- `python -m torch.distributed.run ... -m gptlab train` or
`gptlab train --nproc 2` -- with a tiny model and one thread a process. A run of 2 processes x batch B must
train exactly as 1 process x batch 2B: the ranks draw slices of the same global batches.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from gptlab.cli import main
from gptlab.config import load_config
from gptlab.errors import GptlabError
from gptlab.runs import checkpoint_dirs, load_run
from gptlab.train import distributed, train
from gptlab.train.distributed import check_config, torchrun_command

STEPS = 20


def settings(data_dir, *extra) -> list[str]:
    """A 2-layer, 32-wide GPT on the tiny shards; 2 rows a rank a micro-step, 2 micro-steps (no_sync once);
    a sample every 10 steps (FSDP gathers the whole model for it; sampling leaves the training RNG alone)."""
    return [
        f"--train.data_dir={json.dumps(str(data_dir))}", "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2",
        "--model.context_length=32", "--train.batch_size=4", "--train.grad_accum=2", f"--train.max_steps={STEPS}",
        "--train.eval_every=10", "--train.eval_batches=3", "--train.log_every=1", "--train.warmup_steps=2",
        "--train.lr=3e-3", "--train.min_lr_ratio=0.1", "--train.precision=fp32", "--train.compile=false",
        "--train.peak_flops=1e11", "--train.threads=1", "--train.keep_last=2", "--train.sample_every=10",
        "--train.sample_prompt=Once", "--train.sample_tokens=4", *extra,
    ]


def torchrun(args: list[str], nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", "-m", "gptlab", "train", *args]


def run(cmd: list[str], timeout: float = 240) -> str:
    """The output of cmd, which must succeed within timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = output_of(proc, timeout)
    assert proc.returncode == 0, output[-6000:]
    return output


def output_of(proc: subprocess.Popen, timeout: float) -> str:
    """proc's output once it ends; if it is still running after timeout, the test fails with every worker's
    stacks (gptlab's torchrun workers print them on SIGUSR1) and no process of the tree is left behind."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        for child in tree:  # one at a time, so that their stacks do not interleave
            with contextlib.suppress(psutil.Error):
                if "torch.distributed.run" not in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGUSR1)
                    time.sleep(1.5)
        for child in [*tree, psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                child.kill()
        pytest.fail(f"still running after {timeout} s:\n" + proc.communicate()[0][-12000:])


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} from metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r[key]}


def assert_same_curve(run_dir: Path, reference: Path) -> None:
    got, want = losses(run_dir), losses(reference)
    with open(run_dir / "metrics.csv") as f:
        assert len(f.readlines()) == 1 + STEPS  # one row a step: only rank 0 writes metrics.csv
    assert list(got) == list(want) == list(range(1, STEPS + 1))
    assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-5)
    # Validation batches have other shapes (rows per rank), so sums round differently; metrics.csv keeps 6 digits.
    got, want = losses(run_dir, "val_loss"), losses(reference, "val_loss")
    assert [got[step] for step in want] == pytest.approx(list(want.values()), abs=2e-5)


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    """runs(name) -> the run directory of one of the reference runs, trained once for the module."""
    root = tmp_path_factory.mktemp("distributed")

    @functools.cache
    def get(name: str) -> Path:
        out = root / name
        if name == "single":  # 1 process x batch 4: the reference
            threads = torch.get_num_threads()
            train(load_config(None, settings(tiny_shards, f"--train.run_dir={json.dumps(str(out))}")), verbose=False)
            torch.set_num_threads(threads)
        elif name == "ddp":  # the shortcut: gptlab train --nproc 2 (DDP by default), 2 processes x 2 rows
            run([sys.executable, "-m", "gptlab", "train", "--nproc", "2", "--run", str(out), *settings(tiny_shards)])
        elif name == "fsdp":
            run(torchrun(["-r", str(out), "--distributed", "fsdp", *settings(tiny_shards)]))
        return out

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_exactly_as_one_with_the_global_batch(runs, mode):
    single, spread = runs("single"), runs(mode)
    assert_same_curve(spread, single)

    summary = json.loads((spread / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["processes"] == 2 and summary["distributed"] == mode
    assert summary["tokens"] == json.loads((single / "summary.json").read_text())["tokens"]  # the same global batch

    # Sharded checkpoints, each with the whole model in one safetensors file that load_run reads as usual.
    last = checkpoint_dirs(spread)[-1]
    assert last.name == f"step_{STEPS:07d}" and (last / "dcp" / ".metadata").is_file()
    assert "optimizer" not in torch.load(last / "state.pt", weights_only=True)  # it is in the shards
    assert not list((spread / "checkpoints").glob(".*"))  # no temporary folder left
    samples = (spread / "samples.md").read_text()
    assert samples.count("## step") == 2 and "## step 20" in samples  # written once, by rank 0
    got, _, _ = load_run(spread, "last")
    want, _, _ = load_run(single, "last")
    for name, tensor in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("fsdp", "ddp"), ("fsdp", "single"), ("single", "fsdp")])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, saved, resumed):
    """Saved at step 10 by one layout, resumed by another: steps 11-20 are the uninterrupted run's."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs(saved), run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:07d}")
    if resumed == "single":
        train(load_config(run_dir / "config.toml"), resume=True, verbose=False)
    else:
        run(torchrun(["--resume", str(run_dir), "--distributed", resumed, "-q"]))
    assert_same_curve(run_dir, runs("single"))


@pytest.mark.slow
def test_two_processes_with_dropout_resume_exactly(tiny_shards, tmp_path):
    """10 steps + resume + 10 steps == 20 steps, bit for bit, with dropout: every rank's RNG is in the checkpoint."""
    extra = ["--model.dropout=0.2", "--train.schedule=constant"]
    run(torchrun(["-r", str(tmp_path / "straight"), *settings(tiny_shards, *extra)]))
    run(torchrun(["-r", str(tmp_path / "split"), *settings(tiny_shards, *extra, "--train.max_steps=10")]))
    assert len(torch.load(tmp_path / "split" / "checkpoints" / "step_0000010" / "state.pt", weights_only=True)["rng"]) == 2
    run(torchrun(["--resume", str(tmp_path / "split"), f"--train.max_steps={STEPS}", "-q"]))
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    got, _, _ = load_run(tmp_path / "split", "last")
    want, _, _ = load_run(tmp_path / "straight", "last")
    assert all(torch.equal(got.state_dict()[k], t) for k, t in want.state_dict().items())


@pytest.mark.slow
def test_two_nodes_on_localhost_meet_through_the_c10d_rendezvous(runs, tiny_shards, tmp_path):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=two-nodes")
    cmd = torchrun(["-r", str(tmp_path / "run"), *settings(tiny_shards)], nproc=1, launcher=launcher)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [output_of(node, timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_same_curve(tmp_path / "run", runs("single"))


def _workers(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, psutil.Process]:
    """The processes torchrun started, by rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "gptlab" in " ".join(child.cmdline()):
                found[int(rank)] = child
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError("torchrun's workers did not start")


def _wait_for(predicate, launcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_resumes_from_its_last_checkpoint(runs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = torchrun(["-r", str(run_dir), *settings(tiny_shards, "--train.eval_every=2")], launcher=("--standalone", "--max-restarts=1"))
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = _workers(launcher)
        _wait_for(lambda: (run_dir / "checkpoints" / "step_0000004").is_dir(), launcher)
        workers[0].suspend()  # hold the run where it is (before it can finish) while rank 1 dies
        workers[1].kill()
        workers[0].resume()
        output = launcher.communicate(timeout=240)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert "resuming at step" in output  # the restarted workers continued the run instead of starting over
    assert_same_curve(run_dir, runs("single"))


@pytest.mark.slow
def test_a_hung_rank_makes_the_others_stop_with_a_clear_message_within_the_timeout(tiny_shards, tmp_path):
    timeout = 4
    cmd = torchrun(["-r", str(tmp_path / "run"), *settings(tiny_shards, "--train.max_steps=100000", "--train.eval_every=5",
                                                            f"--train.dist_timeout={timeout}")])
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = _workers(launcher)
        _wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_0000005").is_dir(), launcher)
        workers[1].suspend()  # alive but silent: rank 0's next collective has no partner
        hung_at = time.monotonic()
        try:
            workers[0].wait(timeout=timeout + 30)
        except psutil.TimeoutExpired:
            os.kill(workers[0].pid, signal.SIGUSR1)  # rank 0 prints where it is stuck
            time.sleep(2)
            launcher.kill()
            pytest.fail("rank 0 did not stop:\n" + launcher.communicate(timeout=60)[0][-6000:])
        waited = time.monotonic() - hung_at
        workers[1].kill()
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert waited < timeout + 30  # (rank 0 may have been waiting for rank 1 before the suspension, so less is fine)
    assert "gptlab: error: rank 0 of 2 lost contact with the others" in output, output[-3000:]
    assert f"train.dist_timeout={timeout}" in output


# --------------------------------------------------------------------------- settings checked before launching


@pytest.mark.parametrize("override, world, message", [
    ("--train.batch_size=5", 2, "train.batch_size=5 does not split over 2 processes"),
    ("--train.optimizer=muon", 2, "train.optimizer=muon cannot run under train.distributed=fsdp"),
])
def test_settings_that_cannot_be_spread_are_one_line_errors(override, world, message):
    cfg = load_config(None, ["--train.distributed=fsdp", "--train.batch_size=4", override])
    with pytest.raises(GptlabError, match=message):
        check_config(cfg.train, world)
    check_config(load_config(None, ["--train.distributed=ddp", "--train.optimizer=muon"]).train, 2)  # Muon is fine with DDP
    with pytest.raises(GptlabError, match="fp16 is not supported with train.distributed=fsdp"):
        check_config(load_config(None, ["--train.distributed=fsdp"]).train, 2, "fp16")


def test_nproc_checks_the_settings_then_launches_torchrun_on_a_copy_of_the_config(tiny_shards, tmp_path, capsys, monkeypatch):
    launched = []

    def fake_torchrun(cmd, **kw):  # what the workers would be given, read before the launcher deletes it
        launched.append((cmd, load_config(cmd[cmd.index("--config") + 1], [])))
        return 1

    monkeypatch.setattr(subprocess, "call", fake_torchrun)
    args = ["train", "--nproc", "2", "--run", str(tmp_path / "run"), *settings(tiny_shards)]
    assert main([*args, "--train.batch_size=3"]) == 2  # 3 rows do not split over 2 processes
    assert "train.batch_size=3 does not split over 2 processes" in capsys.readouterr().err
    assert main(["train", "--nproc", "0", *settings(tiny_shards)]) == 2
    assert "train.nproc" in capsys.readouterr().err
    assert not launched

    assert main([*args, "--distributed", "fsdp"]) == 2  # the workers failed (exit code 1), and wrote no summary
    assert "training in 2 processes failed (torchrun's exit code 1)" in capsys.readouterr().err
    cmd, cfg = launched[0]
    assert cmd[:cmd.index("-m", 3)] == torchrun_command(2, [])[:-2]  # python -m torch.distributed.run --standalone ...
    assert cmd[cmd.index("gptlab") + 1:cmd.index("--config")] == ["train"] and "--resume-here" not in cmd
    assert (cfg.train.nproc, cfg.train.distributed, cfg.train.run_dir) == (2, "fsdp", str(tmp_path / "run"))
    assert not list(tmp_path.glob("run/*.toml"))  # nothing of the launch left in the run folder


def test_a_worker_of_nproc_trains_instead_of_launching_again(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("launched torchrun from a worker"))
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    alone = distributed.Dist(torch.device("cpu"))  # what process_group gives a process that torchrun did not start
    monkeypatch.setattr(distributed, "process_group", contextlib.contextmanager(lambda cfg: iter([alone])))
    assert main(["train", "--nproc", "2", "-q", "--run", str(tmp_path / "run"), *settings(tiny_shards)]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()


def test_lost_contact_prints_its_line_and_ends_the_process_at_once(monkeypatch, capsys):
    # Threads blocked on a silent peer would keep the interpreter from exiting; os._exit does not wait for them.
    from gptlab import cli

    def lose_contact(args):
        d = distributed.Dist(rank=1, local_rank=1, world_size=2, local_world_size=2, restart=0, mode="ddp",
                             device=torch.device("cpu"), checkpoint_group=None)
        raise distributed.lost_contact(RuntimeError("[../gloo/transport.cc:12] Timed out waiting 4000ms"), d, 7, 4)

    exits = []
    monkeypatch.setattr(cli, "_train", lose_contact)
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    cli.main(["train"])
    assert exits == [2]
    err = capsys.readouterr().err
    assert err.startswith("gptlab: error: rank 1 of 2 lost contact with the others at step 7: Timed out waiting 4000ms")
    assert err.count("\n") == 1 and "train.dist_timeout=4" in err
