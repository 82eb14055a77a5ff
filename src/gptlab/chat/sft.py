"""Supervised fine-tuning: a base run and conversations -> a chat run (`gptlab sft`).

    finetune("runs/stories", "chat.jsonl", "runs/stories-chat", epochs=3)

does, in order:
  1. the base run's tokenizer with the chat tokens added (tokenizer/chat.py; the run's own where it has them),
     or the one-line error of a tokenizer that cannot take them (SentencePiece trained without them);
  2. the conversations rendered with it into RUN/data (data/conversations.py: a loss mask on the assistant's
     tokens, held-out conversations for validation), so the run directory holds everything it was made from;
  3. `gptlab train` from the base's weights (train.init_from; the embedding grows by the chat tokens' rows,
     each the mean of the trained ones: runs.grow_vocab), so resuming, checkpoints, metrics and plots,
     samples, several processes (train.nproc) and logit distillation (train.teacher) work as for any run.

Settings, lowest first: the schema's defaults; the "sft" profile (config.PROFILES: AdamW, lr 3e-3, a short
warm-up, a linear decay to 5% of the peak, no weight decay, the whole validation split at every
evaluation); the base run's machine and batch settings (device, precision, batch size...); a config file;
the overrides. The length is `epochs` passes over the training conversations packed into rows
(DEFAULT_EPOCHS unless train.max_steps/max_tokens/max_time is set), and where they are not set, the
warm-up is WARMUP_FRACTION of the steps and there are about EVALUATIONS evaluations (each a checkpoint).

The learning rate and warm-up, measured (benchmarks/sft_defaults.py: a 4 x 128 base, 1.05M parameters,
pretrained on the TinyStories head for 4 or 12 minutes on one CPU thread; 1,123 instructions made from
other stories, "Write a short story that uses the words A, B and C." -> the story; 2 epochs, 127 steps of
16 rows; held-out assistant-token loss, lower is better):

    base pretrained     base   3e-4    1e-3    3e-3    6e-3    1e-2     (warm-up 5% of the steps)
    4 min              3.145  2.884   2.759   2.671   2.657   2.696
    4 min, no warm-up         2.881   2.755   2.678   2.683   2.766
    12 min             2.676  2.363   2.267   2.214

A rate well below pretraining's, as fine-tuning large models goes, is the worst of these: bases this
small and this briefly trained still learn the stories themselves, and the better-trained base narrows
the gap (1e-3 vs 3e-3: 0.088 at 4 minutes, 0.052 at 12). 3e-3 is the best measured at both, 6e-3 not
clearly better and worse without a warm-up; the warm-up costs 0.003-0.004 at 1e-3 and below and saves
0.007, 0.027 and 0.071 at 3e-3, 6e-3 and 1e-2. A larger or long-trained base (an imported GPT-2) wants
--train.lr=1e-4 or less.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from gptlab import runs
from gptlab.config import Config, ModelConfig, Override, config_to_dict, load_config, read_override
from gptlab.errors import GptlabError

DEFAULT_EPOCHS = 3
WARMUP_FRACTION = 0.05
EVALUATIONS = 10
# The base run's [train] settings a fine-tuning run keeps: the machine and the batch, not the schedule.
KEPT_TRAIN_KEYS = ("device", "precision", "compile", "threads", "peak_flops", "log", "batch_size", "grad_accum",
                   "seed", "keep_last", "grad_clip", "distributed", "dist_timeout")
LENGTH_KEYS = ("max_steps", "max_tokens", "max_time")


def finetune(base: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
             run_dir: str | os.PathLike | None = None, *, val_data: str | os.PathLike | Sequence | None = None,
             overrides: Sequence[Override] = (), epochs: float | None = None, config: str | os.PathLike | None = None,
             verbose: bool = True) -> dict:
    """Fine-tune the base run `base` (a run directory: its best checkpoint; or a checkpoint folder) on the
    conversations in `data` (JSON-lines/JSON/Parquet files in any shape text/conversations.py reads, or a
    folder they were prepared into) into `run_dir` (default runs/BASE-sft); returns the training summary
    (summary.json) with "data_dir", "epochs" and "rows_per_epoch" added.

    `val_data`: held-out conversations (default: data.val_fraction of `data`'s, by conversation).
    `overrides`: --section.key=value strings or (key, value) pairs, e.g. ("train.lr", 1e-4).
    `epochs`: passes over the training conversations (default DEFAULT_EPOCHS, unless the overrides set
    train.max_steps, max_tokens or max_time). `config`: a TOML file laid under the overrides.
    """
    from gptlab.train import train

    cfg, plan = sft_config(base, data, run_dir, val_data=val_data, overrides=overrides, epochs=epochs, config=config,
                           verbose=verbose)
    summary = train(cfg, verbose=verbose)
    return {**summary, **plan}


def resume(run_dir: str | os.PathLike, overrides: Sequence[Override] = (), verbose: bool = True) -> dict:
    """Continue a fine-tuning run from its last checkpoint, exactly (as `gptlab train --resume` does)."""
    from gptlab.train import resume_config, train

    return train(resume_config(run_dir, list(overrides)), resume=True, verbose=verbose)


def sft_config(base, data, run_dir=None, *, val_data=None, overrides: Sequence[Override] = (), epochs: float | None = None,
               config=None, verbose: bool = False) -> tuple[Config, dict]:
    """The fine-tuning run's config, with its data prepared (finetune without the training): (config, plan)."""
    from gptlab.data import prepare_data
    from gptlab.tokenizer import load_tokenizer
    from gptlab.tokenizer.chat import with_chat_tokens

    checkpoint = _base_checkpoint(base)
    base_run = runs.run_dir_of(checkpoint)
    base_cfg = runs.load_run_config(base_run)
    tokenizer = with_chat_tokens(load_tokenizer(base_run / "tokenizer.json"))  # SentencePiece: its one-line error
    context = ModelConfig.model_validate(runs.read_info(checkpoint)["model"]).context_length
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    val_data = [] if val_data is None else [val_data] if isinstance(val_data, (str, os.PathLike)) else list(val_data)
    prepared = _prepared_folder(data, val_data, tokenizer, base)
    overrides = [("profile", "sft"), *overrides]
    keys = _keys_set(config, overrides)

    def resolve(run: str) -> Config:
        sections = _sections(base_cfg, str(base), run, data, val_data, prepared)
        return load_config(config, overrides, base=sections)

    default_run = str(run_dir) if run_dir is not None else os.path.join("runs", f"{base_run.name}-sft")
    cfg = resolve(default_run)
    if cfg.train.run_dir != default_run:  # set by an override: the data goes inside that run
        cfg = resolve(cfg.train.run_dir)
    run = Path(cfg.train.run_dir)
    if runs.checkpoint_dirs(run):
        raise GptlabError(f"{run} already holds a run (last checkpoint {runs.checkpoint_dirs(run)[-1].name})",
                          f"continue it with gptlab sft --resume {run}, or choose another --run-dir")
    if epochs is not None and not epochs > 0:
        raise GptlabError(f"--epochs={epochs} is not a positive number", "give the passes over the conversations, e.g. --epochs 3")
    if epochs is not None and any(getattr(cfg.train, k) for k in LENGTH_KEYS):
        raise GptlabError(f"--epochs={epochs:g} and train.{next(k for k in LENGTH_KEYS if getattr(cfg.train, k))} both "
                          "set the run's length", "give one of them")

    fresh = not run.exists()
    try:
        if prepared is None:
            cfg.train.data_dir = cfg.data.out_dir
            tokenizer_path = Path(cfg.data.out_dir) / "tokenizer.json"
            tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tokenizer_path)
            prepare_data(cfg, tokenizer_path, progress=verbose)
        data_dir = Path(cfg.train.data_dir)
        rows = _rows_per_epoch(data_dir, cfg.train.seed, context)
    except BaseException:
        if fresh:  # bad conversations: leave no half-made run behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    if not any(getattr(cfg.train, k) for k in LENGTH_KEYS):
        epochs = DEFAULT_EPOCHS if epochs is None else epochs
        cfg.train.max_steps = max(1, math.ceil(epochs * rows / rows_per_step))
    steps = cfg.train.max_steps or None
    if steps and "train.warmup_steps" not in keys:
        cfg.train.warmup_steps = math.ceil(WARMUP_FRACTION * steps)
    if steps and "train.eval_every" not in keys:
        cfg.train.eval_every = max(1, math.ceil(steps / EVALUATIONS))
    plan = {"data_dir": str(data_dir), "rows_per_epoch": rows,
            "epochs": round(steps * rows_per_step / rows, 3) if steps else None}
    return cfg, plan


