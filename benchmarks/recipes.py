"""Every seed recipe for a few hundred steps: tokens/s, MFU, dropout's cost and the start-up line's time estimate.

Issue 18, item 3. Each recipe in recipes/*.toml (not recipes/sweeps/), then the tiny presets at their defaults
on TinyStories (their plan: this run's limits), trains with its own model, batch, precision, compile setting, evaluation and sampling, but
limited to min(its planned steps, --steps) steps and --max-seconds of training. What is changed, and why:

    outputs      every folder (data, runs, tokenizers) goes under --work (default: a temporary folder)
    data         hf: sources cannot be downloaded here: FineWeb(-Edu) becomes fineweb_edu_sample10BT_head1M.txt,
                 Wikipedia wiki.test.raw (the "data" column says so); at most --data-tokens training tokens are
                 prepared. Tokenizers keep the recipe's settings (the vocabulary decides the head's cost).
    batch        a model whose step would take more than ~5 s here (gpt2.5, smollgpt, fineweb-edu on a CPU)
                 trains without gradient accumulation and with fewer sequences (context kept), so that a step
                 takes a few seconds, and evaluates 5 batches; the batch column shows what ran
    compile      what compile=auto picks for the recipe's *full* plan (the trainer's rule,
                 train.distributed.pick_compile), passed explicitly, since the shortened run would never compile
    early stop   off: the run must last its steps
    dropout      aurelius (dropout 0.1) runs once more with model.dropout=0: its cost is the tok/s ratio

tok/s is the trainer's summary (training time only, compile warm-up included); MFU the mean of metrics.csv's
rows after the first (the first holds the warm-up). The estimates are the trainer's summary["estimate"]
(start-up line and its corrected value), compared with summary["wall_s"] (the training loop's real seconds);
where the trainer has no wall_s, with this script's time around train() (marked *).

    python benchmarks/recipes.py
    python benchmarks/recipes.py --recipes recipes/aurelius.toml recipes/tinystories-chat.toml --steps 100
    python benchmarks/recipes.py --quick          # smoke test: 20 steps, 30 s a recipe

The last line is `RESULT cpu=<capability> recipes=<n> <row>_tok_s=... <row>_mfu=... dropout_cost=...
estimate_error_max=... startup_error_max=...` (errors: the largest |estimate / real - 1|).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.config import MODEL_PRESETS, Config, SourceConfig, config_from_dict, config_to_dict, load_config
from gptlab.device import DTYPES, cpu_count, cpu_has_fast_bf16, peak_flops, pick_device, pick_precision
from gptlab.model import model_info
from gptlab.train import distributed

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
PRESETS = ["tiny-1m", "tiny-4m"]
TINYSTORIES = ["tinystories/TinyStories-train_head.txt", "tinystories/TinyStoriesV2-GPT4-train_sample.txt"]
SLOW_STEP_S, TARGET_STEP_S = 5.0, 3.0  # a step slower than this (expected) gets a smaller batch, aiming at this
SLOW_EVAL_BATCHES = 5


def stand_in(path: str) -> tuple[str, str] | None:
    """(shared file, how it is cut into documents) standing in for an hf: dataset; None if there is none."""
    if "fineweb" in path.lower():  # one paragraph a line, no document separators
        return "fineweb_edu/fineweb_edu_sample10BT_head1M.txt", "line"
    if "wiki" in path.lower():  # paragraphs between blank lines
        return "wikitext-2-raw/wiki.test.raw", "blank_lines"
    return None


def localize(cfg: Config) -> str:
    """Point the recipe's ../shared/data paths at SHARED and hf: sources at local stand-ins; returns the data label."""
    shared = lambda p: str(SHARED / Path(p).relative_to("../shared/data")) if p.startswith("../shared/data") else p  # noqa: E731
    used = []
    for i, source in enumerate(cfg.data.sources):
        if source.path.startswith("hf:"):
            local = stand_in(source.path)
            if local is None:
                raise ValueError(f"no local stand-in for {source.path}")
            cfg.data.sources[i] = SourceConfig(path=str(SHARED / local[0]), documents=local[1], label=local[0])
            used.append(f"stand-in {Path(local[0]).name}")
        else:
            source.path = shared(source.path)
    if cfg.tokenizer.gpt2_dir:
        cfg.tokenizer.gpt2_dir = shared(cfg.tokenizer.gpt2_dir)
    return ", ".join(used) or "recipe's"


