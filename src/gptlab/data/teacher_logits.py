"""A teacher's top-k next-token log-probabilities stored beside prepared shards (`gptlab distill --logits`), so
that logit distillation trains without the teacher in memory (train.teacher = this folder).

The folder (default DATA_DIR/teacher_logits):

    teacher_logits.json     what was stored and for what: {version, teacher, checkpoint, k, vocab_size,
                            tokenizer_checksum, data_dir, data_fingerprint (of the shards' meta.json), context,
                            stride, dtype, shards: [{file, tokens, ids, logp}], positions, bytes, seconds}.
                            Written last: without it the folder is not stored logits (an interrupted write).
    <shard>.ids.npy         [n, k] the teacher's k most likely next tokens at each of the train shard's n
                            positions, most likely first (uint16 for a vocabulary of at most 65,536, else uint32)
    <shard>.logp.npy        [n, k] float16: their log-probabilities under the teacher's full softmax

Row i of the train split (its shards read as one array, as TokenSplit reads them) is the teacher's prediction
of token i + 1 given the tokens before it: a shard's last row predicts the next shard's first token, so a
training window that crosses a shard boundary finds every row it needs. The teacher read the split in
overlapping windows of its context, so each prediction saw at least half a context of tokens (see
gptlab.distill.logits).

The size: k ids and k float16 log-probabilities a token. With k = 16 that is 64 bytes a token (vocabulary of
at most 65,536) against 16 KiB for the full float32 distribution over a 4,096-token vocabulary (256x smaller),
or 196 KiB over GPT-2's 50,257 (3,100x smaller): 1M training tokens take 64 MB. The loss reads the top k and
one "everything else" bucket (train/distillation.top_k_buckets).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gptlab.data.loader import shard_slices
from gptlab.errors import GptlabError

INFO_FILE = "teacher_logits.json"
PROGRESS_FILE = ".progress.json"  # while writing: how far the teacher got (gptlab.distill.logits)
VERSION = 1
DEFAULT_FOLDER = "teacher_logits"  # inside the data folder


def is_teacher_logits(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder of stored teacher logits (not a run directory)."""
    return path is not None and (Path(path) / INFO_FILE).is_file()


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def array_files(shard_file: str) -> tuple[str, str]:
    """The (ids, log-probabilities) file names of a shard's rows."""
    stem = Path(shard_file).name.removesuffix(".bin")
    return f"{stem}.ids.npy", f"{stem}.logp.npy"


def read_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{folder} holds no stored teacher logits (no {INFO_FILE})",
                          "write them with gptlab distill TEACHER --logits DATA_DIR") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path} is corrupt ({type(e).__name__})", "write the logits again with gptlab distill --logits") from None
    if not isinstance(info, dict) or info.get("version") != VERSION:
        raise GptlabError(f"{path} is not version {VERSION} of the stored-logits format",
                          "write the logits again with this gptlab: gptlab distill TEACHER --logits DATA_DIR")
    return info


class TeacherLogits:
    """The stored rows of a train split, memory-mapped: `read(start, length)` mirrors TokenSplit.read, and
    `windows(starts, seq_len)` gives the rows of exactly the positions of TokenSplit.windows' x."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.info = read_info(self.folder)
        self.k = int(self.info["k"])
        self.ids, self.logp = [], []
        for shard in self.info["shards"]:
            for name, arrays, dtype in ((shard["ids"], self.ids, ids_dtype(self.info["vocab_size"])),
                                        (shard["logp"], self.logp, np.dtype(np.float16))):
                arrays.append(self._open(name, (shard["tokens"], self.k), dtype))
        self.starts = np.cumsum([0] + [s["tokens"] for s in self.info["shards"]]).tolist()
        self.num_tokens = self.starts[-1]

    def _open(self, name: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:  # missing, truncated, not an .npy
            raise GptlabError(f"{path} is missing or damaged ({type(e).__name__})",
                              "write the logits again with gptlab distill --logits") from None
        if array.shape != shape or array.dtype != dtype:
            raise GptlabError(f"{path} holds {array.dtype} {list(array.shape)}, {INFO_FILE} says {dtype} {list(shape)}",
                              "write the logits again with gptlab distill --logits")
        return array

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probabilities) [length, k] of positions [start, start + length), across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"rows {start}..{start + length} outside the {self.num_tokens} stored")
        ids, logp = [], []
        for i, lo, hi in shard_slices(self.starts, start, length):
            ids.append(self.ids[i][lo:hi])
            logp.append(self.logp[i][lo:hi])
        return (ids[0], logp[0]) if len(ids) == 1 else (np.concatenate(ids), np.concatenate(logp))

    def windows(self, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64, log-probabilities float32) [len(starts), seq_len, k]: the teacher's prediction of each y of
        TokenSplit.windows(starts, seq_len)."""
        ids = np.empty((len(starts), seq_len, self.k), dtype=np.int64)
        logp = np.empty((len(starts), seq_len, self.k), dtype=np.float32)
        for row, start in enumerate(starts):
            ids[row], logp[row] = self.read(int(start), seq_len)
        return torch.from_numpy(ids), torch.from_numpy(logp)
