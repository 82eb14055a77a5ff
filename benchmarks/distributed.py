"""Distributed training throughput: 1 process x 2 threads vs 2 processes x 1 thread (DDP, FSDP2), in one run.

Every row times the trainer's own step (TrainStep: forward, backward, clip, AdamW) on random tokens, with the
same global batch of 16 rows x 256 tokens; the multi-process rows run under torchrun on gloo, each process
on its 8 rows, wrapped by gptlab.train.distributed exactly as `gptlab train` wraps them.

Shapes (see train_throughput.py):
    1m     4 x 128, ctx 256, vocab 4096      the tiny-1m preset (the CPU speedrun's model)
    4m     4 x 256, ctx 256, vocab 4096      the tiny-4m preset
    16m    8 x 384, ctx 256, vocab 4096      the tiny-16m preset

Rows:
    1 proc x 2 threads     one process, the whole batch
    2 procs x 1 thread     ddp, fsdp: the batch split over two processes
    2 procs, no comm       both processes step a plain model on their 8 rows at the same time: the same
                           compute with nothing exchanged

The communication share of a step is 1 - t(no comm) / t(step): the time DDP's all-reduce (or FSDP's
all-gathers and reduce-scatters, with their copies in and out of the shards) adds to the compute. Rows
are interleaved over rounds and each keeps its best round, since other work on the machine only ever
slows a round down; a row slower than --row-seconds times fewer steps.

    python benchmarks/distributed.py                       # both shapes (under 4 minutes on 2 busy cores)
    python benchmarks/distributed.py --shapes 4m --steps 3
    python benchmarks/distributed.py --optimizer muon      # Muon (DDP only): its work shared out vs done whole

With --optimizer muon the FSDP row (which cannot run Muon) gives way to "ddp, Muon whole": every process
orthogonalising every matrix, as before the processes shared that work (optim.Muon's `ranks`).

The last line is `RESULT shape=16m single_tok_s=... ddp_tok_s=... fsdp_tok_s=... ddp_vs_single=...
fsdp_vs_single=... ddp_comm_share=... fsdp_comm_share=...` (the first shape measured if 16m is not among them);
with Muon `ddp_whole_tok_s=... shared_vs_whole=...` in place of the FSDP figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

from gptlab.config import ModelConfig, TrainConfig
from gptlab.model import build_model
from gptlab.train import distributed
from gptlab.train.optim import build_optimizer
from gptlab.train.step import TrainStep

SHAPES = {
    "1m": dict(n_layer=4, d_model=128, n_head=4, context_length=256, vocab=4096),
    "4m": dict(n_layer=4, d_model=256, n_head=4, context_length=256, vocab=4096),
    "16m": dict(n_layer=8, d_model=384, n_head=6, context_length=256, vocab=4096),
}
BATCH = 16  # rows of the global batch
MODES = {"adamw": ["nocomm", "ddp", "fsdp"], "muon": ["nocomm", "ddp", "ddp_whole"]}


def make_step(shape: dict, d: distributed.Dist | None, mode: str | None, optimizer: str = "adamw"):
    """The trainer's step on a model of `shape`: plain, or wrapped for `mode` as the trainer wraps it. Under
    "ddp" Muon's processes share its work, as in the trainer; "ddp_whole" is DDP with each doing all of it."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=shape["n_layer"], d_model=shape["d_model"], n_head=shape["n_head"],
                      context_length=shape["context_length"], vocab_size=shape["vocab"])
    model = build_model(cfg).train()
    wrap = {"ddp_whole": "ddp"}.get(mode, mode)
    wrapped = distributed.wrap(model, dataclasses.replace(d, mode=wrap), "fp32") if wrap in ("ddp", "fsdp") else model
    ranks = (d.rank, d.world_size) if mode == "ddp" else (0, 1)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=optimizer), torch.device("cpu"), ranks=ranks)
    step = TrainStep(wrapped, opt, torch.device("cpu"), "fp32")
    return lambda batch: step(lambda: batch, 1, 1e-3)


