"""`gptlab speedrun`: the best model a fixed wall-clock training budget buys, scored in bits per byte.

    tokenizer   trained on the recipe's sources             timed, not counted in the budget
    data        token shards (reused when already prepared) timed, not counted
    train       train.max_time seconds of training          the budget (compile warm-up included)
    score       bits per byte of eval.data[0], a text file the training never saw, read as it is on disk:
                consecutive non-overlapping windows of the model's context, every byte counted once

Results go to RUN/speedrun.json and a table; the last line printed is
`RESULT bpb=... tokens=... tokens_per_s=... ...`, and a markdown row is printed ready for the
leaderboard in benchmarks/SPEEDRUN.md.
"""

from __future__ import annotations

import glob
import time
from datetime import date
from pathlib import Path

from gptlab.config import Config, load_config
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json, require_file

DEFAULT_RECIPE = "recipes/speedrun_cpu.toml"


def speedrun(cfg: Config, progress: bool = True) -> dict:
    """Train cfg for cfg.train.max_time seconds from scratch and score it on cfg.eval.data[0]."""
    from gptlab.data import prepare_data
    from gptlab.evaluate import evaluate_text
    from gptlab.quickstart import _tokenizer_stage
    from gptlab.runs import checkpoint_dirs, load_run
    from gptlab.train import train

    score_file = _score_file(cfg)
    if not cfg.train.max_time:
        raise GptlabError("a speedrun needs a time budget", "set train.max_time (seconds), e.g. --train.max_time=600")
    run_dir, data_dir = Path(cfg.train.run_dir), Path(cfg.data.out_dir)
    if checkpoint_dirs(run_dir):
        raise GptlabError(f"{run_dir} already holds a run; a speedrun starts from scratch",
                          "delete it or choose another: --train.run_dir=runs/speedrun-2")
    cfg.train.data_dir = str(data_dir)
    say = print if progress else (lambda *a, **k: None)

    clock = time.perf_counter()
    tokenizer_path = _tokenizer_stage(cfg, run_dir, data_dir, say)
    tokenizer_s = time.perf_counter() - clock
    clock = time.perf_counter()
    say(f"[2/4] data: {data_dir}")
    prepare_data(cfg, tokenizer_path, progress=progress)
    prepare_s = time.perf_counter() - clock

    say(f"[3/4] train: {run_dir}, {cfg.train.max_time:.0f} s")
    clock = time.perf_counter()
    summary = train(cfg, verbose=progress)
    train_wall_s = time.perf_counter() - clock
    if summary["stopped"] == "interrupted":
        raise GptlabError("the speedrun was interrupted, so it has no score", "run it again to the end")

    say(f"[4/4] score: bits per byte of {score_file}")
    clock = time.perf_counter()
    model, tokenizer, _ = load_run(run_dir, "last")
    text = score_file.read_text(encoding="utf-8")
    scored = evaluate_text(model, tokenizer, text, name=score_file.name, batch_size=cfg.eval.batch_size,
                           topk=[1], progress=progress, data=cfg.data)
    score_s = time.perf_counter() - clock

    result = {
        "date": date.today().isoformat(), "bpb": scored["bpb"], "loss": scored["loss"], "score_file": str(score_file),
        "score_bytes": len(text.encode("utf-8")), "params": model.num_params(),
        "tokens": summary["tokens"], "steps": summary["steps"], "train_s": summary["elapsed"],
        "train_wall_s": round(train_wall_s, 1), "tokens_per_s": summary["tokens_per_s"],
        "tokenizer_s": round(tokenizer_s, 1), "prepare_s": round(prepare_s, 1), "score_s": round(score_s, 1),
        "tokenizer": f"{cfg.tokenizer.kind} {tokenizer.vocab_size}", "precision": summary["precision"],
        "compile": summary["compile"], "run_dir": str(run_dir),
    }
    atomic_write_json(run_dir / "speedrun.json", result)
    if progress:
        print(report(result))
    return result


def report(r: dict) -> str:
    rows = [("score: bits per byte", f"{r['bpb']:.4f}  ({r['score_bytes']:,} bytes of {Path(r['score_file']).name})"),
            ("training (the budget)", f"{r['train_s']:.0f} s, {r['steps']:,} steps, {r['tokens']:,} tokens, "
                                      f"{r['tokens_per_s']:,.0f} tokens/s ({r['train_wall_s']:.0f} s wall clock)"),
            ("model", f"{r['params'] / 1e6:.2f}M parameters, {r['tokenizer']}, {r['precision']}, "
                      f"compile {'on' if r['compile'] else 'off'}"),
            ("not counted", f"tokenizer {r['tokenizer_s']:.0f} s, data {r['prepare_s']:.0f} s, scoring {r['score_s']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    row = (f"| {r['date']} | CHANGE | {r['bpb']:.4f} | {r['tokens_per_s']:,.0f} | {r['tokens'] / 1e6:.2f}M "
           f"| {r['params'] / 1e6:.2f}M | {r['tokenizer']} |")
    result = (f"RESULT bpb={r['bpb']:.4f} tokens={r['tokens']} tokens_per_s={r['tokens_per_s']:.0f} "
              f"train_s={r['train_s']:.0f} params={r['params']} tokenizer_s={r['tokenizer_s']:.1f} prepare_s={r['prepare_s']:.1f}")
    return f"\nspeedrun: {r['run_dir']}\n{table}\n\nleaderboard row (benchmarks/SPEEDRUN.md):\n{row}\n\n{result}"


def load_speedrun_config(recipe: str | None, overrides: list[str]) -> Config:
    path = Path(recipe or DEFAULT_RECIPE)
    if not path.is_file():
        raise GptlabError(f"speedrun recipe not found: {path}",
                          f"run from the gptlab repository root (it has {DEFAULT_RECIPE}) or give a recipe TOML")
    return load_config(path, overrides)


def _score_file(cfg: Config) -> Path:
    """eval.data[0]: one text file, none of whose bytes the training sources may include."""
    if len(cfg.eval.data) != 1:
        raise GptlabError(f"a speedrun scores one text file; eval.data has {len(cfg.eval.data)} entries",
                          'set eval.data = ["path/to/held-out.txt"] in the recipe')
    score = require_file(cfg.eval.data[0], "the speedrun's score text (eval.data)")
    for source in cfg.data.sources + cfg.data.val_sources:
        for path in _files_of(source.path):
            if path.resolve() == score.resolve():
                raise GptlabError(f"the score text {score} is also a training source ({source.path})",
                                  "score on text the training never sees: take it out of data.sources")
    return score


def _files_of(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    return [Path(p) for p in glob.glob(pattern)] or [path]
