"""Bad input, met the way users meet it: every command, given a missing, empty, binary or truncated file, a wrong
type in a TOML, an impossible model shape, a corrupt checkpoint, a malformed JSONL line, or a file where a folder
is wanted, stops with one line on stderr that names the problem and the fix, exit code 2, no traceback, and
leaves no output (or half of one) behind.

Each case runs the real CLI (`python -m gptlab ...`) in a subprocess, in a fresh folder, against inputs made
here: a tiny run trained once for the module and damaged copies of it, and a folder of bad files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from helpers import TINY_STORIES, garbage_file, tiny_config, truncate_file

import gptlab

SRC = Path(gptlab.__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shards) -> Path:
    """A 2-layer run trained for 8 steps (checkpoints at steps 4 and 8); cases damage copies of it, never it."""
    import torch

    from gptlab.train import train

    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("bad_input") / "run"
    train(tiny_config(tiny_shards, run), verbose=False)
    torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_run) -> Path:
    """A folder of bad inputs, each named for what is wrong with it."""
    from gptlab.config import TokenizerConfig
    from gptlab.export import export_hf
    from gptlab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("bad_files")
    (d / "stories.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in TINY_STORIES * 5), encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.json").write_bytes(b"")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "image.txt").write_bytes(PNG)
    (d / "image.json").write_bytes(PNG)
    (d / "image.toml").write_bytes(PNG)
    (d / "latin1.txt").write_bytes("Un café au lait, s'il vous plaît.\n".encode("latin-1") * 20)
    (d / "latin1.toml").write_bytes("[train]\nsample_prompt = \"café\"\n".encode("latin-1"))
    good = '{"text": "Once upon a time there was a cat."}\n'
    (d / "malformed.jsonl").write_text(good + '{"text": "a line cut sho\n' + good, encoding="utf-8")
    (d / "malformed_hellaswag.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b"\n', encoding="utf-8")
    (d / "notjson.json").write_text("this is not json\n", encoding="utf-8")
    (d / "foreign.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n', encoding="utf-8")
    (d / "wrong_type.toml").write_text('[train]\nlr = "fast"\n', encoding="utf-8")
    (d / "model_wrong_type.toml").write_text('[model]\nn_layer = "four"\n', encoding="utf-8")
    (d / "bad_shape.toml").write_text("[model]\nd_model = 30\nn_head = 4\n", encoding="utf-8")
    (d / "a_file").write_text("a file, not a folder\n", encoding="utf-8")
    (d / "a_folder").mkdir()
    # a tokenizer of another vocabulary than the run's (300 tokens, not 400)
    train_tokenizer(TINY_STORIES * 10, TokenizerConfig(vocab_size=300)).save(d / "other_tokenizer.json")
    # ... and one of the run's own size (400) learnt from other text: nothing but its ids tells them apart
    shouted = train_tokenizer([s.upper() for s in TINY_STORIES * 10], TokenizerConfig(vocab_size=400))
    assert shouted.vocab_size == 400
    shouted.save(d / "same_size_tokenizer.json")
    # Hugging Face folders: a garbage config.json, truncated weights
    hf = d / "hf_export"
    export_hf(tiny_run, hf)
    shutil.copytree(hf, d / "hf_bad_config")
    (d / "hf_bad_config" / "config.json").write_text("{ not json", encoding="utf-8")
    shutil.copytree(hf, d / "hf_truncated")
    truncate_file(d / "hf_truncated" / "model.safetensors")
    return d


@dataclass
class Inputs:
    """What a case's command line is built from: the bad files, the pristine run and its data, the case's folder."""

    bad: Path
    run: Path
    shards: Path
    here: Path

    def f(self, name: str) -> str:
        return str(self.bad / name)

    @property
    def tokenizer(self) -> str:
        return str(self.run / "tokenizer.json")

    def replace_with(self, name: str) -> Callable[[Path], None]:
        return lambda path: shutil.copy(self.bad / name, path)

    def damaged_run(self, damage: Callable[[Path], None] = lambda run: None) -> str:
        """A copy of the tiny run, in the case's folder, with `damage` done to it (commands may write into it)."""
        copy = self.here / "run"
        shutil.copytree(self.run, copy)
        damage(copy)
        return str(copy)

    def damaged_shards(self, damage: Callable[[Path], None]) -> str:
        copy = self.here / "data"
        shutil.copytree(self.shards, copy)
        damage(copy)
        return str(copy)


