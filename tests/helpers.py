"""Helpers shared by the tests: the tiny corpus' stories, the shared data folder, a tiny training config,
reading a run's metrics back, HellaSwag records. Fixtures live in conftest.py; plain functions and constants here."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from gptlab.config import load_config
from gptlab.runs import load_run

SHARED_DATA = Path(os.environ.get("GPTLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

TINY_STORIES = [
    "Once upon a time there was a little cat named Tom. Tom liked to play in the sun.",
    "One day, a girl named Lily found a red ball. She was very happy and ran to show her mom.",
    "The dog and the bird were friends. Every morning they sang songs by the big tree.",
    "Ben had a toy car. He drove it around the room and laughed. \"Vroom!\" said Ben.",
    "Sue wanted to bake a cake. Her dad helped her mix the flour and the eggs.",
    "A small fish swam in the blue sea. It saw a shiny shell and took it home.",
]


def tiny_config(data_dir, run_dir, *extra):
    """A 2-layer, 32-wide GPT on the tiny shards: fp32, eager, one thread, a fixed MFU peak (no measuring)."""
    return load_config(None, [
        f"--train.data_dir={str(data_dir)!r}", f"--train.run_dir={str(run_dir)!r}",
        "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.context_length=32",
        "--train.batch_size=4", "--train.max_steps=8", "--train.eval_every=4", "--train.eval_batches=2",
        "--train.log_every=1", "--train.warmup_steps=2", "--train.lr=3e-3", "--train.min_lr_ratio=0.1",
        "--train.precision=fp32", "--train.compile=false", "--train.peak_flops=1e11", "--train.threads=1", *extra,
    ])


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(run_dir, which="last"):
    model, _, _ = load_run(run_dir, which)
    return model.state_dict()


PREPROCESSED = {"idx": 0, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "label": 3,
                "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
OFFICIAL = {"ind": 4, "activity_label": "Baking cookies", "ctx_a": "A woman is in a kitchen.", "ctx_b": "she",
            "ctx": "A woman is in a kitchen. she", "split": "val", "split_type": "indomain", "label": 1, "source_id": "x",
            "endings": ["bakes  a cake [title] Then eats it.", "mixes the dough.", "sings [step] loudly.", "leaves."]}


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_copy_with(run, copy, section: str = "data", **settings):
    """A copy of the run folder `run` at `copy` whose config.toml has `settings` in `section` (by default how
    its data was prepared: data.add_bos, data.add_eos)."""
    import shutil

    from gptlab.config import save_config

    shutil.copytree(run, copy)
    cfg = load_config(copy / "config.toml")
    setattr(cfg, section, getattr(cfg, section).model_copy(update=settings))
    save_config(cfg, copy / "config.toml")
    return copy


def truncate_file(path, keep: float = 0.5) -> None:
    """Cut a file to `keep` of its length, as a crash or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage_file(path) -> None:
    """Overwrite a file with bytes no reader accepts (of the same length, at least 64)."""
    import random

    size = max(64, path.stat().st_size if path.exists() else 0)
    path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(size)))


def chat_records(n: int = 30) -> list[dict]:
    """n small conversations in the three record shapes (messages with a system turn, Alpaca, prompt/completion),
    built from TINY_STORIES: each asks for a story with a name and words that its answer holds."""
    records = []
    for i in range(n):
        story = TINY_STORIES[i % len(TINY_STORIES)]
        words = [w.strip('.,!"') for w in story.split() if len(w) > 3][:2]
        ask = f"Write a story that uses the words {', '.join(words)}. ({i})"
        shape = i % 3
        if shape == 0:
            records.append({"messages": [{"role": "system", "content": "You tell short stories."},
                                         {"role": "user", "content": ask}, {"role": "assistant", "content": story}],
                            "constraints": {"words": words}})
        elif shape == 1:
            records.append({"instruction": ask, "input": "", "output": story, "constraints": {"words": words}})
        else:
            records.append({"prompt": ask, "completion": story, "constraints": {"words": words}})
    return records
