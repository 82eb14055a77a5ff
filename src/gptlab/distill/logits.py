"""A teacher's top-k next-token log-probabilities over a prepared train split, stored beside the shards
(`gptlab distill TEACHER --logits DATA_DIR`; the format: gptlab.data.teacher_logits), so that logit distillation
trains without the teacher in memory: `gptlab train --train.teacher=DATA_DIR/teacher_logits`.

The teacher reads the split (its shards as one array, as the training loader reads them) in windows of its
context C, overlapping by C - S (S, the stride: C/2 by default). A window keeps only the predictions no earlier
window made -- the first keeps all, the others their last S -- so every prediction after the first window saw at
least C - S + 1 tokens, not the one token a position at the start of a non-overlapping window sees. The cost is
C/S forward passes per token (2x by default).

Writing is resumable and never half-visible: the arrays are memory-mapped .npy files written in place, with a
progress file saved (after a flush) every 30 seconds; running the same command again continues from it, and
teacher_logits.json, which makes the folder usable, is written last.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from gptlab import runs
from gptlab.data.conversations import is_chat_data
from gptlab.data.loader import TokenSplit, shard_slices
from gptlab.data.meta import load_meta, split_shards
from gptlab.data.shards import read_header
from gptlab.data.teacher_logits import (
    DEFAULT_FOLDER,
    INFO_FILE,
    PROGRESS_FILE,
    VERSION,
    array_files,
    ids_dtype,
    is_teacher_logits,
)
from gptlab.device import autocast, pick_device, pick_precision
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json, fsync_dir, fsync_file, make_dirs
from gptlab.text.sources import HF_PREFIX

SAVE_EVERY_S = 30.0
ONE_TOKENIZER = "logit distillation needs one tokenizer; sequence-level distillation (gptlab distill --prompts) works across tokenizers"


def teacher_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first kept offset) of each window the teacher reads: together they keep every position
    of [0, num_tokens) once; the last window is moved back to end at the split's end (a full context)."""
    if num_tokens <= context:
        return [(0, num_tokens, 0)]
    windows, done, start = [], 0, 0
    while done < num_tokens:
        start = min(start, num_tokens - context)
        windows.append((start, context, done - start))
        done = start + context
        start += stride
    return windows


