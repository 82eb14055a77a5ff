"""Which learning rate and warm-up `gptlab sft` should default to: a small sweep on TinyStories, offline.

A tiny base model (4 x 128, context 256, ~0.8M parameters) is pretrained for --minutes on the TinyStories
head in ../shared/data; an instruction set is made from other stories (TinyStories V2), "Write a short story
that uses the words A, B and C." -> the story, the words taken from it; the base is fine-tuned on it with
gptlab sft for --epochs at each learning rate (the "sft" profile otherwise), and the held-out assistant-token
loss is reported, with the base model's own on the same held-out conversations (the chat tokens' rows grown,
not trained: step 0). Everything goes to --out.

    python benchmarks/sft_defaults.py --minutes 3 --epochs 2
    python benchmarks/sft_defaults.py --lrs 1e-4,3e-4,1e-3,3e-3 --warmups 0,0.05

The last line is `RESULT base=... lr_<lr>=... ... cpu=<torch's CPU capability>`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinystories"


def instructions(stories: list[str], tokenizer, context: int, seed: int = 0) -> list[dict]:
    """One {prompt, completion} per story that fits the context, its words drawn from the story itself."""
    rng = random.Random(seed)
    records = []
    for story in stories:
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,}", story)})
        if len(words) < 3:
            continue
        ask = f"Write a short story that uses the words {', '.join(rng.sample(words, 3))}."
        if len(tokenizer.encode(ask)) + len(tokenizer.encode(story)) + 5 <= context + 1:
            records.append({"prompt": ask, "completion": story})
    return records


def done(run: Path) -> dict | None:
    """The summary of a run measured before."""
    return json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/sft-defaults", help="where the tokenizer, data and runs go")
    parser.add_argument("--minutes", type=float, default=3.0, help="pretraining time of the base (default 3)")
    parser.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs (default 2)")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3", help="learning rates to try")
    parser.add_argument("--warmups", default="0,0.05", help="warm-up fractions (of the steps) to try at each rate")
    parser.add_argument("--conversations", type=int, default=1500, help="instructions made (before the context cut)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from gptlab.chat import sft
    from gptlab.config import TokenizerConfig, load_config
    from gptlab.data import prepare_data
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = [f"--train.threads={args.threads}", "--train.compile=false", "--train.precision=fp32"]
    text = (SHARED / "TinyStories-train_head.txt").read_text(encoding="utf-8")
    if not (out / "tokenizer.json").exists():
        documents = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
        train_tokenizer(documents, TokenizerConfig(vocab_size=2048)).save(out / "tokenizer.json")
    from gptlab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer.json")
    base = out / "base"
    if not (base / "summary.json").exists():
        cfg = load_config(None, [f"--data.sources=[{{path = {str(SHARED / 'TinyStories-train_head.txt')!r}}}]",
                                 f"--data.out_dir={str(out / 'text')!r}", "--data.workers=1"])
        prepare_data(cfg, out / "tokenizer.json")
        train(load_config(None, [f"--train.data_dir={str(out / 'text')!r}", f"--train.run_dir={str(base)!r}",
                                 "--model.preset=tiny-1m", "--profile=cpu-fast", f"--train.max_time={args.minutes * 60}",
                                 "--train.batch_size=16", "--train.eval_every=200", *machine]), verbose=False)

    stories = (SHARED / "TinyStoriesV2-GPT4-train_sample.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    records = instructions([s.strip() for s in stories if s.strip()][: args.conversations], tokenizer, 256)
    data = out / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; base pretrained "
          f"{args.minutes:g} min; {len(records)} instructions, {args.epochs:g} epochs each")

    results = {}
    # the base itself, its embedding grown: one step at a learning rate that moves nothing, scored after it
    summary = done(out / "step0") or sft.finetune(base, data, out / "step0", overrides=[
        *machine, "--train.max_steps=1", "--train.lr=1e-12", "--train.eval_every=1"], verbose=False)
    prepared = out / "step0" / "data"
    results["base"] = summary["val_loss"]
    print(f"base (chat tokens grown, not trained): held-out assistant loss {results['base']:.4f}")
    lrs = [float(v) for v in args.lrs.split(",")]
    warmups = [float(v) for v in args.warmups.split(",")]
    for lr in lrs:
        for warmup in warmups:
            name = f"lr_{lr:g}" + (f"_warmup_{warmup:g}" if len(warmups) > 1 else "")
            start = time.perf_counter()
            summary = done(out / name)
            if summary is None:  # not measured yet (a rerun measures only what is missing)
                cfg, _ = sft.sft_config(base, prepared, out / name, overrides=[*machine, f"--train.lr={lr}"], epochs=args.epochs)
                cfg.train.warmup_steps = round(warmup * cfg.train.max_steps)
                summary = train(cfg, verbose=False)
            results[name] = summary["best_val_loss"]
            print(f"{name}: {summary['steps']} steps, held-out assistant loss {summary['val_loss']:.4f} "
                  f"(best {summary['best_val_loss']:.4f}) in {time.perf_counter() - start:.0f} s")
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in results.items())
          + f" cpu={torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
