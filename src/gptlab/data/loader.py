"""Batches of token windows, memory-mapped from a split's shards.

Every batch is a pure function of (seed, step): the loader's whole state is the
step counter, so `state_dict()` is a tiny JSON dict and a resumed run sees
exactly the batches an uninterrupted one would have seen.

Distributed training: the loader draws the *global* batch of
batch_size * world_size windows and each rank keeps its own slice, so ranks
never share a batch and a run with world_size=2, batch_size=8 sees the same
windows as one with world_size=1, batch_size=16.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import torch

from gptlab.data.meta import split_shards
from gptlab.data.shards import read_shard
from gptlab.errors import GptlabError

if TYPE_CHECKING:
    from gptlab.data.teacher_logits import TeacherLogits

STATE_VERSION = 1


def shard_slices(starts: list[int], start: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(shard, lo, hi): the slices of shards laid end to end that cover positions [start, start + length);
    `starts` holds each shard's first position, then the total (TokenSplit.starts)."""
    i = bisect_right(starts, start) - 1
    while length > 0:
        lo = start - starts[i]
        hi = min(lo + length, starts[i + 1] - starts[i])
        yield i, lo, hi
        start, length = start + hi - lo, length - (hi - lo)
        i += 1


class TokenSplit:
    """All shards of one split, read as one long array of tokens."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.name = split
        self.shards = [s for s in map(read_shard, split_shards(data_dir, split)) if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.num_tokens = self.starts[-1]

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries where needed."""
        pieces = [self.shards[i][lo:hi] for i, lo, hi in shard_slices(self.starts, start, length)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def require_window(self, seq_len: int) -> None:
        if self.num_tokens < seq_len + 1:
            raise GptlabError(
                f"split {self.name} has {self.num_tokens:,} tokens, fewer than one window of {seq_len + 1}",
                "lower model.context_length or add data",
            )

    def windows(self, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors [len(starts), seq_len]: y is x shifted by one token."""
        rows = np.empty((len(starts), seq_len + 1), dtype=np.int64)
        for row, start in zip(rows, starts):
            row[:] = self.read(int(start), seq_len + 1)
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class ResumableLoader:
    """What both loaders share: the whole state is the step counter, valid only with the same settings."""

    step: int

    def _settings(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._settings()}
        if state.get("version") != STATE_VERSION or saved != self._settings():
            changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._settings().items() if saved[k] != v)
            raise GptlabError(
                f"cannot resume the data loader: {changed or 'unknown state version'}",
                "resume with the same data and batch settings, or start a new run (train.init_from) to change them",
            )
        self.step = int(state["step"])


class BatchLoader(ResumableLoader):
    """Training batches from a prepared split.

    mode="random": each row is a window starting at a uniformly random token
        (nanoGPT's get_batch); windows may overlap and cross shard boundaries.
    mode="sequential": epochs over the consecutive windows [kT, kT+T+1) of the
        split; with shuffle=True (default) their order is a fresh permutation
        each epoch, otherwise split order (llm.c's loader). The window stream
        runs on across epochs, so a batch may straddle two epochs and no
        window is ever dropped.
    teacher_logits (data/teacher_logits.TeacherLogits): each batch also carries the stored teacher's top k at
        the positions of its windows, for logit distillation without the teacher (train.teacher).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 16,
        seq_len: int = 256,
        seed: int = 0,
        mode: Literal["random", "sequential"] = "random",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        teacher_logits: "TeacherLogits | None" = None,
    ):
        if mode not in ("random", "sequential"):
            raise GptlabError(f"unknown loader mode {mode!r}", "use 'random' or 'sequential'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = TokenSplit(data_dir, split)
        self.tokens.require_window(seq_len)
        self.batch_size, self.seq_len, self.seed, self.mode = batch_size, seq_len, seed, mode
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.teacher_logits = teacher_logits
        if teacher_logits is not None and len(teacher_logits) != len(self.tokens):
            raise GptlabError(f"{teacher_logits.folder} holds {len(teacher_logits):,} rows for a train split of "
                              f"{len(self.tokens):,} tokens", "write the logits again for these shards (gptlab distill --logits)")
        self.num_windows = (len(self.tokens) - 1) // seq_len  # sequential mode's windows per epoch
        self.step = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """How many times the split's tokens have been drawn, summed over all ranks."""
        return self.step * self.batch_size * self.world_size * self.seq_len / len(self.tokens)

    def next_batch(self) -> tuple:
        """(x, y), or (x, y, (ids, log-probabilities)) with stored teacher logits: the teacher's top k at every
        position of x, [B, T, k] each."""
        starts = self._random_starts() if self.mode == "random" else self._sequential_starts()
        self.step += 1
        x, y = self.tokens.windows(starts, self.seq_len)
        if self.teacher_logits is None:
            return x, y
        return x, y, self.teacher_logits.windows(starts, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _my_slice(self, global_batch: np.ndarray) -> np.ndarray:
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def _random_starts(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.step])
        highest = len(self.tokens) - self.seq_len  # exclusive: the window's last token must exist
        return self._my_slice(rng.integers(0, highest, size=self.batch_size * self.world_size))

    def _sequential_starts(self) -> np.ndarray:
        first = self.step * self.batch_size * self.world_size
        items = first + np.arange(self.batch_size * self.world_size)
        epochs, positions = np.divmod(self._my_slice(items), self.num_windows)
        windows = [self._epoch_order(int(e))[p] for e, p in zip(epochs, positions)]
        return np.asarray(windows, dtype=np.int64) * self.seq_len

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        if epoch not in self._orders:
            if len(self._orders) > 4:  # a batch spans at most a few epochs; keep memory flat
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_windows)
        return self._orders[epoch]

    # ------------------------------------------------------------------ resume

    def _settings(self) -> dict:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "split_tokens": len(self.tokens),
        }


def training_loader(data_dir: str | os.PathLike, **settings) -> "BatchLoader":
    """The loader for a prepared folder: BatchLoader for text, ConversationLoader (packed whole conversations,
    targets only on what the assistant says) for conversations; both take BatchLoader's settings."""
    from gptlab.data.conversations import ConversationLoader, is_chat_data
    from gptlab.data.meta import load_meta

    return (ConversationLoader if is_chat_data(load_meta(data_dir)) else BatchLoader)(data_dir, **settings)


def iter_eval_batches(
    data_dir: str | os.PathLike,
    split: str = "val",
    batch_size: int = 16,
    seq_len: int = 256,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over the whole split, in order.

    Window k covers tokens [kT, kT+T+1), so every token after the first is a
    target exactly once; the tail of fewer than T tokens is not scored. The
    last batch may have fewer rows. With world_size > 1, rank r takes batches
    r, r + world_size, ... so the ranks together cover the split once.
    Conversations are packed whole into rows, in order; their targets are the assistant's tokens.
    """
    from gptlab.data.conversations import is_chat_data, iter_conversation_batches
    from gptlab.data.meta import META_FILE, load_meta

    if (Path(data_dir) / META_FILE).exists() and is_chat_data(load_meta(data_dir)):
        yield from iter_conversation_batches(data_dir, split, batch_size, seq_len, max_batches, rank, world_size)
        return
    tokens = TokenSplit(data_dir, split)
    tokens.require_window(seq_len)
    starts = np.arange((len(tokens) - 1) // seq_len, dtype=np.int64) * seq_len
    batches = range(0, len(starts), batch_size)
    if max_batches is not None:
        batches = batches[: max_batches * world_size]
    for i in batches[rank::world_size]:
        yield tokens.windows(starts[i : i + batch_size], seq_len)
