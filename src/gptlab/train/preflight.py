"""Checks before a training run starts, each a one-line error naming the setting or folder and the fix:
a fresh or resumable run directory, a run length, splits long enough for a window, a compatible teacher,
a checkpoint to start from with the shards' tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gptlab import runs
from gptlab.config import Config, ModelConfig, TrainConfig, config_to_dict
from gptlab.errors import GptlabError


def check_fresh_run_dir(run_dir: Path) -> None:
    existing = runs.checkpoint_dirs(run_dir)
    if existing:
        raise GptlabError(
            f"{run_dir} already holds a run (last checkpoint {existing[-1].name})",
            f"continue it with gptlab train --resume {run_dir}, or choose another --run",
        )


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `gptlab train --resume RUN` continues from: the last one."""
    if not run_dir.is_dir():
        raise GptlabError(f"run directory not found: {run_dir}", "check the path given to --resume")
    found = runs.checkpoint_dirs(run_dir)
    if not found:
        raise GptlabError(f"{run_dir} has no checkpoint to resume from",
                          "start it again without --resume (a checkpoint is written at every evaluation)")
    return found[-1]


def check_length(t: TrainConfig) -> None:
    if not any((t.max_steps, t.max_tokens, t.max_time)):
        raise GptlabError("the run has no length", "set train.max_steps, train.max_tokens or train.max_time")


def init_from_checkpoint(t: TrainConfig, tokenizer, data_dir: Path) -> Path:
    source = runs.find_checkpoint(t.init_from, "best")
    if runs.read_info(source).get("tokenizer_checksum") != tokenizer.checksum:
        raise GptlabError(
            f"train.init_from={t.init_from} was trained with another tokenizer than the shards in {data_dir}",
            f"prepare the new data with {runs.run_dir_of(source) / 'tokenizer.json'} (gptlab data prepare)",
        )
    return source


def model_config_for(model: ModelConfig, tokenizer, init_from: Path | None) -> ModelConfig:
    from gptlab.model import check_vocab

    if init_from:  # continuing a trained model: its architecture, whatever [model] says
        model = ModelConfig.model_validate(runs.read_info(init_from)["model"])
    return check_vocab(model, tokenizer)


def check_resumable(checkpoint: Path, model: ModelConfig, meta: dict, run_dir: Path, data_dir: Path) -> None:
    info = runs.read_info(checkpoint)
    changed = runs.model_config_diff(info["model"], config_to_dict(model))
    if changed:
        raise GptlabError(f"checkpoint {checkpoint} is another architecture: {', '.join(changed)}",
                          "resume with the run's own [model] settings, or start a new run with train.init_from")
    if info["data_fingerprint"] != data_fingerprint(meta):
        what = "tokenizer" if info["tokenizer_checksum"] != meta["tokenizer_checksum"] else "token shards"
        raise GptlabError(
            f"the data in {data_dir} changed since {run_dir} started (its {what} differ)",
            f"resume with the original data, or continue on the new data with a new run: --train.init_from={run_dir}",
        )


def check_splits(cfg: Config, meta: dict, data_dir: Path) -> tuple[bool, float | None]:
    """(whether there is a validation split of at least one window, its bytes per token)."""
    window = cfg.model.context_length + 1
    splits = meta["splits"]
    train_tokens = splits.get("train", {}).get("tokens", 0)
    if train_tokens < window:
        raise GptlabError(f"the training split of {data_dir} has {train_tokens:,} tokens, fewer than one window of {window}",
                          "lower model.context_length or add data")
    val = splits.get("val", {})
    has_val = val.get("tokens", 0) >= window
    if not has_val and cfg.train.early_stop_patience:
        raise GptlabError(f"early stopping needs a validation split of at least {window} tokens; {data_dir} has {val.get('tokens', 0):,}",
                          "raise data.val_fraction (or add data.val_sources), or set train.early_stop_patience=0")
    return has_val, (val["bytes"] / val["tokens"] if val.get("bytes") and val.get("tokens") else None)


def load_teacher(cfg: Config, tokenizer, data_dir: Path, device):
    """train.teacher's model for logit distillation: the shards' tokenizer, a context covering the student's."""
    from gptlab.train.step import Teacher

    t = cfg.train
    model, teacher_tokenizer, _ = runs.load_run(t.teacher, device=device)
    if teacher_tokenizer.checksum != tokenizer.checksum:
        raise GptlabError(f"train.teacher={t.teacher} has another tokenizer than the shards in {data_dir}",
                          "logit distillation needs one tokenizer; with another, let the teacher write a corpus "
                          "(gptlab distill) and train on that")
    if model.cfg.context_length < cfg.model.context_length:
        raise GptlabError(f"train.teacher={t.teacher} reads {model.cfg.context_length} tokens, fewer than the "
                          f"student's model.context_length={cfg.model.context_length}",
                          "train the student with a context the teacher covers")
    return Teacher(model, t.distill_weight, t.distill_temperature)


def data_fingerprint(meta: dict) -> str:
    """What identifies the shards a run trains on: the tokenizer and every split's size."""
    splits = {name: {k: s.get(k) for k in ("tokens", "bytes", "documents")} for name, s in meta["splits"].items()}
    blob = json.dumps({"tokenizer": meta["tokenizer_checksum"], "splits": splits}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