def _base_checkpoint(base) -> Path:
    if base is None or not Path(base).exists():
        raise GptlabError(f"the base run {base} does not exist", "give --base a run directory that gptlab train wrote "
                          "(or a checkpoint folder in it)")
    return runs.find_checkpoint(base, "best")


def _prepared_folder(data: list, val_data: list, tokenizer, base) -> Path | None:
    """`data` when it is one folder of prepared conversations (made with `tokenizer`), else None (files to prepare)."""
    from gptlab.data.conversations import is_chat_data
    from gptlab.data.meta import META_FILE

    if not data:
        raise GptlabError("no conversations given", "pass --data CONVERSATIONS.jsonl")
    folder = Path(data[0])
    if not (folder / META_FILE).is_file():
        return None
    if len(data) > 1 or val_data:
        raise GptlabError(f"{folder} is a prepared data folder; it cannot be mixed with more files",
                          "give either one prepared folder or conversation files (--data, --val-data)")
    meta = _meta(folder)
    if not is_chat_data(meta):
        raise GptlabError(f"{folder} holds prepared text, not conversations", "give the conversation files (.jsonl) instead")
    if meta["tokenizer_checksum"] != tokenizer.checksum:
        raise GptlabError(f"the conversations in {folder} were prepared with another tokenizer than {base}'s with the "
                          "chat tokens", "give the conversation files instead: gptlab sft prepares them with the base's tokenizer")
    return folder


