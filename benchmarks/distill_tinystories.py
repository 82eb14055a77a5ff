"""Does distillation pay? A ~4M teacher, then a ~0.5M student at equal student compute, four ways (issue 17).

    real        the real data only
    sequence    the real data + text the teacher wrote from the training documents' first words (`gptlab distill`),
                `--mix` times as many tokens as the real training split (sequence-level distillation)
    logits      the real data, and the teacher's next-token distributions in the loss (train.teacher)
    on_policy   as logits, and part of every batch rewritten by the student and scored by the teacher
                (train.distill_on_policy: GKD's on-policy distillation)

Every student trains the same number of steps on the same number of tokens (the teacher's forward passes and the
student's own sampling are extra compute, reported as wall time beside the gain). Two cases:

    tinystories  TinyStories V1 head + V2 sample, BPE 4,096, context 256: teacher 4 x 256 (4.2M), student 4 x 64
                 (0.46M); scored in bits per byte on TinyStories-valid_hf_head.txt, which no run trains on.
    meditations  seed 000's case: Marcus Aurelius' Meditations (~0.1M tokens; 20% of its paragraphs held out),
                 BPE 2,048, context 128: a small corpus for a 0.43M student (6 x 64). Teacher 4 x 192 (2.2M, early
                 stopping), students train ~18 epochs; the table gives each one's best and last validation bits
                 per byte (does distillation delay the overfitting?) and scores its last checkpoint on the real
                 validation split (the sequence way validates on a split that also holds teacher text).

    python benchmarks/distill_tinystories.py                       # both cases, default knobs
    python benchmarks/distill_tinystories.py --tune                # also the knob settings of TUNING, best picked on val
    python benchmarks/distill_tinystories.py --cases meditations
    python benchmarks/distill_tinystories.py --quick               # the pipeline at toy scale, a few minutes
    python benchmarks/distill_tinystories.py --report              # the table again, from the runs finished in OUT

A tuned way's setting is picked by the runs' own validation split; the held-out column is never used to choose.
Runs already finished are kept (delete OUT to redo them). Writes OUT/distill.md (OUT: runs/distill) and ends with
`RESULT tinystories_real_bpb=... tinystories_logits_bpb=... ... cpu=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's gptlab, whatever is installed

import torch  # noqa: E402

SHARED = Path(os.environ.get("GPTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
WAYS = ("real", "sequence", "logits", "on_policy")


@dataclass
class Case:
    sources: list[dict]
    held_out: str | None  # a text no run trains on; None: the runs' own validation split
    settings: list[str]  # text, tokenizer, data settings (overrides)
    teacher: list[str]
    student: list[str]
    teacher_steps: int
    student_steps: int
    eval_every: int
    new_tokens: int  # on-policy: tokens the student writes a row
    prompt_words: int = 4  # the teacher's prompts: the first words of each training document
    teacher_extra: list[str] = field(default_factory=list)


COMMON = ["--profile=cpu-fast", "--model.preset=tiny-1m", "--train.batch_size=16", "--train.log_every=50",
          "--train.sample_every=0", "--train.keep_last=1"]

CASES = {
    "tinystories": Case(
        sources=[{"path": "tinystories/TinyStories-train_head.txt"}, {"path": "tinystories/TinyStoriesV2-GPT4-train_sample.txt"}],
        held_out="tinystories/TinyStories-valid_hf_head.txt",
        settings=["--tokenizer.kind=bpe", "--tokenizer.vocab_size=4096", "--data.val_fraction=0.02",
                  "--model.context_length=256", "--train.eval_batches=20"],
        teacher=["--model.n_layer=4", "--model.d_model=256", "--model.n_head=4"],
        student=["--model.n_layer=4", "--model.d_model=64", "--model.n_head=2"],
        teacher_steps=1000, student_steps=500, eval_every=125, new_tokens=32),
    "meditations": Case(
        sources=[{"path": "meditations.txt", "documents": "blank_lines"}],
        held_out=None,
        settings=['--text.normalize=["strip_gutenberg", "nfkc", "greek_to_latin", "whitespace", "regex"]',
                  "--text.regex_rules=[{pattern = '\\s*\\n\\s*', replacement = ' '}]",
                  "--tokenizer.kind=bpe", "--tokenizer.vocab_size=2048", "--data.val_fraction=0.2",
                  "--model.context_length=128", "--model.dropout=0.1", "--train.eval_batches=none"],
        teacher=["--model.n_layer=4", "--model.d_model=192", "--model.n_head=4"],
        student=["--model.n_layer=6", "--model.d_model=64", "--model.n_head=2"],
        teacher_steps=1000, student_steps=800, eval_every=40, new_tokens=32,
        teacher_extra=["--train.early_stop_patience=4"]),
}

# The knobs each way starts from, and what --tune tries besides.
DEFAULT_KNOBS = {"real": {}, "sequence": {"mix": 0.5}, "logits": {"weight": 0.5, "temperature": 1.0},
                 "on_policy": {"weight": 0.5, "temperature": 1.0, "on_policy": 0.5, "beta": 0.5}}
TUNING = {"sequence": [{"mix": 0.25}, {"mix": 1.0}],
          "logits": [{"weight": 0.9, "temperature": 1.0}, {"weight": 0.5, "temperature": 2.0}, {"weight": 0.9, "temperature": 2.0}],
          "on_policy": [{"weight": 0.5, "temperature": 1.0, "on_policy": 0.25, "beta": 0.0},
                        {"weight": 0.9, "temperature": 1.0, "on_policy": 0.5, "beta": 0.0}]}


def say(*lines) -> None:
    print(*lines, sep="\n", flush=True)


def knob_name(way: str, knobs: dict) -> str:
    short = {"mix": "mix", "weight": "w", "temperature": "T", "on_policy": "lam", "beta": "beta"}
    return "-".join([way, *(f"{short[k]}{v:g}" for k, v in knobs.items())])


def source_overrides(sources: list[dict]) -> str:
    entries = ", ".join("{" + ", ".join(f"{k} = {v!r}" for k, v in s.items()) + "}" for s in sources)
    return f"--data.sources=[{entries}]"


class Bench:
    def __init__(self, name: str, case: Case, args, out: Path):
        self.name, self.case, self.args, self.out = name, case, args, out / name
        self.real_data = self.out / "data"
        sources = [{**s, "path": str(SHARED / s["path"])} for s in case.sources]
        self.sources = sources
        self.base = [*COMMON, *case.settings, source_overrides(sources), f"--data.out_dir={str(self.real_data)!r}",
                     f"--train.data_dir={str(self.real_data)!r}", f"--train.eval_every={case.eval_every}",
                     f"--train.threads={args.threads}"]

    def steps(self, steps: int) -> int:
        return max(20, steps // 20) if self.args.quick else steps

    def run(self, run_name: str, overrides: list[str]) -> dict:
        """Train (or keep) OUT/<case>/<run_name>; its summary."""
        from gptlab.config import load_config
        from gptlab.quickstart import run_pipeline
        from gptlab.runs import finished_summary

        run_dir = self.out / run_name
        done = finished_summary(run_dir)
        if done:
            return done
        cfg = load_config(None, [*self.base, *overrides, f"--train.run_dir={str(run_dir)!r}"])
        started = time.perf_counter()
        run_pipeline(cfg, progress=not self.args.quiet)
        summary = finished_summary(run_dir)
        say(f"   {run_name}: {time.perf_counter() - started:.0f} s")
        return summary

    def teacher(self) -> Path:
        c = self.case
        self.run("teacher", [*c.teacher, f"--train.max_steps={self.steps(c.teacher_steps)}", *c.teacher_extra])
        return self.out / "teacher"

    def student(self, way: str, knobs: dict) -> dict:
        c = self.case
        name = knob_name(way, knobs)
        overrides = [*c.student, f"--train.max_steps={self.steps(c.student_steps)}"]
        teacher = self.out / "teacher"
        if way == "sequence":
            data, sources = self.synthetic_data(knobs["mix"])
            overrides += [source_overrides(sources), f"--data.out_dir={str(data)!r}", f"--train.data_dir={str(data)!r}"]
        if way in ("logits", "on_policy"):
            overrides += [f"--train.teacher={str(teacher)!r}", f"--train.distill_weight={knobs['weight']}",
                          f"--train.distill_temperature={knobs['temperature']}"]
        if way == "on_policy":
            overrides += [f"--train.distill_on_policy={knobs['on_policy']}", f"--train.distill_beta={knobs['beta']}",
                          f"--train.distill_new_tokens={c.new_tokens}"]
        summary = self.run(name, overrides)
        return {"way": way, "knobs": knobs, "name": name, **self.scores(self.out / name, summary)}

    def synthetic_data(self, mix: float) -> tuple[Path, list[dict]]:
        """The real sources + `mix` x the real training tokens written by the teacher, prepared with the real data's
        tokenizer (so every student reads the same tokens for the same text)."""
        from gptlab.config import DistillConfig, load_config
        from gptlab.data import load_meta, prepare_data
        from gptlab.distill import distill_corpus, load_teacher

        corpus = self.out / f"synthetic-mix{mix:g}.jsonl"
        real_tokens = load_meta(self.real_data)["splits"]["train"]["tokens"]
        if not corpus.exists():
            prompts = self.prompts()
            tokens = int(mix * real_tokens) // (20 if self.args.quick else 1)
            settings = DistillConfig(tokens=max(1, tokens), batch_size=32,
                                     max_new_tokens=min(200, self.case_context() - 16), temperature=1.0, top_p=1.0)
            say(f"   the teacher writes {settings.tokens:,} tokens from {len(prompts):,} prompts -> {corpus}")
            started = time.perf_counter()
            summary = distill_corpus(load_teacher(self.out / "teacher"), prompts, corpus, settings, verbose=not self.args.quiet)
            say(f"   {summary['tokens']:,} tokens in {time.perf_counter() - started:.0f} s")
        data = self.out / f"data-mix{mix:g}"
        sources = [*self.sources, {"path": str(corpus), "label": "teacher"}]
        cfg = load_config(None, [*self.base, source_overrides(sources), f"--data.out_dir={str(data)!r}"])
        prepare_data(cfg, self.real_data / "tokenizer.json")
        return data, sources

    def case_context(self) -> int:
        return int(next(o for o in self.case.settings if o.startswith("--model.context_length=")).split("=")[1])

    def prompts(self) -> list[str]:
        """The first words of every training document (the validation split's are left out)."""
        import numpy as np

        from gptlab.config import load_config
        from gptlab.data.prepare import DocumentEncoder
        from gptlab.text import iter_documents

        cfg = load_config(None, self.base)
        split = DocumentEncoder(Path("unused"), cfg, None, None, np.dtype(np.uint16))  # normalises and draws the split
        prompts = []
        for _, raw in iter_documents(cfg.data.sources, cfg.text):
            doc = split.normalize(raw).strip()
            if not doc or split.is_val(doc.encode("utf-8")):
                continue
            words = doc.split()[: self.case.prompt_words]
            if len(words) == self.case.prompt_words:
                prompts.append(" ".join(words))
        return prompts

    def scores(self, run_dir: Path, summary: dict) -> dict:
        """Validation bits per byte at the end, the best one and its step; held-out bits per byte (last checkpoint)."""
        curve = read_val_curve(run_dir)
        best_step, best = min(curve, key=lambda r: r[1]) if curve else (None, None)
        row = {"val_bpb": curve[-1][1] if curve else None, "best_val_bpb": best, "best_step": best_step,
               "steps": summary["steps"], "tokens": summary["tokens"], "seconds": summary["elapsed"],
               "tokens_per_s": summary["tokens_per_s"], "held_out_bpb": None}
        # Scored on text no run trained on: the held-out file, else the real data's validation split (the sequence
        # way's own validation split holds the teacher's text too, so its curve is not comparable)
        row["held_out_bpb"] = held_out_bpb(run_dir, SHARED / self.case.held_out if self.case.held_out else self.real_data,
                                           self.args)
        return row


def held_out_bpb(run_dir: Path, text: Path, args) -> float:
    from gptlab.cli import main as gptlab

    report = run_dir / "eval.json"
    if not report.is_file():
        code = gptlab(["eval", str(run_dir), "--data", str(text), "--max-tokens", "20000" if args.quick else "200000",
                       "--checkpoint", "last", "--no-samples", "--threads", str(args.threads), "-q"])
        assert code == 0, f"gptlab eval {run_dir} failed"
    return float(json.loads(report.read_text())["datasets"][0]["bpb"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ",".join(WAYS))
    parser.add_argument("--tune", action="store_true", help="also train the knob settings of TUNING; each way's best on val")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of every setting (default and "
                        "TUNING) already finished in OUT")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = every core")
    parser.add_argument("--quick", action="store_true", help="toy scale: 1/20 of the steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=None, help="default runs/distill (-quick)")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",")]
    ways = [w.strip() for w in args.ways.split(",")]
    if unknown := [c for c in cases if c not in CASES] + [w for w in ways if w not in WAYS]:
        parser.error(f"unknown case or way: {', '.join(unknown)}")
    missing = [SHARED / s["path"] for c in cases for s in CASES[c].sources if not (SHARED / s["path"]).is_file()]
    if missing:
        say(f"distill_tinystories: {missing[0]} is missing — put ../shared/data beside the repo or set GPTLAB_SHARED_DATA")
        return 2
    out = (args.out or REPO / ("runs/distill" + ("-quick" if args.quick else ""))).resolve()

    from gptlab.device import peak_flops, set_threads

    threads = set_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    peak = {p: peak_flops(torch.device("cpu"), getattr(torch, d)) / 1e9 for p, d in (("fp32", "float32"), ("bf16", "bfloat16"))}
    header = (f"cpu {capability}, {threads} threads, torch {torch.__version__}, gptlab bench peak fp32 {peak['fp32']:,.0f} / "
              f"bf16 {peak['bf16']:,.0f} GFLOP/s")
    say(header)

    results: dict[str, list[dict]] = {}
    teachers: dict[str, dict] = {}
    for name in cases:
        bench = Bench(name, CASES[name], args, out)
        if not args.report:
            say(f"\n== {name}: teacher")
            bench.teacher()
        teachers[name] = bench.scores(bench.out / "teacher", json.loads((bench.out / "teacher" / "summary.json").read_text()))
        rows = []
        for way in ways:
            for knobs in [DEFAULT_KNOBS[way], *(TUNING.get(way, []) if args.tune or args.report else [])]:
                if args.report and not (bench.out / knob_name(way, knobs) / "summary.json").is_file():
                    continue
                say(f"\n== {name}: {knob_name(way, knobs)}")
                rows.append(bench.student(way, knobs))
        results[name] = rows

    text = report(header, results, teachers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.md").write_text(text, encoding="utf-8")
    say("", text)
    say("RESULT " + " ".join(result_fields(results)) + f" cpu={capability}")
    return 0


def best_per_way(rows: list[dict]) -> dict[str, dict]:
    """Each way's setting with the lowest validation bits per byte (best_val_bpb: where the run's best checkpoint is)."""
    best: dict[str, dict] = {}
    for r in rows:
        key = r["best_val_bpb"] if r["best_val_bpb"] is not None else float("inf")
        if r["way"] not in best or key < best[r["way"]]["best_val_bpb"]:
            best[r["way"]] = r
    return best


def report(header: str, results: dict[str, list[dict]], teachers: dict[str, dict]) -> str:
    parts = ["# Distillation: does it pay?\n", header + "\n"]
    for name, rows in results.items():
        t = teachers[name]
        best = best_per_way(rows)
        base = best.get("real")
        held = CASES[name].held_out
        parts.append(f"\n## {name}\n\nteacher: {t['steps']:,} steps, val bpb {t['val_bpb']:.4f} (best {t['best_val_bpb']:.4f} at "
                     f"step {t['best_step']}), {'held-out' if held else 'real val (last checkpoint)'} bpb {t['held_out_bpb']:.4f}\n")
        cols = "| way | setting | steps | tokens | train s | tokens/s | best val bpb (step) | last val bpb |"
        cols += " held-out bpb | vs real |" if held else " real val bpb (last) | vs real |"
        lines = [cols, "|" + "---|" * (cols.count("|") - 1)]
        for r in sorted(rows, key=lambda r: (WAYS.index(r["way"]), r["name"])):
            score, ref = r["held_out_bpb"], base["held_out_bpb"] if base else None
            mark = " **(picked)**" if best[r["way"]] is r and len([x for x in rows if x["way"] == r["way"]]) > 1 else ""
            line = (f"| {r['way']} | {r['name']}{mark} | {r['steps']:,} | {r['tokens']:,} | {r['seconds']:.0f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['best_val_bpb']:.4f} ({r['best_step']}) | {r['val_bpb']:.4f} |")
            line += f" {r['held_out_bpb']:.4f} |" + (f" {score - ref:+.4f} |" if ref is not None else " |")
            lines.append(line)
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def result_fields(results: dict[str, list[dict]]) -> list[str]:
    fields = []
    for name, rows in results.items():
        for way, r in best_per_way(rows).items():
            fields.append(f"{name}_{way}_bpb={r['held_out_bpb']:.4f}")
    return fields


def read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val_bpb) of every evaluation in a run's metrics.csv."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["val_bpb"])) for r in csv.DictReader(f) if r.get("val_bpb") not in ("", None)]


if __name__ == "__main__":
    sys.exit(main())