def preset_config(name: str, args) -> Config:
    """A tiny preset at every default, on TinyStories with its 4,096-token BPE (the data of ablation-blocks and
    tinystories-chat, so the three share one prepared folder). With no recipe behind it, its plan is this run's
    limits: compile=auto decides as for `gptlab train --model.preset=tiny-1m --train.max_steps=STEPS`."""
    return config_from_dict({"tokenizer": {"kind": "bpe", "vocab_size": 4096}, "model": {"preset": name},
                             "data": {"val_fraction": 0.02, "sources": [{"path": f"../shared/data/{f}"} for f in TINYSTORIES]},
                             "train": {"max_steps": args.steps, "max_time": args.max_seconds}})


def prepare(cfg: Config, work: Path, max_tokens: int) -> None:
    """Tokenizer and shards under work/, shared by every row whose text, tokenizer and data settings match."""
    from gptlab.data import prepare_data
    from gptlab.text import iter_documents
    from gptlab.tokenizer import train_tokenizer

    cfg.data.max_tokens = min(cfg.data.max_tokens or max_tokens, max_tokens)
    key = config_to_dict(cfg)
    key = {"text": key["text"], "tokenizer": key["tokenizer"], "data": {k: v for k, v in key["data"].items() if k != "out_dir"}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]  # not out_dir: folders are shared
    name = f"{cfg.tokenizer.kind}-{cfg.tokenizer.vocab_size}-{digest}"
    cfg.data.out_dir = cfg.train.data_dir = str(work / "data" / name)
    tokenizer = work / "tokenizers" / f"{name}.json"
    if not tokenizer.is_file():  # prepare_data resumes or skips a folder made with this very file
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer((doc for _, doc in iter_documents(cfg.data.sources, cfg.text)), cfg.tokenizer).save(tokenizer)
    prepare_data(cfg, tokenizer)


