"""Conversations -> token shards with a loss mask, and batches of whole conversations packed into rows.

`gptlab data prepare` takes this path when the sources are conversations (text/conversations.py).
A prepared folder of conversations holds, besides the usual files (meta.json says "kind": "chat"):

    train_000000.bin, val_000000.bin   the rendered conversations back to back (tokenizer/chat.py), one shard a split
    train.chat.npz, val.chat.npz       mask: 1 on every token the model learns to write (uint8, one per token);
                                       starts: where each conversation begins (and the end); where: its file:line

Instruction sets are small (a million conversations is a few hundred MB of tokens), so a split is
rendered in memory and written at once, atomically; meta.json last, as for text.

Validation is held out by conversation, never by turn: the conversations whose keyed hash is lowest,
val_fraction of them (at least one where there are two or more), so the same conversation always
lands in the same split.

Batches (ConversationLoader): each epoch shuffles the conversations and packs them, whole, into
rows of context_length + 1 tokens (first fit in that order; the rest of a row is padding that is
never a target), as nanochat's SFT does. Targets outside the mask are -1, which the loss ignores.
A conversation longer than a row cannot be packed: a one-line error names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import gptlab
from gptlab.config import Config
from gptlab.data.loader import ResumableLoader, TokenSplit
from gptlab.data.meta import META_FILE
from gptlab.data.shards import make_header, token_dtype, write_shard
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_bytes, atomic_write_json, check_folder_path, make_dirs
from gptlab.text import Normalizer, source_label
from gptlab.text.conversations import Conversation, iter_conversations
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import ChatFormat

SPLITS = ("train", "val")
KIND = "chat"


def chat_file(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"{split}.{KIND}.npz"


def is_chat_data(meta: dict) -> bool:
    return meta.get("kind") == KIND


# --------------------------------------------------------------------------- prepare


def prepare_conversations(cfg: Config, tokenizer_path: Path, fingerprint: str, progress: bool = False) -> dict:
    """Render cfg.data.sources (conversations) with the tokenizer's chat format into cfg.data.out_dir; meta.json's content."""
    data, out_dir = cfg.data, Path(cfg.data.out_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    chat = ChatFormat.of(tokenizer, f"the tokenizer {tokenizer_path}")
    check_folder_path(out_dir)
    normalize = Normalizer(cfg.text)
    sources = data.sources + data.val_sources
    read = [list(_normalized(iter_conversations(s), normalize, i)) for i, s in enumerate(sources)]
    train = [c for i, s in enumerate(data.sources) for c in read[i] for _ in range(s.weight)]
    val = [c for conversations in read[len(data.sources):] for c in conversations]
    if not data.val_sources:
        train, val = split_by_conversation(train, data.val_fraction, data.seed)
        if data.val_fraction and not val:
            raise GptlabError(f"one conversation is too few to hold {data.val_fraction:.0%} out for validation",
                              "add conversations, name a validation file with --val-data, or pass --data.val_fraction=0")
    make_dirs(out_dir)
    (out_dir / META_FILE).unlink(missing_ok=True)  # the folder is not usable until meta.json is written again
    dtype = token_dtype(tokenizer.vocab_size)
    splits, per_source = {}, [{split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS} for _ in sources]
    for split, conversations in (("train", train), ("val", val)):
        splits[split] = _write_split(out_dir, split, conversations, chat, dtype, per_source)
        if progress:
            print(f"{split}: {splits[split]['documents']:,} conversations, {splits[split]['tokens']:,} tokens, "
                  f"{splits[split]['targets']:,} of them assistant tokens to learn")
    copy = out_dir / "tokenizer.json"
    if copy.resolve() != Path(tokenizer_path).resolve():
        atomic_write_bytes(copy, Path(tokenizer_path).read_bytes())
    from gptlab.config import save_config

    save_config(cfg, out_dir / "config.toml")
    magic, version = (int(v) for v in make_header(dtype, 0)[:2])
    meta = {
        "format": "gptlab-shards", "kind": KIND, "gptlab_version": gptlab.__version__, "fingerprint": fingerprint,
        "tokenizer_checksum": tokenizer.checksum,
        "tokenizer": {"file": "tokenizer.json", "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "checksum": tokenizer.checksum},
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "header": {"magic": magic, "version": version, "words": 256},
        "add_bos": False, "add_eos": False,
        "val_fraction": 0.0 if data.val_sources else data.val_fraction, "seed": data.seed,
        "splits": splits,
        "sources": [{"label": source_label(s), "path": s.path, "role": "train" if i < len(data.sources) else "val",
                     "weight": s.weight if i < len(data.sources) else 1, **per_source[i]} for i, s in enumerate(sources)],
    }
    atomic_write_json(out_dir / META_FILE, meta)
    return meta


def _normalized(conversations: Iterator[Conversation], normalize: Normalizer, source: int) -> Iterator[Conversation]:
    for c in conversations:
        c.messages = [{**m, "content": normalize(m["content"])} for m in c.messages]
        c.extra["source"] = source  # (kept in memory only: which source's counts it adds to)
        yield c


def split_by_conversation(conversations: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): val is the `fraction` of the conversations (at least one of two or more) whose keyed hash is lowest."""
    if not fraction or len(conversations) < 2:
        return conversations, []
    key = str(seed).encode()
    digest = [hashlib.blake2b(json.dumps(c.messages, sort_keys=True).encode(), digest_size=8, key=key).digest()
              for c in conversations]
    n_val = min(max(1, round(fraction * len(conversations))), len(conversations) - 1)
    val_ids = set(sorted(range(len(conversations)), key=digest.__getitem__)[:n_val])
    return ([c for i, c in enumerate(conversations) if i not in val_ids],
            [c for i, c in enumerate(conversations) if i in val_ids])


