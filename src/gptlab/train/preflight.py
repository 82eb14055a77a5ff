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
    """train.init_from's checkpoint, which must have been trained with the shards' tokenizer -- or with the one
    the shards' tokenizer extends by the chat tokens (fine-tuning a base model into a chat model: the embedding
    grows for them, see runs.grow_vocab)."""
    source = runs.find_checkpoint(t.init_from, "best")
    made_with = runs.read_info(source).get("tokenizer_checksum")
    if made_with != tokenizer.checksum and not _adds_chat_tokens(source, tokenizer):
        raise GptlabError(
            f"train.init_from={t.init_from} was trained with another tokenizer than the shards in {data_dir}",
            f"prepare the new data with {runs.run_dir_of(source) / 'tokenizer.json'} (gptlab data prepare), "
            "or fine-tune it on conversations with gptlab sft",
        )
    return source


def _adds_chat_tokens(checkpoint: Path, tokenizer) -> bool:
    """Whether `tokenizer` is the checkpoint's own with the chat tokens (and template) added, exactly."""
    from gptlab.tokenizer import load_tokenizer
    from gptlab.tokenizer.chat import with_chat_tokens

    path = runs.run_dir_of(checkpoint) / "tokenizer.json"
    if not path.is_file():
        return False
    base = load_tokenizer(path)
    if base.checksum != runs.read_info(checkpoint).get("tokenizer_checksum"):
        return False  # not the tokenizer the checkpoint was trained with; load_run says so where it matters
    try:
        return with_chat_tokens(base).checksum == tokenizer.checksum
    except GptlabError:  # a tokenizer that cannot take them (SentencePiece): another tokenizer
        return False


def model_config_for(model: ModelConfig, tokenizer, init_from: Path | None) -> ModelConfig:
    from gptlab.model import check_vocab

    if init_from:  # continuing a trained model: its architecture, whatever [model] says
        model = ModelConfig.model_validate(runs.read_info(init_from)["model"])
        if model.vocab_size < tokenizer.vocab_size:  # the chat tokens added (init_from_checkpoint allowed no other)
            model = model.model_copy(update={"vocab_size": tokenizer.vocab_size})
    return check_vocab(model, tokenizer)


def check_lora(t: TrainConfig, resume: bool) -> None:
    if not (t.init_from or resume):
        raise GptlabError(f"train.lora_rank={t.lora_rank} adapts a trained model, and this run starts from random weights",
                          "set train.init_from=RUN (gptlab sft --base RUN does), or train.lora_rank=0")


def check_resumable(checkpoint: Path, model: ModelConfig, meta: dict, run_dir: Path, data_dir: Path, lora_rank: int = 0) -> None:
    info = runs.read_info(checkpoint)
    if info.get("lora_rank", 0) != lora_rank:  # a LoRA run resumes with its adapters, a full fine-tuning without
        raise GptlabError(f"checkpoint {checkpoint} was trained with train.lora_rank={info.get('lora_rank', 0)}, not {lora_rank}",
                          f"resume with --train.lora_rank={info.get('lora_rank', 0)} (the run's own setting)")
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
    """(whether there is a validation split of at least one window, its bytes per token).

    Conversations are packed whole into padded rows, so one conversation makes a batch; their validation
    loss is over the assistant's tokens (the targets), and bits per byte over the bytes of its replies."""
    from gptlab.data.conversations import is_chat_data

    window = cfg.model.context_length + 1
    splits = meta["splits"]
    train, val = splits.get("train", {}), splits.get("val", {})
    if is_chat_data(meta):
        if not train.get("targets"):
            raise GptlabError(f"the training split of {data_dir} holds no assistant tokens to learn", "add conversations")
        has_val, scored, need = bool(val.get("targets")), "targets", "one conversation with an assistant turn"
    else:
        if train.get("tokens", 0) < window:
            raise GptlabError(f"the training split of {data_dir} has {train.get('tokens', 0):,} tokens, fewer than one "
                              f"window of {window}", "lower model.context_length or add data")
        has_val, scored, need = val.get("tokens", 0) >= window, "tokens", f"{window} tokens"
    if not has_val and cfg.train.early_stop_patience:
        raise GptlabError(f"early stopping needs a validation split of at least {need}; {data_dir} has {val.get(scored, 0):,} {scored}",
                          "raise data.val_fraction (or add data.val_sources), or set train.early_stop_patience=0")
    return has_val, (val["bytes"] / val[scored] if val.get("bytes") and val.get(scored) else None)


