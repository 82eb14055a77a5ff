"""Where a speedrun's training step spends its time: a torch.profiler breakdown of the recipe's step.

Builds the recipe's model and optimizer (recipes/speedrun_cpu.toml unless another is given; dotted
overrides as for `gptlab speedrun`), times `--steps` training steps on random tokens of the recipe's
batch shape with the trainer's own TrainStep, and prints

    phases     forward, backward, gradient clip, optimizer step: ms a step and share
    operators  the operators that take the most time (self time, all phases)
    matmuls    their achieved GFLOP/s against the fp32 peak `gptlab bench peak` measured here (the peer:
               what this machine's matmul can do), and the step's MFU

    python benchmarks/speedrun_profile.py
    python benchmarks/speedrun_profile.py --steps 20 --model.mlp=relu2
    python benchmarks/speedrun_profile.py recipes/speedrun_nanogpt_char.toml
    python benchmarks/speedrun_profile.py --compile      # the step torch.compile'd, its fused kernels named

The last line is `RESULT step_ms=... tokens_per_s=... forward_share=... backward_share=...
optimizer_share=... matmul_share=... matmul_gflops=... peak_gflops=... mfu=...`.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptlab.device import DTYPES, keep_freed_memory, peak_flops, pick_device, pick_precision, set_threads
from gptlab.model import build_model
from gptlab.speedrun import load_speedrun_config
from gptlab.train.optim import build_optimizer
from gptlab.train.step import TrainStep

PHASES = ("forward", "backward", "clip", "optimizer")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a speedrun recipe TOML (default: recipes/speedrun_cpu.toml)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (after 5 untimed warm-up steps)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (as a long run does), each of inductor's kernels named in the profile")
    args, overrides = parser.parse_known_args()
    if args.compile:  # otherwise the profiler sees one opaque call per compiled graph
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    cfg = load_speedrun_config(args.recipe, overrides)
    threads = set_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    keep_freed_memory(device)  # as the trainer does: the profile shows its step, not page faults it no longer has
    precision = pick_precision(cfg.train.precision, device)
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    model = build_model(cfg.model, device)
    optimizer = build_optimizer(model, cfg.train, device)
    step = TrainStep(model, optimizer, device, precision, cfg.train.grad_clip, compile=args.compile)
    batch, ctx = cfg.train.batch_size, cfg.model.context_length
    data = torch.randint(0, cfg.model.vocab_size, (batch, ctx + 1))

    def next_batch():
        return data[:, :-1], data[:, 1:]

    for _ in range(5):  # compiling, where --compile, happens here
        step(next_batch, 1, cfg.train.lr)
    clock = time.perf_counter()  # the step's real time: the profiler slows what it watches
    for _ in range(args.steps):
        step(next_batch, 1, cfg.train.lr)
    seconds = (time.perf_counter() - clock) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        clock = time.perf_counter()
        for _ in range(args.steps):
            step(next_batch, 1, cfg.train.lr)
        profiled = (time.perf_counter() - clock) / args.steps
    events = prof.key_averages()

    # The profiler adds a cost to every operator it records, which inflates the many small ones: times in the
    # tables are the profiled ones, the step time and tokens/s the unprofiled ones.
    profiled_ms, step_ms = profiled * 1e3, seconds * 1e3
    phase_ms = {p: next((e.cpu_time_total for e in events if e.key == p), 0.0) / 1e3 / args.steps for p in PHASES}
    tokens_per_s = batch * ctx / seconds
    matmul = [e for e in events if e.key in MATMULS]
    matmul_ms = sum(e.self_cpu_time_total for e in matmul) / 1e3 / args.steps
    matmul_flop = sum(e.flops for e in matmul) / args.steps
    peak = peak_flops(device, DTYPES[precision])
    mfu = matmul_flop / seconds / peak

    params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model.n_layer} layers x {cfg.model.d_model}, ctx {ctx}, batch {batch}, vocab {cfg.model.vocab_size}, "
          f"mlp {cfg.model.mlp}, {params / 1e6:.2f}M parameters, {cfg.train.optimizer}, {precision}, "
          f"{'compiled' if args.compile else 'eager'}, {threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    print(f"step: {step_ms:.0f} ms, {tokens_per_s:,.0f} tokens/s ({profiled_ms:.0f} ms under the profiler, "
          f"which the times below come from)")
    print(f"\n{'phase':<12}{'ms/step':>10}{'share':>8}")
    for p in PHASES:
        print(f"{p:<12}{phase_ms[p]:>10.1f}{phase_ms[p] / profiled_ms:>8.0%}")
    print(f"\n{'operator (self time)':<72}{'ms/step':>10}{'share':>8}")
    top = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    for e in top:
        ms = e.self_cpu_time_total / 1e3 / args.steps
        name = e.key.replace("graph_0_cpp_fused_", "compiled: ")  # inductor's kernels, named by what they fuse
        print(f"{name[:71]:<72}{ms:>10.1f}{ms / profiled_ms:>8.0%}")

    matmul_gflops = matmul_flop / matmul_ms / 1e6
    print(f"\nmatmuls: {matmul_flop / 1e9:.2f} GFLOP a step, {matmul_ms / profiled_ms:.0%} of the profiled step at "
          f"{matmul_gflops:.0f} GFLOP/s; the {precision} matmul peak `gptlab bench peak` measured here is "
          f"{peak / 1e9:.0f} GFLOP/s; MFU (matmul FLOPs over the unprofiled step) {mfu:.0%}")
    print(f"RESULT step_ms={step_ms:.1f} tokens_per_s={tokens_per_s:.0f} "
          + " ".join(f"{p}_share={phase_ms[p] / profiled_ms:.3f}" for p in ("forward", "backward", "optimizer"))
          + f" matmul_share={matmul_ms / profiled_ms:.3f} matmul_gflops={matmul_gflops:.1f} peak_gflops={peak / 1e9:.1f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
