"""The Python half of benchmarks/gpu_check.sh: one subcommand for each stage the shell script runs.

    env       nvidia-smi, the versions (python, torch, CUDA, cuDNN, NCCL, Triton) and the device
    data      a corpus (TinyStories from shared/data, else generated stories) -> a tokenizer (GPT-2's where
              gpt2_tokenizer is there, else a BPE) -> token shards, through the gptlab CLI as a user runs it
    report    a finished run's training speed from its metrics.csv: tokens/s and MFU once compiled
    generate  generation tokens/s of a run: gptlab's generate() (KV cache; what `gptlab sample` runs) at
              batch 1 and 8, against recomputing the whole sequence for every token (no cache)
    profile   where the run's training step spends its time: the kernels (on a CPU, the operators) that take
              the most of a few profiled steps of the run's model, batch and settings, grouped by kind

Each prints what it did and, as its last line, `key=value ...`, which the shell script reads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# TinyStories files tried in order for the corpus; enough bytes are taken from the first ones found.
STORIES = ["tinystories/TinyStoriesV2-GPT4-train_sample.txt", "tinystories/TinyStories-train_head.txt"]
SEPARATOR = "<|endoftext|>"


def shared_data() -> Path | None:
    """$GPTLAB_SHARED_DATA where it is set (as in tests/helpers.py), else shared/data inside or beside the checkout."""
    env = os.environ.get("GPTLAB_SHARED_DATA")
    candidates = [Path(env)] if env else [REPO / "shared" / "data", REPO.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def last_line(**values) -> None:
    print(" ".join(f"{k}={v}" for k, v in values.items()), flush=True)


# --------------------------------------------------------------------------- env


def env(args) -> int:
    smi = shutil.which("nvidia-smi")
    if smi:
        subprocess.run([smi], check=False)
    else:
        print("nvidia-smi: not found")
    cuda = torch.cuda.is_available()
    triton = None
    with contextlib.suppress(ImportError):
        triton = importlib.import_module("triton").__version__
    import gptlab

    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version() if cuda else None}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if cuda else None}, triton {triton}, "
          f"gptlab {gptlab.__version__} ({Path(gptlab.__file__).parent})")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, compute capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
              f"{torch.cuda.device_count()} visible")
    missing = not cuda and not args.dry_run
    if missing:
        print("error: torch.cuda.is_available() is False (a CPU build of torch, or no driver); "
              "--dry-run checks the script on a CPU", flush=True)
    last_line(gpu=torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu")
    return 1 if missing else 0


# --------------------------------------------------------------------------- data


def write_corpus(path: Path, size: int) -> str:
    """About `size` bytes of stories into `path`, whole stories only; returns where they came from."""
    root = shared_data()
    sources = [root / s for s in STORIES if root and (root / s).is_file()]
    with open(path, "w", encoding="utf-8") as out:
        written = 0
        for source in sources:
            text = source.read_text(encoding="utf-8")[: size - written]
            text = text[: text.rfind(SEPARATOR) + len(SEPARATOR)] + "\n" if SEPARATOR in text else ""
            out.write(text)
            written += len(text)
            if written >= size * 0.9:
                break
        if sources and written:
            return ", ".join(str(s) for s in sources)
        out.write(generated_stories(size))
        return "generated stories (no TinyStories file under shared/data; set GPTLAB_SHARED_DATA)"


def generated_stories(size: int) -> str:
    """Stories of pseudo-words from a fixed seed, where no corpus is at hand: Zipf-distributed over 40k
    made-up words, so that a BPE reaches GPT-2's 50,257 tokens on them and the model keeps the preset's shape."""
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
    lexicon = list(dict.fromkeys("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(40_000)))
    zipf = list(itertools.accumulate(1 / rank for rank in range(1, len(lexicon) + 1)))
    stories, total = [], 0
    while total < size:
        words = rng.choices(lexicon, cum_weights=zipf, k=rng.randint(40, 200))
        sentences = [" ".join(words[i:i + 9]).capitalize() + rng.choice(".!?") for i in range(0, len(words), 9)]
        stories.append(" ".join(sentences) + f"\n{SEPARATOR}\n")
        total += len(stories[-1])
    return "".join(stories)


def data(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, shards = work / "corpus.txt", work / "tokenizer.json", work / "data"
    print(f"corpus: {write_corpus(corpus, args.bytes)} -> {corpus} ({corpus.stat().st_size:,} bytes)", flush=True)
    root = shared_data()
    found = root and (root / "gpt2_tokenizer" / "encoder.json").is_file()
    gpt2 = root / "gpt2_tokenizer" if found and args.tokenizer == "auto" else None
    kind = ["--tokenizer.kind=gpt2", f"--tokenizer.gpt2_dir={json.dumps(str(gpt2))}"] if gpt2 else [
        "--data", str(corpus), "--tokenizer.kind=bpe", f"--tokenizer.vocab_size={args.bpe_vocab}"]
    if not gpt2:
        print(f"{'no gpt2_tokenizer under shared/data' if args.tokenizer == 'auto' else '--tokenizer bpe'}: "
              f"a BPE of at most {args.bpe_vocab:,} tokens trained on the corpus")
    gptlab = [sys.executable, "-m", "gptlab"]
    for cmd in ([*gptlab, "tokenizer", "train", *kind, "--out", str(tokenizer)],
                [*gptlab, "data", "prepare", "--data", str(corpus), "--tokenizer", str(tokenizer), "--out", str(shards),
                 "-q", f"--data.workers={args.workers}"]):
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    from gptlab.tokenizer import load_tokenizer

    meta = json.loads((shards / "meta.json").read_text())
    print("splits: " + ", ".join(f"{name} {split['tokens']:,} tokens" for name, split in meta["splits"].items()))
    last_line(data_dir=shards, vocab_size=load_tokenizer(tokenizer).vocab_size)
    return 0


# --------------------------------------------------------------------------- report


def report(args) -> int:
    """tokens/s and MFU as the median of metrics.csv's rows after the first `--skip` (torch.compile compiles in
    the first step, and the first rows average it in; summary.json's overall figure includes it too)."""
    run = Path(args.run)
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("tokens_per_s")]
    summary = json.loads((run / "summary.json").read_text())
    steady = rows[args.skip:] or rows[-1:]
    tok_s = statistics.median(float(r["tokens_per_s"]) for r in steady)
    mfu = statistics.median(float(r["mfu"]) for r in steady)
    print(f"{'run':24} {'steps':>6} {'tokens':>12} {'train s':>8} {'tok/s overall':>14} {'tok/s steady':>13} {'MFU':>6} "
          f"{'loss':>7} {'val loss':>8}")
    val = summary.get("val_loss")
    print(f"{run.name:24} {summary['steps']:6d} {summary['tokens']:12,d} {summary['elapsed']:8.1f} "
          f"{summary['tokens_per_s'] or 0:14,.0f} {tok_s:13,.0f} {mfu:6.1%} {summary['train_loss'] or float('nan'):7.3f} "
          f"{val if val is not None else float('nan'):8.3f}")
    print(f"(steady: median of the {len(steady)} metrics rows after the first {args.skip}; device {summary['device']}, "
          f"{summary['precision']}, compile {summary['compile']})")
    last_line(tokens_per_s=f"{tok_s:.0f}", mfu=f"{mfu:.4f}")
    return 0


