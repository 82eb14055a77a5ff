"""Training memory on a CPU: `gptlab model info`'s prediction against the real peak, shape by shape.

Each row runs in a fresh process (so one row's allocations neither hide nor inflate another's):

    1. imports, threads, the batch of random tokens; the process's resident set then is the baseline
       (its high-water mark is reset there: /proc/self/clear_refs)
    2. build_model + build_optimizer (AdamW, gptlab's fused CPU kernel, or Muon + AdamW with --optimizer muon)
       as `gptlab train` does (model.checkpointing from --checkpointing)
    3. --steps steps of gptlab's TrainStep (--grad-accum micro-steps of forward + backward, clip, optimizer
       step, zero_grad)
    4. one more step by hand, phase by phase, each phase's peak measured from its own start
       (the high-water mark reset before each): forward, backward, clip + optimizer step

and reports the peak resident memory above the baseline (VmHWM - baseline: what the issue calls the
real peak), beside memory_parts' prediction for the same setup (TrainingSetup: the row's precision,
batch and context, the optimizer, checkpointing, grad_accum and compile of the flags). Also printed,
from the process itself:

    tensors   parameters, gradients and optimizer state counted from the tensors (their bytes)
    warm      the resident memory the first step leaves that is no tensor of the model (the CPU
              kernels' code pages, oneDNN/OpenMP thread pools and scratch, malloc's kept free memory)
    malloc    glibc's mallinfo2 at the end: bytes malloc holds (heap + mmapped) and of them in use

    python benchmarks/memory.py                           # all shapes, fp32 and bf16
    python benchmarks/memory.py --shapes tiny-4m-b16,tiny-16m --precisions fp32
    python benchmarks/memory.py --compile                 # torch.compile'd step (a C++ compiler needed)
    python benchmarks/memory.py --shapes tiny-4m-b2 --precisions fp32 --optimizer muon --checkpointing --grad-accum 2

The last line is `RESULT worst_ratio=... mean_abs_error=... cpu=<torch's CPU capability>`: worst_ratio is
the predicted/measured ratio farthest from 1, mean_abs_error the mean of |predicted/measured - 1|.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

# name: (preset or None, overrides, batch, context). Vocabulary: the tiny presets' 4,096, GPT-2's own.
SHAPES = {
    "defaultgpt-0.5m": ("defaultgpt-0.5m", {}, 8, 512),
    "aurelius-845k": ("aurelius-845k", {}, 16, 512),
    "tiny-1m": ("tiny-1m", {"vocab_size": 4096}, 16, 256),
    "tiny-4m-b2": ("tiny-4m", {"vocab_size": 4096}, 2, 256),
    "tiny-4m-b16": ("tiny-4m", {"vocab_size": 4096}, 16, 256),
    "tiny-16m": ("tiny-16m", {"vocab_size": 4096}, 8, 256),
    "mid-30m": (None, {"n_layer": 8, "d_model": 512, "n_head": 8, "vocab_size": 8192, "norm": "rmsnorm",
                       "position": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": True}, 4, 512),
    "mid-70m": (None, {"n_layer": 12, "d_model": 640, "n_head": 10, "vocab_size": 16384, "norm": "layernorm",
                       "position": "learned", "mlp": "gelu", "bias": True, "tie_embeddings": True}, 2, 512),
    # the sweep's best (recipes/sweeps/defaultgpt-2gb.toml, trial 8): wide and shallow, 8 heads of 16
    "defaultgpt-2x384": ("defaultgpt-0.5m", {"n_layer": 2, "d_model": 384, "n_head": 8, "n_kv_head": 2, "d_ff": None,
                                             "vocab_size": 4096}, 16, 512),
    "gpt2-124m-256": ("gpt2-124m", {}, 2, 256),
    "gpt2-124m-1024": ("gpt2-124m", {}, 1, 1024),
}
MiB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict:
    """glibc's view: bytes it holds (sbrk heap + arenas + mmapped chunks) and of them in use (0s elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {"held": 0, "used": 0}
    return {"held": m.arena + m.hblkhd, "used": m.uordblks + m.hblkhd}


def status() -> dict:
    """VmRSS and VmHWM (the resident set's high-water mark) of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> int:
    """Reset the high-water mark to the current resident set (Linux 4.0+); the resident set now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()["VmRSS"]