def every_checkpoint(name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage file `name` of every checkpoint of a run (so neither best nor last is whole)."""
    def apply(run: Path) -> None:
        for checkpoint in sorted((run / "checkpoints").glob("step_*")):
            damage(checkpoint / name)
    return apply


def in_run(name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run: damage(run / name)


def lr_fast(config: Path) -> None:
    config.write_text(re.sub(r"^lr = .*$", 'lr = "fast"', config.read_text(), flags=re.M))


@dataclass
class Case:
    id: str
    argv: Callable[[Inputs], list[str]]
    names: str  # a substring the error line must hold: the file, key or value at fault
    absent: tuple[str, ...] = ()  # outputs (relative to the case's folder) that must not exist afterwards


NO_SAMPLES = "--no-samples"
EVAL_OUT = ("run/eval.json", "run/eval.md")
MORE, NEXT = ["--train.max_steps=12"], "run/checkpoints/step_0000012"  # resume the 8-step run for 4 more steps
TRAIN = ["--train.threads=1", "--train.compile=false", "--train.precision=fp32", "--train.max_steps=2"]

CASES = [
    # --- tokenizer
    Case("tokenizer-encode-missing-file", lambda i: ["tokenizer", "encode", "-t", "missing.json", "hi"], "missing.json"),
    Case("tokenizer-encode-empty-file", lambda i: ["tokenizer", "encode", "-t", i.f("empty.json"), "hi"], "empty.json"),
    Case("tokenizer-encode-binary-file", lambda i: ["tokenizer", "encode", "-t", i.f("image.json"), "hi"], "image.json"),
    Case("tokenizer-decode-not-gptlab-json", lambda i: ["tokenizer", "decode", "-t", i.f("foreign.json"), "1"], "foreign.json"),
    Case("tokenizer-decode-id-out-of-range", lambda i: ["tokenizer", "decode", "-t", i.tokenizer, "1", "99999"], "99999"),
    Case("tokenizer-train-missing-corpus", lambda i: ["tokenizer", "train", "--data", "missing.txt", "--out", "tok.json"], "missing.txt", ("tok.json",)),
    Case("tokenizer-train-binary-corpus", lambda i: ["tokenizer", "train", "--data", i.f("image.txt"), "--out", "tok.json"], "image.txt", ("tok.json",)),
    Case("tokenizer-train-non-utf8-corpus", lambda i: ["tokenizer", "train", "--data", i.f("latin1.txt"), "--out", "tok.json"], "latin1.txt", ("tok.json",)),
    Case("tokenizer-train-malformed-jsonl", lambda i: ["tokenizer", "train", "--data", i.f("malformed.jsonl"), "--out", "tok.json"], "malformed.jsonl", ("tok.json",)),
    Case("tokenizer-train-out-is-folder", lambda i: ["tokenizer", "train", "--data", i.f("stories.txt"), "--out", i.f("a_folder")], "a_folder"),
    Case("tokenizer-train-negative-vocab", lambda i: ["tokenizer", "train", "--data", "x.txt", "--out", "tok.json", "--tokenizer.vocab_size=-5"], "tokenizer.vocab_size", ("tok.json",)),
    # --- data
    Case("data-prepare-missing-tokenizer", lambda i: ["data", "prepare", "--data", i.f("stories.txt"), "-t", "missing.json", "--out", "out"], "missing.json", ("out",)),
    Case("data-prepare-malformed-jsonl", lambda i: ["data", "prepare", "--data", i.f("malformed.jsonl"), "-t", i.tokenizer, "--out", "out", "--data.workers=1"], "malformed.jsonl", ("out",)),
    Case("data-prepare-empty-corpus", lambda i: ["data", "prepare", "--data", i.f("empty.txt"), "-t", i.tokenizer, "--out", "out", "--data.workers=1"], "empty.txt", ("out",)),
    Case("data-prepare-out-is-file", lambda i: ["data", "prepare", "--data", i.f("stories.txt"), "-t", i.tokenizer, "--out", i.f("a_file"), "--data.workers=1"], "a_file"),
    Case("data-inspect-file-not-folder", lambda i: ["data", "inspect", i.f("a_file")], "a_file"),
    Case("data-inspect-truncated-shard", lambda i: ["data", "inspect", i.damaged_shards(in_run("train_000000.bin", truncate_file))], "train_000000.bin"),
    Case("data-inspect-corrupt-meta", lambda i: ["data", "inspect", i.damaged_shards(in_run("meta.json", garbage_file))], "meta.json"),
    Case("data-download-unknown-name", lambda i: ["data", "download", "no-such-corpus", "--out", "raw"], "no-such-corpus", ("raw",)),
    # --- model
    Case("model-info-head-does-not-divide-width", lambda i: ["model", "info", "tiny-1m", "--model.n_head=3"], "n_head"),
    Case("model-info-impossible-shape-toml", lambda i: ["model", "info", i.f("bad_shape.toml")], "n_head"),
    Case("model-info-wrong-type-toml", lambda i: ["model", "info", i.f("model_wrong_type.toml")], "model.n_layer"),
    # --- train
    Case("train-data-dir-missing", lambda i: ["train", "--data-dir", "missing_data", "--run", "r", *TRAIN], "missing_data", ("r",)),
    Case("train-run-is-file", lambda i: ["train", "--data-dir", str(i.shards), "--run", i.f("a_file"), *TRAIN], "a_file"),
    Case("train-truncated-shard", lambda i: ["train", "--data-dir", i.damaged_shards(in_run("train_000000.bin", truncate_file)), "--run", "r", *TRAIN], "train_000000.bin", ("r",)),
    Case("train-wrong-type-toml", lambda i: ["train", "--config", i.f("wrong_type.toml"), "--run", "r", *TRAIN], "train.lr", ("r",)),
    Case("train-binary-toml", lambda i: ["train", "--config", i.f("image.toml"), "--run", "r", *TRAIN], "image.toml", ("r",)),
    Case("train-non-utf8-toml", lambda i: ["train", "--config", i.f("latin1.toml"), "--run", "r", *TRAIN], "latin1.toml", ("r",)),
    Case("train-unknown-key-override", lambda i: ["train", "--data-dir", str(i.shards), "--run", "r", "--train.lrr=1", *TRAIN], "train.lrr", ("r",)),
    Case("train-impossible-shape", lambda i: ["train", "--data-dir", str(i.shards), "--run", "r", "--model.n_head=2", "--model.n_kv_head=3", *TRAIN], "n_kv_head", ("r",)),
    Case("train-override-without-value", lambda i: ["train", "--data-dir", str(i.shards), "--run", "r", *TRAIN, "--train.max_steps"], "--train.max_steps", ("r",)),
    Case("train-resume-truncated-weights", lambda i: ["train", "--resume", i.damaged_run(every_checkpoint("model.safetensors", truncate_file)), *MORE], "model.safetensors", (NEXT,)),
    Case("train-resume-garbage-state", lambda i: ["train", "--resume", i.damaged_run(every_checkpoint("state.pt", garbage_file)), *MORE], "state.pt", (NEXT,)),
    Case("train-resume-broken-checkpoint-json", lambda i: ["train", "--resume", i.damaged_run(every_checkpoint("checkpoint.json", garbage_file)), *MORE], "checkpoint.json", (NEXT,)),
    Case("train-resume-wrong-type-config", lambda i: ["train", "--resume", i.damaged_run(in_run("config.toml", lr_fast)), *MORE], "train.lr", (NEXT,)),
    # --- sample
    Case("sample-run-is-file", lambda i: ["sample", i.f("a_file"), "-p", "Once"], "a_file"),
    Case("sample-truncated-weights", lambda i: ["sample", i.damaged_run(every_checkpoint("model.safetensors", truncate_file)), "-p", "Once"], "model.safetensors"),
    Case("sample-missing-tokenizer", lambda i: ["sample", i.damaged_run(in_run("tokenizer.json", os.remove)), "-p", "Once"], "tokenizer.json"),
    Case("sample-tokenizer-does-not-match", lambda i: ["sample", i.damaged_run(in_run("tokenizer.json", i.replace_with("other_tokenizer.json"))),
                                                       "-p", "Once", "-n", "50", "-t", "2"], "tokenizer.json"),
    Case("sample-prompt-file-non-utf8", lambda i: ["sample", str(i.run), "--prompt-file", i.f("latin1.txt")], "latin1.txt"),
    Case("sample-negative-max-new-tokens", lambda i: ["sample", str(i.run), "-p", "Once", "-n", "-5"], "max_new_tokens"),
    # --- eval
    Case("eval-garbage-weights", lambda i: ["eval", i.damaged_run(every_checkpoint("model.safetensors", garbage_file)), NO_SAMPLES], "model.safetensors", EVAL_OUT),
    Case("eval-missing-data", lambda i: ["eval", i.damaged_run(), "--data", "missing.txt", NO_SAMPLES], "missing.txt", EVAL_OUT),
    Case("eval-malformed-hellaswag", lambda i: ["eval", i.damaged_run(), "--hellaswag", i.f("malformed_hellaswag.jsonl"), NO_SAMPLES], "malformed_hellaswag.jsonl", EVAL_OUT),
    Case("eval-empty-hellaswag", lambda i: ["eval", i.damaged_run(), "--hellaswag", i.f("empty.jsonl"), NO_SAMPLES], "empty.jsonl", EVAL_OUT),
    # --- compare, plot
    Case("sample-garbage-best-pointer", lambda i: ["sample", i.damaged_run(in_run("checkpoints/best.json", garbage_file)), "-p", "Once"], "best.json"),
    Case("compare-binary-metrics", lambda i: ["compare", i.damaged_run(in_run("metrics.csv", lambda p: p.write_bytes(PNG))), "--out", "out"], "metrics.csv", ("out",)),
    Case("compare-out-is-file", lambda i: ["compare", str(i.run), "--out", i.f("a_file")], "a_file"),
    Case("plot-missing-metrics", lambda i: ["plot", i.damaged_run(in_run("metrics.csv", os.remove))], "metrics.csv", ("run/plot.png",)),
    Case("plot-out-is-folder", lambda i: ["plot", str(i.run), "--out", i.f("a_folder")], "a_folder"),
    # --- export, import
    Case("export-hf-truncated-weights", lambda i: ["export", i.damaged_run(every_checkpoint("model.safetensors", truncate_file)), "--to", "hf", "out"], "model.safetensors", ("out",)),
    Case("export-gguf-missing-tokenizer", lambda i: ["export", i.damaged_run(in_run("tokenizer.json", os.remove)), "--gguf", "out.gguf"], "tokenizer.json", ("out.gguf",)),
    Case("export-hf-tokenizer-of-other-text", lambda i: ["export", i.damaged_run(in_run("tokenizer.json", i.replace_with("same_size_tokenizer.json"))),
                                                         "--to", "hf", "out"], "tokenizer.json", ("out",)),
    Case("export-hf-out-is-file", lambda i: ["export", str(i.run), "--to", "hf", i.f("a_file")], "a_file"),
    Case("import-hf-corrupt-config", lambda i: ["import", "hf", i.f("hf_bad_config"), "--run", "r"], "config.json", ("r",)),
    Case("import-hf-truncated-weights", lambda i: ["import", "hf", i.f("hf_truncated"), "--run", "r"], "hf_truncated", ("r",)),
    # --- distill
    Case("distill-missing-prompts", lambda i: ["distill", str(i.run), "--prompts", "missing.txt", "--out", "s.jsonl"], "missing.txt", ("s.jsonl", "s.jsonl.partial")),
    Case("distill-teacher-corrupt-weights", lambda i: ["distill", i.damaged_run(every_checkpoint("model.safetensors", garbage_file)),
                                                       "--prompts", i.f("stories.txt"), "--out", "s.jsonl"], "model.safetensors", ("s.jsonl", "s.jsonl.partial")),
    # --- quickstart, run, speedrun
    Case("quickstart-missing-corpus", lambda i: ["quickstart", "--data", "missing.txt", "--out", "qs"], "missing.txt", ("qs/checkpoints",)),
    Case("quickstart-out-is-file", lambda i: ["quickstart", "--data", i.f("stories.txt"), "--out", i.f("a_file")], "a_file"),
    Case("run-recipe-wrong-type", lambda i: ["run", i.f("wrong_type.toml")], "train.lr"),
    Case("speedrun-missing-recipe", lambda i: ["speedrun", "missing.toml"], "missing.toml"),
    Case("speedrun-recipe-impossible-shape", lambda i: ["speedrun", i.f("bad_shape.toml")], "n_head"),
    # --- bench
    Case("bench-peak-negative-seconds", lambda i: ["bench", "peak", "--seconds", "-1"], "--seconds"),
    Case("bench-peak-out-is-folder", lambda i: ["bench", "peak", "--device", "cpu", "--seconds", "0.05", "--threads", "1", "--out", i.f("a_folder")], "a_folder"),
]


def test_enough_cases_across_every_command():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.id.split("-")[0] for c in CASES}
    assert commands >= {"tokenizer", "data", "model", "train", "sample", "eval", "compare", "plot", "export", "import",
                        "distill", "quickstart", "run", "speedrun", "bench"}


def visible_lines(stderr: str) -> list[str]:
    """The non-empty lines a terminal shows: what a progress bar cleared with "\\r" is gone."""
    return [shown for line in stderr.split("\n") if (shown := line.split("\r")[-1].strip())]


@pytest.fixture(scope="module")
def outcomes(request, bad, tiny_run, tiny_shards, tmp_path_factory) -> dict[str, tuple[Path, Future]]:
    """The selected cases' commands, started together (as many at a time as there are cores, at most 8); each test reads its
    own outcome: {case id: (the folder it ran in, its CompletedProcess to come)}."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "GPTLAB_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # ~300 MB each: torch
    started = {}
    for case in selected:
        here = tmp_path_factory.mktemp(case.id)
        argv = case.argv(Inputs(bad, tiny_run, tiny_shards, here))
        started[case.id] = here, pool.submit(subprocess.run, [sys.executable, "-m", "gptlab", *argv], cwd=here, env=env,
                                             capture_output=True, timeout=120)
    yield started
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(case: Case, outcomes):
    here, future = outcomes[case.id]
    done = future.result()
    stderr = done.stderr.decode("utf-8", errors="replace")  # bytes: text mode would turn a bar's "\r" into "\n"
    lines = visible_lines(stderr)
    assert done.returncode == 2, f"exit code {done.returncode}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"stderr is not one line:\n{stderr}"
    assert case.names in lines[0], f"the error does not name {case.names!r}: {lines[0]}"
    for name in case.absent:
        assert not (here / name).exists(), f"{name} was written: {lines[0]}"
    leftovers = [p.name for p in here.rglob("*.tmp")] + [p.name for p in here.rglob("*.partial")]
    assert not leftovers, f"half-written files left: {leftovers}"