def load_teacher(cfg: Config, tokenizer, data_dir: Path, device):
    """train.teacher's part of the loss (train/distillation.py): a trained run's model, beside the student, with
    the shards' tokenizer and a context covering the student's; or the top-k logits stored for these shards."""
    from gptlab.data.teacher_logits import is_teacher_logits
    from gptlab.train.distillation import LiveTeacher, StoredTeacher

    t = cfg.train
    if is_teacher_logits(t.teacher):  # checked against the shards by stored_teacher_logits, which reads them
        _refuse_on_policy(t)
        return StoredTeacher(t.distill_weight, t.distill_temperature, t.distill_beta)
    model, teacher_tokenizer, _ = runs.load_run(t.teacher, device=device)
    if teacher_tokenizer.checksum != tokenizer.checksum:
        raise GptlabError(f"train.teacher={t.teacher} has another tokenizer than the shards in {data_dir}",
                          "logit and on-policy distillation need one tokenizer; with another, let the teacher write "
                          "a corpus (gptlab distill) and train on that")
    if model.cfg.context_length < cfg.model.context_length:
        raise GptlabError(f"train.teacher={t.teacher} reads {model.cfg.context_length} tokens, fewer than the "
                          f"student's model.context_length={cfg.model.context_length}",
                          "train the student with a context the teacher covers")
    return LiveTeacher(model, t.distill_weight, t.distill_temperature, t.distill_beta, t.distill_on_policy,
                       t.distill_new_tokens, t.seed)


def stored_teacher_logits(t: TrainConfig, meta: dict, data_dir: Path):
    """train.teacher's stored top-k logits (data/teacher_logits.TeacherLogits), checked against the shards they
    are read beside; None when train.teacher is not such a folder (none, or a run)."""
    from gptlab.data.conversations import is_chat_data
    from gptlab.data.teacher_logits import PROGRESS_FILE, TeacherLogits, is_teacher_logits

    if not t.teacher:
        return None
    if not is_teacher_logits(t.teacher):
        if (Path(t.teacher) / PROGRESS_FILE).is_file():
            raise GptlabError(f"the teacher logits in {t.teacher} are not finished (their writing stopped)",
                              "run the same gptlab distill --logits command again: it continues where it stopped")
        return None
    _refuse_on_policy(t)
    redo = f"write them for these shards: gptlab distill TEACHER --logits {data_dir}"
    if is_chat_data(meta):
        raise GptlabError(f"stored teacher logits (train.teacher={t.teacher}) cover plain text shards, and {data_dir} "
                          "holds conversations", "give the teacher's run directory as train.teacher")
    logits = TeacherLogits(t.teacher)
    if logits.info["tokenizer_checksum"] != meta["tokenizer_checksum"]:
        raise GptlabError(f"the teacher logits in {t.teacher} were written with another tokenizer than the shards in "
                          f"{data_dir}", redo)
    if logits.info["data_fingerprint"] != data_fingerprint(meta):
        raise GptlabError(f"the teacher logits in {t.teacher} were written for other shards ({logits.info['data_dir']}) "
                          f"than the ones in {data_dir}", redo)
    return logits


def _refuse_on_policy(t: TrainConfig) -> None:
    if t.distill_on_policy:
        raise GptlabError(f"train.distill_on_policy needs the teacher itself to score the student's samples; "
                          f"{t.teacher} holds stored logits", "give the teacher's run directory as train.teacher")


def data_fingerprint(meta: dict) -> str:
    """What identifies the shards a run trains on: the tokenizer and every split's size."""
    splits = {name: {k: s.get(k) for k in ("tokens", "bytes", "documents")} for name, s in meta["splits"].items()}
    blob = json.dumps({"tokenizer": meta["tokenizer_checksum"], "splits": splits}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
