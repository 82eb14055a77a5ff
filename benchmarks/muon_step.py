"""Muon's step under DDP: every process orthogonalising every matrix, or each its share (optim.Muon's `ranks`).

The processes of a DDP run hold the same averaged gradients, so each can run the Newton-Schulz iterations for
half of the matrices and one all-reduce of the updates gives both all of them. Per preset: Muon's step on one
thread for the whole set of matrices (each process before) and for each rank's share (the all-reduce left out),
then that all-reduce itself, timed between 2 gloo processes on the flat updates' size. What a process saves a
step is the whole step less the slower share less the all-reduce.

    python benchmarks/muon_step.py
    python benchmarks/muon_step.py --presets tiny-1m --steps 30

The last line is `RESULT cpu=... <preset>_saved_ms=... <preset>_whole_ms=...` for each preset.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from unittest import mock

import torch
import torch.distributed as dist

from gptlab.config import TrainConfig, load_config
from gptlab.model import GPT
from gptlab.train.optim import build_optimizer


def muon_ms(model: GPT, ranks: tuple[int, int], steps: int) -> float:
    """Median ms of Muon's step for `ranks` (its all-reduce skipped: timed on its own below)."""
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"), ranks=ranks).optimizers[1]
    params = [p for g in muon.param_groups for p in g["params"]]
    times = []
    with mock.patch.object(dist, "all_reduce"):
        for _ in range(steps + 3):
            for p in params:
                p.grad = torch.randn_like(p)
            start = time.perf_counter()
            muon.step()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[3:])


def _all_reduce_rank(rank: int, store: str, sizes: list[int], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = {}
        for n in sizes:
            x = torch.randn(n)
            for _ in range(3):
                dist.all_reduce(x)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                dist.all_reduce(x)
            dist.barrier()
            result[n] = 1e3 * (time.perf_counter() - start) / steps
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny-1m,tiny-4m,tiny-16m", help="comma-separated model presets")
    parser.add_argument("--steps", type=int, default=12, help="timed steps each (after 3 untimed)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each process of a 2-core DDP run
    rows = []
    for preset in args.presets.split(","):
        model = GPT(load_config(None, [f"--model.preset={preset}", "--model.vocab_size=4096"]).model)
        size = sum(p.numel() for g in build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
                   .optimizers[1].param_groups for p in g["params"])
        rows.append((preset, size, muon_ms(model, (0, 1), args.steps), muon_ms(model, (0, 2), args.steps),
                     muon_ms(model, (1, 2), args.steps)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "all_reduce.pt")
        torch.multiprocessing.spawn(_all_reduce_rank, args=(os.path.join(tmp, "store"), [r[1] for r in rows],
                                    args.steps, out), nprocs=2, join=True)
        reduce_ms = torch.load(out, weights_only=True)

    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, 1 thread a process; "
          f"median of {args.steps} steps")
    header = (f"{'preset':10} {'Muon weights':>12} {'whole ms':>9} {'rank 0 ms':>9} {'rank 1 ms':>9} {'all-reduce ms':>13} "
              f"{'saved ms':>9}")
    print(header + "\n" + "-" * len(header))
    result = []
    for preset, size, whole, rank0, rank1 in rows:
        saved = whole - max(rank0, rank1) - reduce_ms[size]
        print(f"{preset:10} {size:12,d} {whole:9.1f} {rank0:9.1f} {rank1:9.1f} {reduce_ms[size]:13.1f} {saved:9.1f}")
        name = preset.replace("-", "_")
        result += [f"{name}_saved_ms={saved:.1f}", f"{name}_whole_ms={whole:.1f}"]
    print(f"RESULT cpu={torch.backends.cpu.get_cpu_capability()} " + " ".join(result))


if __name__ == "__main__":
    main()