def _meta(data_dir: Path) -> dict:
    from gptlab.data import load_meta

    return load_meta(data_dir)


def _sections(base_cfg: Config, base: str, run: str, data: list, val_data: list, prepared: Path | None) -> dict:
    """The config sections laid under a config file and the overrides: the base run's text normalisation,
    tokenizer and sampling settings and its machine, this run's data and paths."""
    train = {k: v for k, v in config_to_dict(base_cfg.train).items() if k in KEPT_TRAIN_KEYS}
    train.update(run_dir=run, init_from=base, data_dir=str(prepared or Path(run) / "data"))
    sections = {name: config_to_dict(getattr(base_cfg, name)) for name in ("text", "tokenizer", "sample")}
    sections["train"] = train
    if prepared is None:
        sections["data"] = {"sources": [{"path": str(p), "kind": "chat"} for p in data],
                            "val_sources": [{"path": str(p), "kind": "chat"} for p in val_data],
                            "out_dir": str(Path(run) / "data"), "seed": base_cfg.data.seed, "workers": 1,
                            "add_bos": False, "add_eos": False}  # conversations carry their own role and end tokens
    return sections


def _keys_set(config, overrides: Sequence[Override]) -> set[str]:
    """Dotted keys the user set, in the config file or the overrides."""
    import tomllib

    keys = {".".join(read_override(o)[0]) for o in overrides}
    if config is not None and Path(config).is_file():
        try:
            raw = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            raw = {}  # load_config names the problem
        keys |= {f"{s}.{k}" for s, table in raw.items() if isinstance(table, dict) for k in table}
    return keys


def _rows_per_epoch(data_dir: Path, seed: int, context: int) -> int:
    """Rows of context + 1 tokens the training conversations pack into (a conversation too long for one is
    an error naming it, here before any training)."""
    from gptlab.data.conversations import ConversationLoader

    return ConversationLoader(data_dir, "train", batch_size=1, seq_len=context, seed=seed).rows_per_epoch()