def _write_split(out_dir: Path, split: str, conversations: list[Conversation], chat: ChatFormat, dtype,
                 per_source: list[dict]) -> dict:
    ids, masks, starts, target_bytes = [], [], [0], 0
    for c in conversations:
        tokens, mask = chat.render(c.messages)
        ids.append(tokens)
        masks.append(mask)
        starts.append(starts[-1] + len(tokens))
        learnt_bytes = sum(len(m["content"].encode("utf-8")) for m in c.messages if m["role"] == "assistant")
        target_bytes += learnt_bytes
        counts = per_source[c.extra["source"]][split]
        counts["documents"] += 1
        counts["tokens"] += len(tokens)
        counts["bytes"] += learnt_bytes
    tokens = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=starts[-1])
    mask = np.fromiter((m for row in masks for m in row), dtype=np.uint8, count=starts[-1])
    shard = write_shard(out_dir / f"{split}_000000.bin", tokens, dtype)
    with atomic_write(chat_file(out_dir, split), "wb") as f:
        np.savez(f, mask=mask, starts=np.asarray(starts, dtype=np.int64),
                 where=np.asarray([c.where for c in conversations], dtype=str))
    targets = int(mask.sum())
    return {"tokens": int(tokens.size), "documents": len(conversations), "targets": targets, "bytes": target_bytes,
            "bytes_per_token": round(target_bytes / targets, 4) if targets else None,
            "shards": [{"file": shard.name, "tokens": int(tokens.size)}]}


# --------------------------------------------------------------------------- batches


