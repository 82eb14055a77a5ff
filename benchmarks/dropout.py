"""What dropout costs a training step: dropout 0 vs 0.1 at the aurelius-845k shape, in bf16 and fp32, in one run.

aurelius-845k (6 x 80, 4 heads, ctx 512, vocab 2,000; post-norm, sinusoids, ReLU) is the preset of a recipe
that trains with dropout 0.1, batch 8 x 512. Each row times gptlab's own TrainStep (forward, backward, AdamW
step) on random tokens, eager; rows are interleaved over rounds and each keeps its best round (other work on
the machine only ever slows a round down). The cost is ms/step with dropout over ms/step without.

    python benchmarks/dropout.py                  # every core
    python benchmarks/dropout.py --threads 2 --rounds 3 --steps 3

The last line is `RESULT dropout_cost_bf16=... dropout_cost_fp32=... cpu=<torch's CPU capability>`.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab.config import MODEL_PRESETS, ModelConfig, TrainConfig
from gptlab.device import cpu_has_fast_bf16, set_threads
from gptlab.model import build_model
from gptlab.train.optim import build_optimizer
from gptlab.train.step import TrainStep

PRESET, BATCH = "aurelius-845k", 8


def make_step(precision: str, dropout: float, attention: str):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**MODEL_PRESETS[PRESET], "dropout": dropout, "attention": attention})
    device = torch.device("cpu")
    model = build_model(cfg, device).train()
    step = TrainStep(model, build_optimizer(model, TrainConfig(lr=1e-3), device), device, precision)
    return lambda batch: step(lambda: batch, 1, 1e-3)[0]


def time_steps(step, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    loss.item()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = every core)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows (default 3)")
    parser.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"cpu {capability}, native bf16 {cpu_has_fast_bf16()}, {threads} threads, torch {torch.__version__}; "
          f"{PRESET}, batch {BATCH}; best of {args.rounds} rounds of {args.steps} steps")
    T, V = MODEL_PRESETS[PRESET]["context_length"], MODEL_PRESETS[PRESET]["vocab_size"]
    tokens = torch.randint(0, V, (BATCH, T + 1), generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    variants = [(0.0, "sdpa"), (0.1, "sdpa"), (0.1, "plain")]
    rows = {(p, d, a): make_step(p, d, a) for p in args.precisions.split(",") for d, a in variants}
    for step in rows.values():
        step(batch).item()  # warm-up: first-call allocations and kernel choices
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(args.rounds):
        for key, step in rows.items():
            best[key] = min(best[key], time_steps(step, batch, args.steps))
    header = f"{'precision':9} {'dropout':>7} {'attention dropout on':>21} {'tokens/s':>10} {'ms/step':>9} {'cost':>6}"
    print(header + "\n" + "-" * len(header))
    cost = {}
    for (precision, dropout, attention), seconds in best.items():
        cost[precision, attention] = seconds / best[(precision, 0.0, "sdpa")]
        where = {"sdpa": "values (fused kernel)", "plain": "probabilities"}[attention] if dropout else ""
        print(f"{precision:9} {dropout:7.1f} {where:>21} {BATCH * T / seconds:10,.0f} {1000 * seconds:9.1f} "
              f"{cost[precision, attention]:5.2f}x")
    print("RESULT " + " ".join(f"dropout_cost_{p}={cost[p, 'sdpa']:.2f}" for p in args.precisions.split(","))
          + " " + " ".join(f"probabilities_cost_{p}={cost[p, 'plain']:.2f}" for p in args.precisions.split(","))
          + f" cpu={capability}")


if __name__ == "__main__":
    main()