def config(shape: str):
    from gptlab.config import MODEL_PRESETS, ModelConfig

    preset, overrides, batch, context = SHAPES[shape]
    base = dict(MODEL_PRESETS[preset]) if preset else {}
    return ModelConfig(**{**base, **overrides, "context_length": context}), batch


def setup_of(args, batch: int, precision: str):
    """The TrainingSetup a row trains with (the flags'), as memory_parts prices it."""
    from gptlab.model.info import TrainingSetup

    return TrainingSetup(batch_size=batch, precision=precision, optimizer=args.optimizer, compile=args.compile,
                         checkpointing=args.checkpointing, grad_accum=args.grad_accum)


def build(cfg, device, precision: str, args):
    """Model, optimizer and TrainStep as `gptlab train` builds them for the flags' setup."""
    import torch

    from gptlab.config import TrainConfig
    from gptlab.model import build_model
    from gptlab.train.optim import build_optimizer
    from gptlab.train.step import TrainStep

    torch.manual_seed(0)
    model = build_model(cfg, device).train()
    model.checkpointing = args.checkpointing
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, optimizer=args.optimizer), device)
    return model, optimizer, TrainStep(model, optimizer, device, precision, compile=args.compile)


def child(shape: str, precision: str, args) -> dict:
    import torch

    from gptlab.device import autocast
    from gptlab.model.info import memory_parts

    torch.set_num_threads(args.threads)
    cfg, batch = config(shape)
    device = torch.device("cpu")
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    predicted = memory_parts(cfg, setup_of(args, batch, precision))
    gc.collect()
    base = reset_peak()

    model, optimizer, step = build(cfg, device, precision, args)
    built = status()["VmRSS"] - base
    times, after = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(lambda: (x, y), args.grad_accum, 1e-4)[0].item()
        times.append(time.perf_counter() - start)
        after.append(status()["VmRSS"] - base)
    peak = status()["VmHWM"] - base

    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    malloc = mallinfo()

    # one more step by hand, each phase's peak from its own start (the gradients exist from here on: step
    # 1's backward made them and zero_grad(set_to_none) dropped them, so the backward phase allocates them)
    phases = {}
    forward = step.forward
    start = reset_peak()
    with autocast(device, precision):
        _, loss = forward(x, y)
    phases["forward"] = (start - base, status()["VmHWM"] - start, status()["VmRSS"] - start)
    start = reset_peak()
    loss.backward()
    del loss
    phases["backward"] = (start - base, status()["VmHWM"] - start, status()["VmRSS"] - start)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    start = reset_peak()
    torch.nn.utils.clip_grad_norm_(step.params, 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases["optimizer"] = (start - base, status()["VmHWM"] - start, status()["VmRSS"] - start)
    return {
        "shape": shape, "precision": precision, "batch": batch, "context": cfg.context_length,
        "parameters": sum(p.numel() for p in params), "predicted": predicted, "peak": peak, "built": built,
        "after_steps": after, "weights": weights, "grads": grads, "moments": moments, "malloc": malloc,
        "phases": phases, "base": base, "seconds": times,
    }


def tensors(shape: str, precision: str, args) -> dict:
    """The live tensors' peak over building and --steps steps, by torch.profiler's categories (allocations
    that PyTorch makes, kernels' scratch included; not malloc's kept free memory, nor code)."""
    import torch
    from torch.profiler import ProfilerActivity, _memory_profiler, profile

    torch.set_num_threads(args.threads)
    cfg, batch = config(shape)
    device = torch.device("cpu")
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model, optimizer, step = build(cfg, device, precision, args)
        for _ in range(args.steps):
            step(lambda: (x, y), args.grad_accum, 1e-4)
    timeline = _memory_profiler.MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline("cpu")
    names = ["unknown"] + [c.name.lower() if c else "unknown" for c in _memory_profiler._CATEGORY_TO_INDEX]
    at = max(range(len(sizes)), key=lambda i: sum(sizes[i]))
    parts = {}
    for name, size in zip(names, sizes[at]):
        parts[name] = parts.get(name, 0) + size
    return {"shape": shape, "precision": precision, "peak": sum(sizes[at]), "parts": parts,
            "at": (times[at] - times[0]) / (times[-1] - times[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (TrainStep's compile=True)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                        help="train.optimizer: AdamW, or Muon for the blocks' matrices and AdamW for the rest")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (train.checkpointing)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-steps a step (train.grad_accum)")
    parser.add_argument("--json", help="also write every row's measurements here")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the rows' processes, e.g. MALLOC_MMAP_THRESHOLD_=65536 (glibc: every large "
                             "block mmapped and returned when freed, so that the resident set follows the live tensors)")
    parser.add_argument("--tensors", action="store_true",
                        help="per row, the live tensors' peak by category instead (torch.profiler, slow)")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = tensors if args.tensors else child
        print(json.dumps(run(*args.child, args)))
        return

    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    from gptlab.model.info import describe_setup

    setup = describe_setup(setup_of(args, 1, "fp32"), 1).split(", ", 1)[1]  # without the micro-batch: the rows'
    print(f"cpu {capability}, {args.threads} threads, torch {torch.__version__}; {setup}, {args.steps} steps; "
          "each row a fresh process; MiB")
    head = (f"{'shape':<16} {'params':>8} {'b x ctx':>9} {'prec':<5} {'weights':>8} {'grads':>7} {'optim':>7} "
            f"{'activ':>7} {'loss':>6} {'rt+mal':>6} {'pred':>7} {'measured':>8} {'ratio':>6}   {'built':>6} {'fwd':>6} {'bwd':>6} {'opt':>6} "
            f"{'malloc held/used':>16} {'s/step':>6}")
    if not args.tensors:
        print(head)
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    if args.env:
        print("env " + " ".join(args.env))
    if args.tensors:
        return tensor_rows(args, env)
    rows = []
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", shape, precision, *child_flags(args)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{shape:<16} {precision:<5} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            p = r["predicted"]
            ph = r["phases"]
            r["ratio"] = (p["total"] - p["process"]) / r["peak"]  # the process's own start is not measured
            print(f"{shape:<16} {r['parameters'] / 1e6:>7.2f}M {r['batch']:>3} x {r['context']:<4} {precision:<5} "
                  f"{p['weights'] / MiB:>8.1f} {p['gradients'] / MiB:>7.1f} {p['optimizer'] / MiB:>7.1f} "
                  f"{p['activations'] / MiB:>7.1f} {p.get('loss', 0) / MiB:>6.1f} {p.get('runtime', 0) / MiB:>6.1f} {(p['total'] - p['process']) / MiB:>7.1f} {r['peak'] / MiB:>8.1f} {r['ratio']:>6.2f}   "
                  f"{r['built'] / MiB:>6.1f} {ph['forward'][1] / MiB:>6.1f} {ph['backward'][1] / MiB:>6.1f} "
                  f"{ph['optimizer'][1] / MiB:>6.1f} {r['malloc']['held'] / MiB:>8.0f}/{r['malloc']['used'] / MiB:<7.0f} "
                  f"{min(r['seconds']):>6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if rows:
        worst = max((r["ratio"] for r in rows), key=lambda v: abs(v - 1))
        error = sum(abs(r["ratio"] - 1) for r in rows) / len(rows)
        print(f"RESULT worst_ratio={worst:.3f} mean_abs_error={error:.3f} rows={len(rows)} cpu={capability}")


def child_flags(args) -> list[str]:
    """The flags a row's process needs to train as this one was asked to."""
    return (["--steps", str(args.steps), "--threads", str(args.threads), "--optimizer", args.optimizer,
             "--grad-accum", str(args.grad_accum)] + (["--compile"] if args.compile else [])
            + (["--checkpointing"] if args.checkpointing else []))


def tensor_rows(args, env) -> None:
    print(f"{'shape':<16} {'prec':<5} {'tensor peak':>11}  parts at the peak (at: its place in the run, 0-1)")
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", shape, precision, "--tensors", *child_flags(args)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{shape:<16} {precision:<5} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            parts = " ".join(f"{k} {v / MiB:.1f}" for k, v in r["parts"].items() if v)
            print(f"{shape:<16} {precision:<5} {r['peak'] / MiB:>11.1f}  {parts} (at {r['at']:.2f})", flush=True)


if __name__ == "__main__":
    main()
