"""The chat demonstration (issue 13, item 5): does fine-tuning on instructions make a TinyStories model follow them?

One command, on a CPU, offline, from the repository root (../shared/data beside it):

    python benchmarks/chat_tinystories.py            # ~20 minutes on 2 cores; stages already done are skipped
    python benchmarks/chat_tinystories.py --quick    # the same pipeline at toy scale, ~1-2 minutes

Stages:
    1. base      `gptlab run recipes/tinystories-chat.toml`: a ~1M-parameter GPT on TinyStories V1 + a V2 sample,
                 1,200 steps of 4,096 tokens (a budget in steps, so the run is the same on any machine)
    2. data      instructions from the V2 validation stories, which the base never saw (gptlab.chat.instructions,
                 as `gptlab data instructions` builds them): "Write a story about a girl named Lily that uses the
                 words 'ball', 'garden' and 'sad'." -> the story. Of the eligible stories (a named character,
                 at most 250 words; seeded shuffle) the first 200 are the held-out set (the same 200 as
                 `gptlab data instructions ... --val-n 200`), the next 100 fine-tuning's validation set, the
                 next 3,000 its training set: the held-out instructions never steer fine-tuning, not even
                 through the choice of its best checkpoint
    3. sft       `gptlab sft --base BASE --data train.jsonl --val-data sft-val.jsonl --run-dir SFT --epochs 2`
    4. compare   base and fine-tuned model on the 200 held-out instructions, asked alike:
                   follow rate   one reply each, sampled with the same settings and seed (temperature 0.7,
                                 top-k 50, up to 300 tokens, seed 1337); a reply follows when every requested
                                 word and the name are in it as whole words (gptlab.evaluate.instructions).
                                 The fine-tuned model reads the instruction in its chat format; the base model,
                                 which has no chat tokens, reads the same instruction as plain text and a
                                 newline -- the only way it can be asked.
                   held-out loss the loss (nats per token) and bits per byte of the reference story given its
                                 instruction, the same way: after "<|user|>instruction<|end|><|assistant|>" for
                                 the fine-tuned model (its <|end|> scored too), after "instruction\\n" for the
                                 base (its EOS scored too). Same stories, same tokens of story text, so the
                                 numbers compare: how much better the fine-tuned model predicts the story the
                                 instruction asked for.
                 The references themselves follow their instructions (rate 1.0): the ceiling.

Writes OUT/results.json and OUT/results.md (OUT: runs/tinystories-chat, or runs/tinystories-chat-quick) and
ends with `RESULT base_follow_rate=... sft_follow_rate=... base_heldout_loss=... sft_heldout_loss=... cpu=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's gptlab, whatever is installed

import torch  # noqa: E402

from gptlab.config import SampleConfig  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402

RECIPE = REPO / "recipes" / "tinystories-chat.toml"
SHARED = Path(os.environ.get("GPTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
STORIES = "tinystories/TinyStoriesV2-GPT4-valid_head5M.txt"  # instructions from stories the base never saw

SCALES = {
    "full": {"quick": False, "out": "runs/tinystories-chat", "train_n": 3000, "val_n": 200, "sft_val_n": 100,
             "max_words": 250, "epochs": 2,
             "max_new_tokens": 300, "base_overrides": [], "sft_overrides": []},
    # a 2 x 64 model on the V1 slice, a few hundred steps: checks every stage end to end, measures nothing
    "quick": {"quick": True, "out": "runs/tinystories-chat-quick", "train_n": 300, "val_n": 20, "sft_val_n": 10,
              "max_words": 150, "epochs": 1,
              "max_new_tokens": 120,
              "base_overrides": ["--tokenizer.vocab_size=1024", "--tokenizer.train_max_bytes=1000000",
                                 f"--data.sources=[{{path = {str(SHARED / 'tinystories/TinyStories-train_head.txt')!r}}}]",
                                 "--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--train.max_steps=150",
                                 "--train.eval_every=50", "--train.eval_batches=5", "--sample.max_new_tokens=40"],
              "sft_overrides": []},
}


def say(*lines) -> None:
    print(*lines, sep="\n", flush=True)


def base_stage(scale: dict, out: Path) -> Path:
    """1. The base run from the recipe (resumed or skipped when done, as `gptlab run` does)."""
    from gptlab.config import load_config
    from gptlab.quickstart import run_recipe

    overrides = list(scale["base_overrides"])
    if scale["quick"]:  # everything under OUT
        overrides += [f"--data.out_dir={str(out / 'base-data')!r}", f"--train.run_dir={str(out / 'base')!r}"]
    elif SHARED != REPO.parent / "shared" / "data":  # the recipe's ../shared/data lives elsewhere here
        sources = load_config(RECIPE).data.sources
        overrides += [f"--data.sources.{i}.path={str(SHARED / Path(s.path).relative_to('../shared/data'))!r}"
                      for i, s in enumerate(sources)]
    say(f"== 1. base model: gptlab run {RECIPE.relative_to(REPO)} {' '.join(overrides)}".rstrip())
    run_recipe(RECIPE, overrides, progress=True)
    return Path(load_config(RECIPE, overrides).train.run_dir).resolve()


def instructions_stage(scale: dict, out: Path) -> dict[str, Path]:
    """2. The training, validation and held-out instruction sets (rebuilt every time: seconds, the same for the seed)."""
    from gptlab.chat.instructions import build_instructions, read_stories
    from gptlab.files import atomic_write_text

    stories = read_stories(SHARED / STORIES)
    built = build_instructions(stories, scale["train_n"], seed=0, val_n=scale["val_n"] + scale["sft_val_n"],
                               max_words=scale["max_words"], source=Path(STORIES).name)
    sets = {"train": built["train"], "sft-val": built["val"][scale["val_n"]:], "heldout": built["val"][: scale["val_n"]]}
    paths = {}
    for name, records in sets.items():
        paths[name] = out / f"instructions-{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    say(f"== 2. instructions from {len(stories):,} stories of {STORIES} ({built['skipped']:,} skipped): "
        + ", ".join(f"{len(sets[n]):,} {n} -> {_shown(p)}" for n, p in paths.items()))
    return paths


def _shown(path: Path) -> str:
    """A path as short as it reads well: relative to the repository where it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def sft_stage(scale: dict, base: Path, train: Path, validation: Path, out: Path) -> Path:
    """3. Fine-tune the base run on the training instructions (skipped when a finished run is there)."""
    run = out / "sft"
    summary = run / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("stopped") != "interrupted":
        say(f"== 3. fine-tuning: {run} is already trained")
        return run
    command = [sys.executable, "-m", "gptlab", "sft", "--base", _shown(base), "--data", _shown(train), "--val-data",
               _shown(validation), "--run-dir", _shown(run), "--epochs", str(scale["epochs"]), *scale["sft_overrides"]]
    say(f"== 3. fine-tuning: gptlab {' '.join(command[3:])}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    code = subprocess.run(command, env=env).returncode
    if code:
        raise GptlabError(f"the fine-tuning stage failed (gptlab sft exited with {code})", "see its message above")
    return run


def compare_stage(scale: dict, base: Path, sft: Path, heldout: Path) -> dict:
    """4. Both models on the held-out instructions: follow rate (same prompts, sampling and seed) and loss."""
    from gptlab.evaluate.chat import evaluate_conversations
    from gptlab.evaluate.instructions import instruction_following, read_instructions
    from gptlab.runs import load_run

    sample = SampleConfig(temperature=0.7, top_k=50, max_new_tokens=scale["max_new_tokens"], seed=1337)
    instructions = read_instructions(str(heldout))
    say(f"== 4. comparing on {len(instructions)} held-out instructions")
    rows = {}
    for label, run, as_chat in (("base", base, False), ("sft", sft, True)):
        started = time.perf_counter()
        model, tokenizer, cfg = load_run(run, "best")
        follow = instruction_following(model, tokenizer, instructions, sample, as_chat=as_chat, data=cfg.data,
                                       examples=3, name=str(heldout))
        loss = evaluate_conversations(model, tokenizer, instructions, as_chat=as_chat, data=cfg.data, topk=(),
                                      name=str(heldout))
        rows[label] = {"run": _shown(run), "follow": follow, "loss": loss, "seconds": round(time.perf_counter() - started, 1)}
    return {"instructions": len(instructions), "sampling": rows["base"]["follow"]["sampling"], "rows": rows,
            "reference_rate": rows["base"]["follow"]["reference_rate"]}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_results(results: dict) -> str:
    s = results["sampling"]
    lines = [f"Held-out instructions: {results['instructions']} (stories never seen in fine-tuning or pretraining). "
             f"Sampling: temperature {s['temperature']}, top-k {s['top_k']}, up to {s['max_new_tokens']} tokens, "
             f"seed {s['seed']}.", "",
             "| model | asked as | follows all | name present | all 3 words | each word | held-out loss | bits/byte | reply words |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in results["rows"].items():
        f, loss = row["follow"], row["loss"]
        lines.append(f"| {'base' if label == 'base' else 'fine-tuned'} (`{row['run']}`) | {f['format']} | "
                     f"**{_pct(f['rate'])}** | {_pct(f['rates']['name'])} | {_pct(f['rates']['words'])} | "
                     f"{_pct(f['rates']['word'])} | {loss['loss']:.4f} | {loss['bpb']:.4f} | {f['reply_words']:.0f} |")
    lines.append(f"| the reference stories | - | {_pct(results['reference_rate'])} | | | | | | |")
    example = results["rows"]["sft"]["follow"]["examples"][0]
    lines += ["", f"Example: {example['instruction']}"]
    for label, row in results["rows"].items():
        e = row["follow"]["examples"][0]
        verdict = "follows" if e["ok"] else "misses " + ", ".join(e["missing"])
        lines += [f"  {label} ({verdict}): {' '.join(e['reply'].split())[:400]}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the whole pipeline at toy scale (~1-2 minutes)")
    parser.add_argument("--out", help="where the instruction sets, the fine-tuned run and the results go")
    args = parser.parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    os.chdir(REPO)  # the recipe's paths are relative to the repository root
    out = Path(args.out or scale["out"]).resolve()
    if not (SHARED / STORIES).is_file():
        print(f"error: {SHARED / STORIES} not found — put ../shared/data beside the checkout or set GPTLAB_SHARED_DATA",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        base = base_stage(scale, out)
        sets = instructions_stage(scale, out)
        sft = sft_stage(scale, base, sets["train"], sets["sft-val"], out)
        results = compare_stage(scale, base, sft, sets["heldout"])
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gptlab.files import atomic_write_json, atomic_write_text

    results["cpu"] = torch.backends.cpu.get_cpu_capability()
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = format_results(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    rows = results["rows"]
    say("", table, "", f"results: {_shown(out / 'results.md')}, {_shown(out / 'results.json')}",
        f"RESULT base_follow_rate={rows['base']['follow']['rate']:.4f} sft_follow_rate={rows['sft']['follow']['rate']:.4f} "
        f"base_heldout_loss={rows['base']['loss']['loss']:.4f} sft_heldout_loss={rows['sft']['loss']['loss']:.4f} "
        f"cpu={results['cpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