def write_teacher_logits(teacher: str, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, top_k: int = 16,
                         batch_size: int = 8, device: str = "cpu", precision: str = "auto", stride: int | None = None,
                         verbose: bool = True) -> dict:
    """Store `teacher`'s (a gptlab run with the shards' tokenizer) top_k log-probabilities at every position of
    `data_dir`'s train split in `out` (default DATA_DIR/teacher_logits). Returns what was written:
    {out, teacher, positions, k, bytes, seconds, resumed_at (positions done before this call)}."""
    started = time.monotonic()
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if is_chat_data(meta):
        raise GptlabError(f"{data_dir} holds conversations; stored teacher logits cover plain text shards",
                          "distil a chat model with the teacher in memory: gptlab sft --teacher RUN")
    out = Path(out) if out else data_dir / DEFAULT_FOLDER
    if is_teacher_logits(out):
        raise GptlabError(f"{out} already holds teacher logits", "delete the folder to write them again, or give --logits-out DIR")
    if top_k < 1:
        raise GptlabError(f"--top-k {top_k} keeps no log-probabilities", "give --top-k 1 or more (16 is plenty)")
    checkpoint = _teacher_checkpoint(teacher)
    device = _device(device)
    model, tokenizer, _ = runs.load_run(checkpoint, device=device)
    if tokenizer.checksum != meta["tokenizer_checksum"]:
        raise GptlabError(f"the teacher {teacher} has another tokenizer than the shards in {data_dir}", ONE_TOKENIZER)

    from gptlab.train.preflight import data_fingerprint

    tokens = TokenSplit(data_dir, "train")
    shards = [(p.name, n) for p in split_shards(data_dir, "train") if (n := read_header(p)[1])]  # TokenSplit's shards
    if len(tokens) < 2:
        raise GptlabError(f"the train split of {data_dir} has {len(tokens)} tokens, nothing to predict", "add data")
    vocab, k = model.cfg.vocab_size, min(top_k, model.cfg.vocab_size)
    context = min(model.cfg.context_length, len(tokens))
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise ValueError(f"stride {stride} outside 1..{context}")
    plan = teacher_windows(len(tokens), context, stride)
    dtype = ids_dtype(vocab)
    info = {"version": VERSION, "teacher": str(teacher), "checkpoint": str(checkpoint.resolve()), "k": k,
            "vocab_size": vocab, "tokenizer_checksum": tokenizer.checksum, "data_dir": str(data_dir.resolve()),
            "data_fingerprint": data_fingerprint(meta), "context": context, "stride": stride,
            "dtype": {"ids": dtype.name, "logp": "float16"},
            "shards": [dict(zip(("file", "tokens", "ids", "logp"), (name, n, *array_files(name)))) for name, n in shards]}

    # Continue an interrupted write of the same thing, or start afresh.
    make_dirs(out)
    progress = _read_progress(out / PROGRESS_FILE)
    resume = progress.get("info") == info and all((out / s[part]).is_file() for s in info["shards"] for part in ("ids", "logp"))
    done_windows, seconds_before = (progress["windows"], progress["seconds"]) if resume else (0, 0.0)
    mode = "r+" if resume else "w+"
    ids_arrays = [open_memmap(out / s["ids"], mode, dtype, (s["tokens"], k)) for s in info["shards"]]
    logp_arrays = [open_memmap(out / s["logp"], mode, np.float16, (s["tokens"], k)) for s in info["shards"]]
    starts = np.cumsum([0] + [n for _, n in shards]).tolist()

    def save_progress(windows: int) -> None:
        for array in (*ids_arrays, *logp_arrays):
            array.flush()
        atomic_write_json(out / PROGRESS_FILE, {"info": info, "windows": windows,
                                                "seconds": seconds_before + time.monotonic() - started})

    if not resume:
        save_progress(0)
    resumed_at = sum(length - keep for _, length, keep in plan[:done_windows])
    precision = pick_precision(precision, device)
    bar = tqdm(total=len(tokens), initial=resumed_at, unit="tok", desc="teacher logits", disable=not verbose)
    last_save = time.monotonic()
    for first in range(done_windows, len(plan), batch_size):
        batch = plan[first : first + batch_size]
        x = torch.from_numpy(np.stack([tokens.read(start, length) for start, length, _ in batch]).astype(np.int64))
        with torch.no_grad(), autocast(device, precision):
            logits, _ = model(x.to(device))
        with torch.no_grad():
            for (start, length, keep), row in zip(batch, logits):
                row = row[keep:].float()  # [kept, V]
                top, ids = row.topk(k, dim=-1)
                logp = top - row.logsumexp(-1, keepdim=True)  # the top k of log_softmax, without a [kept, V] copy
                logp = logp.clamp(min=torch.finfo(torch.float16).min)  # float16 keeps it finite: -inf would make a NaN loss
                _put(ids_arrays, starts, start + keep, ids.cpu().numpy())
                _put(logp_arrays, starts, start + keep, logp.cpu().numpy())
                bar.update(length - keep)
        if time.monotonic() - last_save > SAVE_EVERY_S:
            save_progress(first + len(batch))
            last_save = time.monotonic()
    bar.close()

    save_progress(len(plan))
    files = [out / s[part] for s in info["shards"] for part in ("ids", "logp")]
    for path in files:
        fsync_file(path)
    written = sum(path.stat().st_size for path in files)
    seconds = seconds_before + time.monotonic() - started
    atomic_write_json(out / INFO_FILE, {**info, "positions": len(tokens), "bytes": written, "seconds": round(seconds, 2)})
    (out / PROGRESS_FILE).unlink()
    fsync_dir(out)
    return {"out": str(out), "teacher": str(teacher), "positions": len(tokens), "k": k, "bytes": written,
            "seconds": seconds, "resumed_at": resumed_at}


def _teacher_checkpoint(teacher: str) -> Path:
    """The teacher's checkpoint: a gptlab run's (its best), never a Hugging Face model's (another tokenizer)."""
    path = Path(teacher)
    hugging_face = str(teacher).startswith(HF_PREFIX) or ((path / "config.json").is_file() and not (path / runs.CONFIG).is_file())
    if hugging_face:
        raise GptlabError(f"--logits needs a gptlab run trained on these shards' tokenizer as the teacher; {teacher} is a "
                          "Hugging Face model", ONE_TOKENIZER)
    return runs.find_checkpoint(teacher, "best")


def _device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:1, mps: available here, or one line."""
    if name == "auto":
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptlabError(f"unknown device {name!r}", "use --device cpu, cuda, cuda:1 or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise GptlabError(f"--device {name} is not available on this machine", "use --device cpu")
    return device


def _read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):  # none, or damaged: start afresh
        return {}


def _put(arrays: list[np.ndarray], starts: list[int], start: int, rows: np.ndarray) -> None:
    """Write rows at positions [start, start + len(rows)) of the split, across shard boundaries."""
    n = 0
    for i, lo, hi in shard_slices(starts, start, len(rows)):
        arrays[i][lo:hi] = rows[n : n + hi - lo]
        n += hi - lo