class ConversationSplit:
    """One split's conversations: tokens, loss mask, boundaries; packs them into rows of seq_len + 1 tokens."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int):
        self.name, self.seq_len = split, seq_len
        self.tokens = TokenSplit(data_dir, split)
        path = chat_file(data_dir, split)
        try:
            with np.load(path, allow_pickle=False) as f:
                self.mask, self.starts, self.where = f["mask"], f["starts"], f["where"]
        except (OSError, ValueError, KeyError) as e:
            raise GptlabError(f"{path} is missing or damaged ({e})", "re-run gptlab data prepare") from None
        self.lengths = np.diff(self.starts)
        if len(self.mask) != len(self.tokens) or self.starts[-1] != len(self.tokens):
            raise GptlabError(f"{path} does not match the {split} shards", "re-run gptlab data prepare")
        too_long = np.flatnonzero(self.lengths > seq_len + 1)
        if too_long.size:
            i = int(too_long[0])
            raise GptlabError(
                f"the conversation at {self.where[i]} has {self.lengths[i]:,} tokens, more than fit in the context of "
                f"{seq_len} (+1) ({too_long.size} of {len(self.lengths):,} {split} conversations are that long)",
                "shorten or split its turns, drop it, or fine-tune a model with a longer model.context_length")

    def __len__(self) -> int:
        return len(self.lengths)

    def pack(self, order: np.ndarray) -> list[np.ndarray]:
        """The conversations in `order`, packed first-fit into rows of at most seq_len + 1 tokens (each row: their indices)."""
        rows, row, used, room = [], [], 0, self.seq_len + 1
        for i in order.tolist():
            n = int(self.lengths[i])
            if used + n > room:
                rows.append(np.asarray(row, dtype=np.int64))
                row, used = [], 0
            row.append(i)
            used += n
        if row:
            rows.append(np.asarray(row, dtype=np.int64))
        return rows

    def batch(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [len(rows), seq_len]: y is x shifted by one, -1 where the token is not learnt (or is padding)."""
        tokens = np.zeros((len(rows), self.seq_len + 1), dtype=np.int64)
        learn = np.zeros((len(rows), self.seq_len + 1), dtype=bool)
        for r, row in enumerate(rows):
            at = 0
            for i in row.tolist():
                a, b = int(self.starts[i]), int(self.starts[i + 1])
                tokens[r, at : at + b - a] = self.tokens.read(a, b - a)
                learn[r, at : at + b - a] = self.mask[a:b].astype(bool)
                at += b - a
        x = torch.from_numpy(tokens[:, :-1].copy())
        y = torch.from_numpy(np.where(learn[:, 1:], tokens[:, 1:], -1))
        return x, y


class ConversationLoader(ResumableLoader):
    """Training batches of packed conversations; like BatchLoader, a pure function of (seed, step), and each rank
    keeps its slice of the global batch. Every epoch is a fresh shuffle (seed, epoch), packed anew."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", batch_size: int = 16, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, **_ignored):
        self.conversations = ConversationSplit(data_dir, split, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self._epochs: dict[int, list[np.ndarray]] = {}
        self._first_row = {0: 0}  # epoch -> global index of its first row

    def _epoch_rows(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(self.conversations))
            self._epochs[epoch] = self.conversations.pack(order)
        return self._epochs[epoch]

    def _row(self, g: int) -> np.ndarray:
        epoch = max(e for e in self._first_row if self._first_row[e] <= g)
        while g >= self._first_row[epoch] + len(self._epoch_rows(epoch)):
            self._first_row[epoch + 1] = self._first_row[epoch] + len(self._epoch_rows(epoch))
            epoch += 1
        return self._epoch_rows(epoch)[g - self._first_row[epoch]]

    def rows_per_epoch(self, epoch: int = 0) -> int:
        """Rows the conversations pack into in that epoch's order (first fit: about the same every epoch)."""
        return len(self._epoch_rows(epoch))

    @property
    def epoch(self) -> float:
        return self.step * self.batch_size * self.world_size / self.rows_per_epoch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = (self.step * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return self.conversations.batch([self._row(g) for g in range(first, first + self.batch_size)])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _settings(self) -> dict:
        return {"mode": KIND, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "world_size": self.world_size, "split_tokens": len(self.conversations.tokens)}


def eval_rows(data_dir: str | os.PathLike, split: str, seq_len: int) -> tuple[ConversationSplit, list[np.ndarray]]:
    """A split's conversations packed in file order: every assistant token is a target exactly once."""
    conversations = ConversationSplit(data_dir, split, seq_len)
    return conversations, conversations.pack(np.arange(len(conversations)))


def iter_conversation_batches(data_dir: str | os.PathLike, split: str = "val", batch_size: int = 16, seq_len: int = 256,
                              max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """iter_eval_batches for conversations: batches of packed rows in order, batch k on rank k % world_size."""
    conversations, rows = eval_rows(data_dir, split, seq_len)
    batches = range(0, len(rows), batch_size)
    if max_batches is not None:
        batches = batches[: max_batches * world_size]
    for i in batches[rank::world_size]:
        yield conversations.batch(rows[i : i + batch_size])
