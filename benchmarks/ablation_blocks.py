"""The block ablation (issue 15, item 4): which architecture idea pays on a CPU at TinyStories scale?

Trains the baseline of recipes/ablation-blocks.toml (tiny-1m: 4 x 128, pre-norm, GELU MLP 512) and four
variants, each at the baseline's parameter count (within 1%) and for the same CPU time, then scores each in
bits per byte on held-out stories (TinyStories V2 validation, which no run trains on) with `gptlab eval`, and
lays them side by side with `gptlab compare`:

    baseline   Norm->Attn->+->Norm->MLP->+
    moe        Norm->Attn->+->Norm->MoE->+   4 experts of width 128 (= the MLP's 512), top-1 (Switch)
    window     sliding-window attention, the last 64 tokens in every layer (context 256)
    parallel   Norm->Attn->+ | Norm->MLP->+  (GPT-J / PaLM)
    kan        Norm->Attn->+->Norm->KAN->+   a Kolmogorov-Arnold MLP of the same parameter count

    python benchmarks/ablation_blocks.py                  # 5 x 4 minutes of training on 2 cores, then scoring
    python benchmarks/ablation_blocks.py --minutes 2      # shorter
    python benchmarks/ablation_blocks.py --quick          # the pipeline at toy scale, ~2 minutes

Runs already finished are kept (delete OUT to redo them). Writes OUT/ablation.md and OUT/compare.{md,png}
(OUT: runs/ablation-blocks) and ends with `RESULT baseline_bpb=... moe_bpb=... ... cpu=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's gptlab, whatever is installed

import torch  # noqa: E402

RECIPE = REPO / "recipes" / "ablation-blocks.toml"
SHARED = Path(os.environ.get("GPTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
HELD_OUT = "tinystories/TinyStoriesV2-GPT4-valid_head5M.txt"

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "moe": ['--model.block="Norm->Attn->+->Norm->MoE->+"', "--model.moe_experts=4", "--model.moe_topk=1",
            "--model.moe_d_ff=128"],
    "window": ["--model.mask=window", "--model.window=64"],
    "parallel": ["--model.block=parallel"],
    "kan": ['--model.block="Norm->Attn->+->Norm->KAN->+"'],
}


def say(*lines) -> None:
    print(*lines, sep="\n", flush=True)


def overrides_for(name: str, args, out: Path) -> list[str]:
    from gptlab.config import load_config

    overrides = [*VARIANTS[name], f"--train.run_dir={str(out / name)!r}", f"--train.max_time={args.minutes * 60:g}",
                 f"--train.threads={args.threads}"]
    if args.quick:  # one small source, a small vocabulary, its own data folder
        overrides += [f"--data.sources=[{{path = {str(SHARED / 'tinystories/TinyStories-train_head.txt')!r}}}]",
                      "--tokenizer.vocab_size=1024", f"--data.out_dir={str(out / 'data')!r}",
                      f"--train.data_dir={str(out / 'data')!r}", "--train.eval_every=50"]
    elif SHARED != REPO.parent / "shared" / "data":  # the recipe's ../shared/data lives elsewhere here
        sources = load_config(RECIPE).data.sources
        overrides += [f"--data.sources.{i}.path={str(SHARED / Path(s.path).relative_to('../shared/data'))!r}"
                      for i, s in enumerate(sources)]
    return overrides


def parameters(name: str, args, out: Path) -> tuple[int, float]:
    """The variant's parameters and training FLOPs per token (active weights only, for MoE)."""
    from gptlab.config import load_config
    from gptlab.model import model_info
    from gptlab.tokenizer import planned_vocab_size

    cfg = load_config(RECIPE, overrides_for(name, args, out))
    model = cfg.model.model_copy(update={"vocab_size": planned_vocab_size(cfg.tokenizer)})
    info = model_info(model, cfg.train.batch_size)
    return info["parameters"], info["flops_per_token"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of each variant (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = every core")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="toy scale: one small source, vocab 1,024, 20 s a run")
    parser.add_argument("--out", type=Path, default=None, help="default runs/ablation-blocks (-quick)")
    args = parser.parse_args(argv)
    if not (SHARED / HELD_OUT).is_file():
        say(f"ablation_blocks: {SHARED / HELD_OUT} is missing — put ../shared/data beside the repo or set GPTLAB_SHARED_DATA")
        return 2
    if args.quick:
        args.minutes = min(args.minutes, 1 / 3)
    os.chdir(REPO)  # the recipe's paths are relative to the repository root
    out = (args.out or Path("runs/ablation-blocks" + ("-quick" if args.quick else ""))).resolve()
    names = [n.strip() for n in args.variants.split(",")]

    from gptlab.cli import main as gptlab
    from gptlab.device import peak_flops, set_threads
    from gptlab.quickstart import run_recipe

    threads = set_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    peak = peak_flops(torch.device("cpu"), torch.float32)
    say(f"cpu {capability}, {threads} threads, torch {torch.__version__}, gptlab bench peak fp32 {peak / 1e9:,.1f} GFLOP/s; "
        f"{args.minutes:g} min of training a variant")

    rows = {}
    for name in names:
        params, flops = parameters(name, args, out)
        say(f"\n== {name}: {params:,} parameters, {flops / 1e6:.2f} MFLOP a token; {' '.join(VARIANTS[name])}")
        run_recipe(RECIPE, overrides_for(name, args, out), progress=True)
        run = out / name
        if not (run / "eval.json").is_file():
            held_out = str(SHARED / HELD_OUT)
            assert gptlab(["eval", str(run), "--data", held_out, "--max-tokens", "200000" if not args.quick else "20000",
                           "--checkpoint", "last", "--no-samples", "--threads", str(args.threads), "-q"]) == 0
        summary = json.loads((run / "summary.json").read_text())
        report = json.loads((run / "eval.json").read_text())
        rows[name] = {"parameters": params, "flops_per_token": flops, "steps": summary["steps"],
                      "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
                      "bpb": _bpb(report)}

    say("")
    gptlab(["compare", *(str(out / n) for n in names), "--x", "time", "--out", str(out), "-q"])
    base = rows.get("baseline")
    header = ("| variant | parameters | MFLOP/token | steps | tokens | tokens/s | vs baseline | held-out bpb | vs baseline |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for name, r in rows.items():
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        delta = f"{r['bpb'] - base['bpb']:+.3f}" if base else ""
        lines.append(f"| {name} | {r['parameters']:,} | {r['flops_per_token'] / 1e6:.2f} | {r['steps']:,} | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {speed} | {r['bpb']:.4f} | {delta} |")
    table = "\n".join(lines)
    say(table)
    text = (f"# Block ablation\n\ncpu {capability}, {threads} threads, peak fp32 {peak / 1e9:,.1f} GFLOP/s, "
            f"{args.minutes:g} min of training each; bits per byte on {HELD_OUT} (held out).\n\n{table}\n")
    (out / "ablation.md").write_text(text, encoding="utf-8")
    say("RESULT " + " ".join(f"{n}_bpb={r['bpb']:.4f}" for n, r in rows.items()) + " "
        + " ".join(f"{n}_tok_s={r['tokens_per_s']:.0f}" for n, r in rows.items()) + f" cpu={capability}")
    return 0


def _bpb(report: dict) -> float:
    """Bits per byte of the one text scored in an eval.json."""
    return float(report["datasets"][0]["bpb"])


if __name__ == "__main__":
    sys.exit(main())