# --------------------------------------------------------------------------- generate


def generate(args) -> int:
    from gptlab.config import SampleConfig
    from gptlab.device import pick_device, set_threads
    from gptlab.generate import generate as gptlab_generate
    from gptlab.generate.sampling import prompt_ids
    from gptlab.runs import load_run

    device = pick_device(args.device)
    set_threads(args.threads)
    model, tokenizer, _ = load_run(args.run, "last", device=device)  # fp32, as `gptlab sample` runs it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = args.tokens

    def timed(fn) -> float:
        fn(4)  # warm-up: kernels chosen, memory allocated
        sync()
        start = time.perf_counter()
        fn(n)
        sync()
        return time.perf_counter() - start

    def cached(batch: int, compile: bool | str = "auto"):
        return lambda tokens: gptlab_generate(model, tokenizer, [args.prompt], SampleConfig(
            max_new_tokens=tokens, num_samples=batch, temperature=0.8, stop_at_eos=False, seed=0, compile=compile))

    @torch.no_grad()
    def recomputed(tokens: int):  # the whole sequence through the model for every new token
        idx = torch.tensor([prompt_ids(tokenizer, args.prompt)], device=device)
        for _ in range(tokens):
            logits, _ = model(idx[:, -model.cfg.context_length:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    rows = [("generate, KV cache", 1, timed(cached(1))), ("generate, KV cache", 8, timed(cached(8))),
            ("no cache (recompute)", 1, timed(recomputed))]
    if args.compiled:  # the decode step compiled (its warm-up compiles it; compile="auto" would not, at this length)
        rows.append(("KV cache, compiled", 1, timed(cached(1, compile=True))))
    print(f"{'generation':22} {'batch':>5} {'new tokens':>10} {'s':>7} {'tokens/s':>10}   ({device.type}, fp32, "
          f"prompt {args.prompt!r})")
    for name, batch, seconds in rows:
        print(f"{name:22} {batch:5d} {n * batch:10d} {seconds:7.2f} {n * batch / seconds:10,.1f}")
    print(f"KV cache vs recompute at batch 1: {rows[2][2] / rows[0][2]:.2f}x")
    compiled = {"gen_compiled_tokens_per_s": f"{n / rows[3][2]:.1f}"} if args.compiled else {}
    last_line(gen_tokens_per_s=f"{n / rows[0][2]:.1f}", gen_batch8_tokens_per_s=f"{8 * n / rows[1][2]:.1f}", **compiled)
    return 0


# --------------------------------------------------------------------------- profile

# Kernel names -> what they do, first match wins (cuBLAS/CUTLASS GEMMs are named gemm, sm90_xmma, nvjet, cutlass;
# flash attention flash/fmha; inductor's fused elementwise and reduction kernels triton_* on a GPU, cpp_fused_* on
# a CPU, where the profiler names them only with inductor's config.cpp.enable_kernel_profile).
KINDS = [("matmul", ("gemm", "xmma", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")),
         ("loss", ("cross_entropy", "nll", "log_softmax")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("optimizer and clipping", ("multi_tensor", "fused_adam", "adam", "muon", "foreach")),
         ("fused elementwise (inductor)", ("triton", "cpp_fused"))]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile(args) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gptlab.device import keep_freed_memory, pick_device, pick_precision
    from gptlab.model import build_model
    from gptlab.runs import load_run_config
    from gptlab.train.optim import build_optimizer
    from gptlab.train.step import TrainStep

    cfg = load_run_config(args.run)
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    device = pick_device(cfg.train.device)
    keep_freed_memory(device)
    precision, compiled = pick_precision(summary["precision"], device), bool(summary["compile"])
    model = build_model(cfg.model, device)
    step = TrainStep(model, build_optimizer(model, cfg.train, device), device, precision, cfg.train.grad_clip, compiled)
    batch, ctx = cfg.train.batch_size, cfg.model.context_length
    data = torch.randint(0, cfg.model.vocab_size, (batch, ctx + 1), device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(lambda: (data[:, :-1], data[:, 1:]), cfg.train.grad_accum, cfg.train.lr)
        sync()
        return (time.perf_counter() - start) / steps

    run(3)  # compiles (inductor's cache from the training stage makes this quick) and warms up
    step_s = run(args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run(args.steps)
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    # On a GPU the kernels alone: an operator (aten::mm) and inductor's launcher (named as its kernel) also carry
    # their kernels' time, which would count it twice. On a CPU, the operators, less the trainer's phase labels
    # and the optimizer's span, which cover other operators.
    labels = ("forward", "backward", "clip", "optimizer", "Optimizer.", "ProfilerStep")
    events = [e for e in prof.key_averages() if own(e) > 0 and (
        e.device_type == DeviceType.CUDA if cuda else not e.key.startswith(labels))]
    total = sum(own(e) for e in events) or 1
    tokens = batch * ctx * cfg.train.grad_accum
    print(f"{cfg.model.n_layer} layers x {cfg.model.d_model}, ctx {ctx}, batch {batch} x {cfg.train.grad_accum}, "
          f"{precision}, compile {compiled}, {device.type}: {step_s * 1e3:.1f} ms a step, {tokens / step_s:,.0f} tokens/s "
          f"(unprofiled; {args.steps} steps)")
    by_kind: dict[str, float] = {}
    for e in events:
        kind = kind_of(e.key)
        by_kind[kind] = by_kind.get(kind, 0) + own(e)
    print(f"\n{'kind':30} {'ms/step':>8} {'share':>6}   ({'kernel' if cuda else 'operator self'} time)")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:30} {t / 1e3 / args.steps:8.2f} {t / total:6.1%}")
    print(f"{'(sum)':30} {total / 1e3 / args.steps:8.2f}  of {step_s * 1e3:.1f} ms wall a step")
    print(f"\n{'kernel' if cuda else 'operator':90} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for e in sorted(events, key=own, reverse=True)[: args.top]:
        print(f"{e.key[:90]:90} {own(e) / 1e3 / args.steps:8.2f} {own(e) / total:6.1%} {e.count // args.steps:6d}")
    last_line(step_ms=f"{step_s * 1e3:.1f}", busy_share=f"{total / 1e6 / args.steps / step_s:.3f}",
              **{f"{k.split()[0]}_share": f"{by_kind.get(k, 0) / total:.3f}" for k, _ in KINDS})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed")
    p = sub.add_parser("data")
    p.add_argument("--work", required=True, help="folder for the corpus, tokenizer and shards")
    p.add_argument("--bytes", type=int, default=8_000_000, help="corpus size")
    p.add_argument("--tokenizer", choices=["auto", "bpe"], default="auto",
                   help="auto: GPT-2's where shared/data has it, else a BPE trained on the corpus")
    p.add_argument("--bpe-vocab", type=int, default=50257, help="the BPE's size (at most)")
    p.add_argument("--workers", type=int, default=0, help="data.workers (0: all cores)")
    p = sub.add_parser("report")
    p.add_argument("run")
    p.add_argument("--skip", type=int, default=2, help="metrics rows left out of the median (compile warm-up)")
    p = sub.add_parser("generate")
    p.add_argument("run")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=256, help="new tokens a row")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--compiled", action="store_true", help="also a row with the decode step compiled")
    p = sub.add_parser("profile")
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    args = parser.parse_args()
    return {"env": env, "data": data, "report": report, "generate": generate, "profile": profile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