def plan(cfg: Config, args, notes: list[str]) -> dict:
    """The benchmark's limits, batch and compile for cfg, and what they are computed from (the trainer's own rules)."""
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train.trainer import EXPECTED_MFU

    t = cfg.train
    model = cfg.model.model_copy(update={"vocab_size": load_tokenizer(t.data_dir).vocab_size})
    info = model_info(model, t.batch_size, precisions=())
    device, world = pick_device(t.device), t.nproc
    precision = pick_precision(t.precision, device)
    threads = t.threads or max(1, cpu_count() // world)  # as the trainer: the processes share the cores
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the peak is cached per thread count
    peak = (t.peak_flops or peak_flops(device, DTYPES[precision])) * world
    torch.set_num_threads(before)
    rate = peak * EXPECTED_MFU[device.type] / info["flops_per_token"]  # tokens/s the start-up line expects
    ctx, tokens_per_step = model.context_length, t.batch_size * t.grad_accum * model.context_length
    planned = min([x for x in (t.max_steps, t.max_tokens and math.ceil(t.max_tokens / tokens_per_step)) if x], default=None)
    expected = min([x for x in (t.max_time, planned and planned * tokens_per_step / rate) if x], default=None)
    compile = distributed.pick_compile(t.compile, device, t.distributed if world > 1 else None, expected)
    batch, accum, eval_batches = t.batch_size, t.grad_accum, t.eval_batches
    if tokens_per_step / rate > SLOW_STEP_S:
        accum = 1
        batch = max(world, int(TARGET_STEP_S * rate / ctx) // world * world)  # whole sequences for every process
        eval_batches = min(eval_batches or SLOW_EVAL_BATCHES, SLOW_EVAL_BATCHES)
        notes.append(f"batch {t.batch_size}x{t.grad_accum} -> {batch}x1 (a step ~{tokens_per_step / rate:.0f} s here), "
                     f"eval_batches {t.eval_batches} -> {eval_batches}")
    steps = min(planned or args.steps, args.steps)
    return {"batch_size": batch, "grad_accum": accum, "eval_batches": eval_batches, "compile": compile,
            "max_steps": steps, "max_tokens": None, "max_time": min(t.max_time or args.max_seconds, args.max_seconds),
            "early_stop_patience": 0, "log_every": min(t.log_every, max(1, steps // 5)),  # rows enough for an MFU mean
            "keep_last": 1, "params": info["parameters"]}


def run_row(label: str, cfg: Config, data: str, args, work: Path) -> dict:
    """Prepare, plan and train one row; its table entry."""
    from gptlab.train import train

    notes: list[str] = []
    prepare(cfg, work, args.data_tokens)
    limits = plan(cfg, args, notes)
    params = limits.pop("params")
    for key, value in limits.items():
        setattr(cfg.train, key, value)
    run_dir = work / "runs" / slug(label)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time: --work may be reused
    cfg.train.run_dir = str(run_dir)
    m = cfg.model
    print(f"{label}: {cfg.train.max_steps} steps at most, {cfg.train.max_time:g} s, batch {cfg.train.batch_size}"
          f"x{cfg.train.grad_accum} x {m.context_length}, compile {cfg.train.compile}", flush=True)
    start = time.perf_counter()
    summary = train(cfg, verbose=args.verbose)
    call_s = time.perf_counter() - start
    with open(run_dir / "metrics.csv", newline="") as f:
        mfu = [float(r["mfu"]) for r in csv.DictReader(f) if r.get("mfu")]
    mfu = mfu[1:] or mfu  # the first row holds the warm-up (compiling, first allocations); alone, it is all there is
    estimate = summary.get("estimate") or {}
    return {"label": label, "model": m.preset or f"{m.n_layer}x{m.d_model}", "params": params, "ctx": m.context_length,
            "batch": f"{cfg.train.batch_size}x{cfg.train.grad_accum}", "dropout": m.dropout,
            "precision": summary["precision"], "compile": summary["compile"], "steps": summary["steps"],
            "tok_s": summary["tokens_per_s"], "mfu": sum(mfu) / len(mfu) if mfu else None,
            "startup": estimate.get("startup_s"), "corrected": estimate.get("corrected_s"),
            "real": summary.get("wall_s") or call_s, "measured_here": "wall_s" not in summary, "call": call_s,
            "data": data, "notes": notes}


def slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_")


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (f"{'recipe':28} {'model':27} {'params':>7} {'ctx':>5} {'batch':>6} {'drop':>4} {'prec':>4} {'comp':>5} "
              f"{'steps':>5} {'tok/s':>8} {'MFU':>6} {'est.start':>9} {'est.corr':>8} {'real (s)':>8} {'call (s)':>8}  data")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['label']:28} FAILED: {r['error']}")
            continue
        real = f"{r['real']:.1f}" + ("*" if r["measured_here"] else "")
        print(f"{r['label']:28} {r['model']:27} {r['params'] / 1e6:6.2f}M {r['ctx']:5} {r['batch']:>6} {r['dropout']:4.2g} "
              f"{r['precision']:>4} {str(r['compile']):>5} {r['steps']:5} {fmt(r['tok_s'], ',.0f'):>8} "
              f"{fmt(r['mfu'], '.1%'):>6} {fmt(r['startup'], '.1f'):>9} "
              f"{fmt(r['corrected'], '.1f'):>8} {real:>8} {r['call']:8.1f}  {r['data']}")
    for r in rows:
        for note in r.get("notes", []):
            print(f"  {r['label']}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", type=Path, help="recipe files (default: every recipes/*.toml)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="tiny presets to run after them ('' for none)")
    parser.add_argument("--steps", type=int, default=200, help="steps at most per row (default 200)")
    parser.add_argument("--max-seconds", type=float, default=120, help="training seconds at most per row (default 120)")
    parser.add_argument("--data-tokens", type=int, default=3_000_000, help="training tokens prepared at most (default 3M)")
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one, removed after)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --steps 20 --max-seconds 30")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's own output")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_seconds = min(args.steps, 20), min(args.max_seconds, 30)
    recipes = [p.resolve() for p in args.recipes] if args.recipes else sorted((REPO / "recipes").glob("*.toml"))
    if not (SHARED / TINYSTORIES[0]).is_file():
        print(f"recipes: {SHARED / TINYSTORIES[0]} not found; put ../shared/data beside the checkout or set GPTLAB_SHARED_DATA")
        return 2
    os.chdir(REPO)  # anything else a recipe names relatively is relative to the repository root

    jobs = []  # (row label, () -> its config): each loaded when its row runs, so a bad recipe fails only its row
    for path in recipes:
        jobs.append((path.stem, lambda path=path: load_config(path)))
        if path.stem == "aurelius":  # the recipe that trains with dropout, once more without it
            jobs.append(("aurelius, dropout 0", lambda path=path: load_config(path, ["--model.dropout=0"])))
    presets = [name for name in args.presets.split(",") if name in MODEL_PRESETS]  # a preset renamed away is skipped
    jobs += [(name, lambda name=name: preset_config(name, args)) for name in presets]

    threads = cpu_count()
    peaks = {name: peak_flops(torch.device("cpu"), DTYPES[name]) for name in ("fp32", "bf16")}  # cached, as the trainer's
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="gptlab-bench-recipes-"))
    print(f"work folder {work}; {args.steps} steps / {args.max_seconds:g} s at most a row; shared data {SHARED}", flush=True)
    rows = []
    try:
        for label, load in jobs:
            try:
                cfg = load()
                data = localize(cfg) if label not in presets else "TinyStories (preset defaults)"
                rows.append(run_row(label, cfg, data, args, work))
            except Exception as e:  # one recipe failing must not lose the others' rows
                message = (str(e).splitlines() or [type(e).__name__])[0]
                print(f"{label}: FAILED: {type(e).__name__}: {message}", flush=True)
                rows.append({"label": label, "error": f"{type(e).__name__}: {message}"})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print_table(rows)
    print(f"cpu {torch.backends.cpu.get_cpu_capability()} (native bf16 {cpu_has_fast_bf16()}), {threads} threads, "
          f"torch {torch.__version__}; MFU peak (gptlab bench peak, cached): "
          + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
    ok = {r["label"]: r for r in rows if "error" not in r}
    cost = None
    if "aurelius" in ok and "aurelius, dropout 0" in ok and ok["aurelius"]["tok_s"]:
        cost = ok["aurelius, dropout 0"]["tok_s"] / ok["aurelius"]["tok_s"]
        print(f"dropout 0.1 costs aurelius {cost:.2f}x (tok/s without / with; benchmarks/dropout.py times the step alone)")
    errors = {key: [abs(r[key] / r["real"] - 1) for r in ok.values() if r[key] is not None] for key in ("corrected", "startup")}
    worst = {key: f"{max(v):.3f}" if v else "n/a" for key, v in errors.items()}
    print(f"estimate error (|estimate / real - 1|, at most): corrected {worst['corrected']}, start-up {worst['startup']} "
          "(issue 18 asks for <= 0.25)")
    values = " ".join(f"{slug(r['label'])}_tok_s={fmt(r['tok_s'], '.0f')} {slug(r['label'])}_mfu={fmt(r['mfu'], '.3f')}"
                      for r in ok.values())
    print(f"RESULT cpu={torch.backends.cpu.get_cpu_capability()} recipes={len(recipes)} {values} "
          f"dropout_cost={fmt(cost, '.2f')} estimate_error_max={worst['corrected']} startup_error_max={worst['startup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