def batches(shape: dict, rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    T, V = shape["context_length"], shape["vocab"]
    tokens = [torch.randint(0, V, (rows, T + 1), generator=g) for _ in range(2)]
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def warm_up(step, data, args, agree=lambda seconds: seconds) -> int:
    """Untimed steps; returns how many steps a round times: --steps, fewer where the row is slow."""
    start = time.perf_counter()
    for i in range(args.warmup):
        step(data[i % len(data)])[0].item()
    pace = agree((time.perf_counter() - start) / max(args.warmup, 1))  # processes must time as many steps
    return max(1, min(args.steps, int(args.row_seconds / args.rounds / pace)))


def time_steps(step, data, steps: int, sync=lambda: None) -> float:
    """Seconds a step, over `steps` steps; `sync` lines the processes up before and after."""
    sync()
    start = time.perf_counter()
    for i in range(steps):
        loss, _ = step(data[i % len(data)])
    loss.item()
    sync()
    return (time.perf_counter() - start) / steps


def worker(args) -> None:
    """One of the torchrun processes: every multi-process row, every shape; rank 0 writes the times."""
    torch.set_num_threads(1)
    with distributed.process_group(TrainConfig(device="cpu", batch_size=BATCH)) as d:
        times = {}
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            data = batches(shape, BATCH // d.world_size, seed=d.rank)
            steps = {mode: make_step(shape, d, mode, args.optimizer) for mode in MODES[args.optimizer]}
            counts = {mode: warm_up(step, data, args, lambda s: distributed.agree(s)[0]) for mode, step in steps.items()}
            best = {mode: math.inf for mode in steps}
            for _ in range(args.rounds):  # rows interleaved: a busy spell on the machine hits them all alike
                for mode, step in steps.items():
                    # The slowest process sets the pace: take the largest time over the ranks.
                    seconds = time_steps(step, data, counts[mode], torch.distributed.barrier)
                    best[mode] = min(best[mode], distributed.agree(seconds)[0])
            times[name] = best
            del steps
        if d.main:
            with open(args.out, "w") as f:
                json.dump(times, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4m,16m", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the rows; each keeps its best (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--row-seconds", type=float, default=20,
                        help="timed seconds per row and shape, over all rounds: slow rows time fewer steps (default 20)")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="the step's optimizer (default adamw)")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # the workers' results file
    args = parser.parse_args()
    if distributed.launched_by_torchrun():
        return worker(args)

    # 2 processes x 1 thread, under torchrun (gloo), started first so the single-process row runs after it.
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               f"--shapes={args.shapes}", f"--steps={args.steps}", f"--rounds={args.rounds}", f"--warmup={args.warmup}",
               f"--row-seconds={args.row_seconds}", f"--optimizer={args.optimizer}", f"--out={out}"]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(out) as f:
            spread = json.load(f)

    torch.set_num_threads(2)
    single = {}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        step, data = make_step(shape, None, None, args.optimizer), batches(shape, BATCH, seed=0)
        count = warm_up(step, data, args)
        single[name] = min(time_steps(step, data, count) for _ in range(args.rounds))

    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, gloo, {args.optimizer}; global batch "
          f"{BATCH} rows; best of {args.rounds} rounds of up to {args.steps} steps after {args.warmup} warm-up step(s)")
    header = f"{'shape':6} {'row':26} {'tokens/s':>10} {'ms/step':>9} {'vs 1 proc':>9} {'comm share':>10}"
    print(header)
    print("-" * len(header))
    results = {}
    for name in args.shapes.split(","):
        tokens = BATCH * SHAPES[name]["context_length"]
        t = {"single": single[name], **spread[name]}
        r = results[name] = {key: tokens / seconds for key, seconds in t.items()}
        rows = [("single", "1 proc x 2 threads", None), ("ddp", "2 procs x 1 thread, ddp", "ddp"),
                ("fsdp", "2 procs x 1 thread, fsdp", "fsdp"), ("ddp_whole", "2 procs, ddp, Muon whole", "ddp_whole"),
                ("nocomm", "2 procs x 1 thread, no comm", None)]
        for key, label, comm in (row for row in rows if row[0] in t):
            # the no-comm row does all of Muon's work: against it, the shared row's would not be communication alone
            share = f"{1 - t['nocomm'] / t[comm]:.0%}" if comm and not (comm == "ddp" and "ddp_whole" in t) else ""
            print(f"{name:6} {label:26} {r[key]:10,.0f} {1000 * t[key]:9.1f} {r[key] / r['single']:8.2f}x {share:>10}")
        for comm in ("ddp", "fsdp", "ddp_whole"):
            if comm in t:
                r[f"{comm}_comm_share"] = 1 - t["nocomm"] / t[comm]

    name = "16m" if "16m" in results else next(iter(results))
    r = results[name]
    last = (f"fsdp_tok_s={r['fsdp']:.0f} ddp_vs_single={r['ddp'] / r['single']:.2f} fsdp_vs_single={r['fsdp'] / r['single']:.2f} "
            f"ddp_comm_share={r['ddp_comm_share']:.2f} fsdp_comm_share={r['fsdp_comm_share']:.2f}" if "fsdp" in r else
            f"ddp_whole_tok_s={r['ddp_whole']:.0f} ddp_vs_single={r['ddp'] / r['single']:.2f} "
            f"shared_vs_whole={r['ddp'] / r['ddp_whole']:.2f} ddp_whole_comm_share={r['ddp_whole_comm_share']:.2f}")
    print(f"RESULT shape={name} optimizer={args.optimizer} single_tok_s={r['single']:.0f} ddp_tok_s={r['ddp']:.0f} {last}")


if __name__ == "__main__":
    main()
