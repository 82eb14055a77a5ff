"""Text sources -> token shards: stream, split by document, encode on every core, write atomically, resume.

The corpus streams through in chunks of about a megabyte of text, so memory
stays flat however large it is:

    main process:  read documents -> chunks ─┐                  ┌─> append to the open shard of train / val
    workers:                                  └> normalise, draw  ┘   (a hidden .partial file until full)
                                                 the split, encode,
                                                 add BOS/EOS

Validation is held out by document: a document goes to validation when its keyed hash falls below
data.val_fraction, so duplicates never straddle the splits. A training source with too few documents
for that (fewer than MIN_VAL_DOCUMENTS / val_fraction: a book, a single text file) has the tail of each
of its documents held out instead, val_fraction of its text cut at a paragraph or line boundary
(nanoGPT's split of Tiny Shakespeare); one line of output says so, and meta.json's source says which
("val_split": "documents" or "tail").

Results come back in chunk order, so the output does not depend on the number
of workers. A source with weight N is read N times; its validation documents
are taken once. Per-source `max_tokens` counts the source's tokens (both
splits) in its first reading; later readings stop where the first did.
`data.max_tokens` caps the training split exactly (the last document is cut).

Every chunk leaves the output in a resumable state: `.progress.json` records
the finished shards, the length of each open shard and the chunk reached,
with a fingerprint of the config, the tokenizer and the source files. A rerun
with the same fingerprint carries on from there (the output is the same, byte
for byte, as an uninterrupted run's); any other rerun starts clean. meta.json
is written last: while it is missing the folder is not usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from tqdm import tqdm

import gptlab
from gptlab.config import Config, SourceConfig, save_config
from gptlab.data.meta import META_FILE, PROGRESS_FILE, load_meta
from gptlab.data.shards import (
    HEADER_BYTES,
    MAX_SHARD_TOKENS,
    make_header,
    read_header,
    token_dtype,
)
from gptlab.device import cpu_count
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_bytes, atomic_write_json, check_folder_path, make_dirs
from gptlab.text import (
    Normalizer,
    is_conversation_source,
    iter_source_documents,
    resolve_source_files,
    source_format,
    source_label,
)
from gptlab.tokenizer import load_tokenizer

FORMAT_VERSION = 1  # of the folder layout and the progress file; part of the fingerprint
CHUNK_CHARS = 1 << 20  # text per worker task
CHECKPOINT_SECONDS = 5.0  # at most this much encoding is redone after an interruption (plus the chunks in flight)
SPLITS = ("train", "val")
# A source is split by document when it holds at least this many / val_fraction documents (so that about
# this many or more are drawn for validation); below that, the tail of each of its documents is held out.
MIN_VAL_DOCUMENTS = 10
TAIL_BOUNDARIES = ("\n\n", "\n", " ")  # where a held-out tail may start, in order of preference


# --------------------------------------------------------------------------- the work plan


@dataclass(frozen=True)
class Reading:
    """One pass through one source. A source of weight N is read N times."""

    source: int  # index into sources (data.sources, then data.val_sources)
    role: Literal["train", "val"]
    copy: int  # 0 for the first reading


# How a worker assigns a chunk's documents to the splits.
#   all_val: a validation source      draw: seeded per-document draw (val_fraction)
#   all_train: no draw                drop_val: draw, then drop validation documents (a repeated reading)
#   tail: each document's tail is validation, its head training; drop_tail: the heads only (a repeated reading)
SplitRule = Literal["all_val", "all_train", "draw", "drop_val", "tail", "drop_tail"]


def split_tail(doc: str, fraction: float) -> tuple[str, str]:
    """(head, tail) of a document, the tail about `fraction` of its text (up to 1.5x that), starting at a
    paragraph break, else a line break, else a space, else mid-word."""
    n = len(doc)
    target, earliest = round(n * (1 - fraction)), round(n * (1 - 1.5 * fraction))
    cut = next((i for sep in TAIL_BOUNDARIES if (i := doc.rfind(sep, earliest, target + len(sep))) > 0), target)
    return doc[:cut].strip(), doc[cut:].strip()


@dataclass
class Chunk:
    reading: int
    index: int
    rule: SplitRule
    docs: list[str]


@dataclass
class EncodedChunk:
    reading: int
    index: int
    lengths: np.ndarray  # tokens per document, BOS/EOS included, in document order
    is_val: np.ndarray  # bool per document
    doc_bytes: np.ndarray  # UTF-8 bytes per normalised document
    raw_bytes: int  # UTF-8 bytes of the chunk as read (for the progress bar)
    train: np.ndarray  # the train documents' tokens, concatenated
    val: np.ndarray


class DocumentEncoder:
    """A worker's job: normalise, draw the split, encode, add BOS/EOS. Picklable; loads the tokenizer once."""

    def __init__(self, tokenizer_path: Path, cfg: Config, bos_id: int | None, eos_id: int | None, dtype: np.dtype):
        self.tokenizer_path = str(tokenizer_path)
        self.normalize = Normalizer(cfg.text)
        self.prefix = [] if bos_id is None else [bos_id]
        self.suffix = [] if eos_id is None else [eos_id]
        self.dtype = dtype
        # A document goes to validation when its keyed hash falls below the fraction: the same
        # text always lands in the same split (duplicates never straddle), whatever the order.
        self.key = str(cfg.data.seed).encode()
        self.val_threshold = int(cfg.data.val_fraction * 2**64)
        self.val_fraction = cfg.data.val_fraction
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def is_val(self, data: bytes) -> bool:
        digest = hashlib.blake2b(data, digest_size=8, key=self.key).digest()
        return int.from_bytes(digest, "little") < self.val_threshold

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        raw_bytes = sum(len(d.encode("utf-8")) for d in chunk.docs)
        docs = [d for d in (self.normalize(d).strip() for d in chunk.docs) if d]
        if chunk.rule in ("tail", "drop_tail"):
            halves = [(part, role == 1) for d in docs for role, part in enumerate(split_tail(d, self.val_fraction)) if part]
            docs = [part for part, _ in halves]
        data = [d.encode("utf-8") for d in docs]
        if chunk.rule in ("draw", "drop_val"):
            is_val = np.fromiter(map(self.is_val, data), dtype=bool, count=len(data))
        elif chunk.rule in ("tail", "drop_tail"):
            is_val = np.array([v for _, v in halves], dtype=bool)
        else:
            is_val = np.full(len(docs), chunk.rule == "all_val")
        if chunk.rule in ("drop_val", "drop_tail"):
            docs = [d for d, v in zip(docs, is_val) if not v]
            data = [b for b, v in zip(data, is_val) if not v]
            is_val = np.zeros(len(docs), dtype=bool)
        ids = self.tokenizer.encode_batch(docs) if docs else []
        extra = len(self.prefix) + len(self.suffix)
        return EncodedChunk(
            reading=chunk.reading,
            index=chunk.index,
            lengths=np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids)),
            is_val=is_val,
            doc_bytes=np.fromiter(map(len, data), dtype=np.int64, count=len(data)),
            raw_bytes=raw_bytes,
            train=self._concat(x for x, v in zip(ids, is_val) if not v),
            val=self._concat(x for x, v in zip(ids, is_val) if v),
        )

    def _concat(self, docs: Iterable[list[int]]) -> np.ndarray:
        return np.fromiter(chain.from_iterable(chain(self.prefix, x, self.suffix) for x in docs), dtype=self.dtype)


_worker_encoder: DocumentEncoder | None = None


def _init_worker(encoder: DocumentEncoder) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops the pool)
    # One encoding thread per process: the processes already fill every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker_encoder
    _worker_encoder = encoder
    _ = encoder.tokenizer  # inherited (fork) or loaded once from the file (spawn)


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return _worker_encoder(chunk)


def _ordered_map(pool, fn, tasks: Iterator, max_pending: int) -> Iterator:
    """Like pool.imap, but pulls a task only when fewer than max_pending are in flight (imap reads its input eagerly)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# --------------------------------------------------------------------------- writing shards


class _Restart(Exception):
    """The progress file and the files on disk disagree: start clean."""


class SplitWriter:
    """Appends one split's tokens to shards of `shard_size` tokens.

    The open shard is a hidden `.train_000003.bin.partial` whose header stays
    zero (no reader accepts it) until it is full; then the header is written and
    the file renamed to `train_000003.bin`. `record` is this split's entry in
    the progress file, kept up to date.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_size: int, record: dict):
        self.out_dir, self.split, self.dtype, self.shard_size, self.record = out_dir, split, dtype, shard_size, record
        for shard in record["shards"]:
            path = out_dir / shard["file"]
            try:
                if read_header(path) != (dtype, shard["tokens"]):
                    raise _Restart
            except GptlabError:
                raise _Restart from None
        n = len(record["shards"])
        partial, final = self._path(n, partial=True), self._path(n)
        if final.exists() and not partial.exists():  # finished after the last checkpoint: open it again
            os.replace(final, partial)
        for path in self._files():  # anything written after the last checkpoint
            if _shard_index(path) > n or path == final:
                path.unlink()
        size = HEADER_BYTES + record["open_tokens"] * dtype.itemsize
        if partial.exists() and partial.stat().st_size >= size:
            self.file = open(partial, "r+b")
        elif record["open_tokens"] == 0:
            self.file = open(partial, "w+b")
        else:
            raise _Restart
        self.file.truncate(size)
        self.file.write(bytes(HEADER_BYTES))  # zero header: an open shard is never mistaken for a finished one
        self.file.seek(size)

    def _path(self, index: int, partial: bool = False) -> Path:
        name = f"{self.split}_{index:06d}.bin"
        return self.out_dir / (f".{name}.partial" if partial else name)

    def _files(self) -> list[Path]:
        return [*self.out_dir.glob(f"{self.split}_*.bin"), *self.out_dir.glob(f".{self.split}_*.bin.partial")]

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.record["shards"]) + self.record["open_tokens"]

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            room = self.shard_size - self.record["open_tokens"]
            self.file.write(tokens[:room].astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.record["open_tokens"] += min(room, tokens.size)
            tokens = tokens[room:]
            if self.record["open_tokens"] == self.shard_size:
                self.finish_shard()

    def finish_shard(self) -> None:
        n = len(self.record["shards"])
        self.file.seek(0)
        self.file.write(make_header(self.dtype, self.record["open_tokens"]).tobytes())
        self.sync()
        self.file.close()
        os.replace(self._path(n, partial=True), self._path(n))
        self.record["shards"].append({"file": self._path(n).name, "tokens": self.record["open_tokens"]})
        self.record["open_tokens"] = 0
        self.file = open(self._path(n + 1, partial=True), "w+b")
        self.file.truncate(HEADER_BYTES)
        self.file.seek(HEADER_BYTES)

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self, finish: bool) -> None:
        """Close the open shard: as a final shard if it holds tokens and `finish`, else leave it for a resume."""
        if finish and self.record["open_tokens"]:
            self.finish_shard()
        self.file.close()
        if finish:
            self._path(len(self.record["shards"]), partial=True).unlink(missing_ok=True)


def _shard_index(path: Path) -> int:
    return int(re.search(r"_(\d+)\.bin", path.name).group(1))


# --------------------------------------------------------------------------- the job


@dataclass
class Take:
    """What of an encoded chunk fits the token limits."""

    tokens: dict[str, int]
    documents: dict[str, int]
    bytes: dict[str, int]
    limit_reached: bool


def take_within(chunk: EncodedChunk, limit_all: int | None, limit_train: int | None) -> Take:
    """Documents in order until `limit_all` tokens (both splits) or `limit_train` train tokens; the last one is cut."""
    n, cut_tokens, reached = len(chunk.lengths), 0, False
    if limit_all is not None or limit_train is not None:
        train_lengths = np.where(chunk.is_val, 0, chunk.lengths)
        all_cum, train_cum = np.cumsum(chunk.lengths), np.cumsum(train_lengths)
        over = np.zeros(n, dtype=bool)
        if limit_all is not None:
            over |= all_cum >= limit_all
        if limit_train is not None:
            over |= train_cum >= limit_train
        if over.any():
            k = int(np.argmax(over))  # the document during which a limit is reached
            room = [chunk.lengths[k]]
            if limit_all is not None:
                room.append(limit_all - (all_cum[k] - chunk.lengths[k]))
            if limit_train is not None and not chunk.is_val[k]:
                room.append(limit_train - (train_cum[k] - train_lengths[k]))
            n, cut_tokens, reached = k, max(0, int(min(room))), True
    take = Take({s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, reached)
    for split, mask in (("train", ~chunk.is_val[:n]), ("val", chunk.is_val[:n])):
        take.tokens[split] = int(chunk.lengths[:n][mask].sum())
        take.documents[split] = int(mask.sum())
        take.bytes[split] = int(chunk.doc_bytes[:n][mask].sum())
    if cut_tokens:
        split = "val" if chunk.is_val[n] else "train"
        take.tokens[split] += cut_tokens
        take.documents[split] += 1
        take.bytes[split] += int(chunk.doc_bytes[n])
    return take


def _local_files_stamp(source: SourceConfig) -> list:
    """Names, sizes and modification times of a source's files: a changed corpus changes the fingerprint."""
    if source_format(source) == "hf":
        return [source.path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_source_files(source)]


def fingerprint(cfg: Config, tokenizer_checksum: str) -> str:
    data = cfg.data.model_dump(mode="json", exclude={"workers", "out_dir"})
    sources = [_local_files_stamp(s) for s in cfg.data.sources + cfg.data.val_sources]
    identity = {
        "format": FORMAT_VERSION,
        "text": cfg.text.model_dump(mode="json"),
        "data": data,
        "tokenizer": tokenizer_checksum,
        "files": sources,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class Preparation:
    """One run of prepare_data; see the module docstring."""

    def __init__(self, cfg: Config, tokenizer_path: Path, tokenizer, progress: bool):
        self.cfg, self.data, self.tokenizer_path, self.tokenizer = cfg, cfg.data, tokenizer_path, tokenizer
        self.out_dir = Path(cfg.data.out_dir)
        self.sources = cfg.data.sources + cfg.data.val_sources
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.progress = progress
        n_train = len(cfg.data.sources)
        self.readings = [Reading(n_train + j, "val", 0) for j in range(len(cfg.data.val_sources))] + [
            Reading(i, "train", c) for i, s in enumerate(cfg.data.sources) for c in range(s.weight)
        ]
        self.fingerprint = fingerprint(cfg, tokenizer.checksum)
        self.cut_gutenberg = "strip_gutenberg" in cfg.text.normalize
        self.tail_sources: set[int] = set()  # training sources whose documents' tails are held out (_choose_val_split)
        self.state: dict = {}
        self.writers: dict[str, SplitWriter] = {}

    # ------------------------------------------------------------------ state

    def _fresh_state(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "position": [0, 0],  # (reading, chunk) of the next chunk to take
            "readings": [{"tokens": 0, "train_tokens": 0} for _ in self.readings],
            "sources": [{s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS} for _ in self.sources],
            "splits": {s: {"shards": [], "open_tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS},
        }

    def _clean(self) -> None:
        """Remove a previous run's output; meta.json first, so the folder never looks complete meanwhile."""
        (self.out_dir / META_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            for path in [*self.out_dir.glob(f"{split}_*.bin"), *self.out_dir.glob(f".{split}_*.bin.partial")]:
                path.unlink()
        (self.out_dir / PROGRESS_FILE).unlink(missing_ok=True)

    def _open(self, restart: bool) -> None:
        """Load the saved progress and reopen the split writers if the fingerprint matches; else start clean."""
        make_dirs(self.out_dir)
        progress_path = self.out_dir / PROGRESS_FILE
        if progress_path.exists() and not restart:
            try:
                self.state = json.loads(progress_path.read_text(encoding="utf-8"))
                if self.state.get("fingerprint") == self.fingerprint:
                    self.writers = {s: self._writer(s) for s in SPLITS}
                    done = sum(len(self.state["splits"][s]["shards"]) for s in SPLITS)
                    self._log(f"resuming the unfinished prepare in {self.out_dir} ({done} shards already written)")
                    return
            except (_Restart, json.JSONDecodeError, KeyError, TypeError):
                pass
        self._clean()
        self.state = self._fresh_state()
        self.writers = {s: self._writer(s) for s in SPLITS}

    def _writer(self, split: str) -> SplitWriter:
        return SplitWriter(self.out_dir, split, self.dtype, self.data.shard_size, self.state["splits"][split])

    def _checkpoint(self) -> None:
        for w in self.writers.values():
            w.sync()
        atomic_write_json(self.out_dir / PROGRESS_FILE, self.state)

    def _shards_written(self) -> int:
        return sum(len(w.record["shards"]) for w in self.writers.values())

    def _log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------------ reading

    def _rule(self, reading: Reading) -> SplitRule:
        if reading.role == "val":
            return "all_val"
        if self.data.val_sources or self.data.val_fraction == 0:
            return "all_train"
        if reading.source in self.tail_sources:
            return "tail" if reading.copy == 0 else "drop_tail"
        return "draw" if reading.copy == 0 else "drop_val"

    def _choose_val_split(self) -> None:
        """Hold out the tails of a training source's documents when it has too few to draw val_fraction of them."""
        if self.data.val_sources or self.data.val_fraction == 0:
            return
        enough = math.ceil(MIN_VAL_DOCUMENTS / self.data.val_fraction)
        for i, source in enumerate(self.data.sources):
            documents = iter_source_documents(source, strip_gutenberg=self.cut_gutenberg)
            count = sum(1 for _ in itertools.islice(documents, enough))
            if count < enough:
                self.tail_sources.add(i)
                whose = "its text" if count == 1 else f"each of its {count} documents' text"
                self._log(f"{source_label(source)}: {count} document{'s' if count > 1 else ''}, too few to hold "
                          f"{self.data.val_fraction:.0%} of them out for validation (that needs {enough}); the last "
                          f"{self.data.val_fraction:.0%} of {whose}, from a paragraph or line break on, is the validation split instead")

    def _chunks(self) -> Iterator[Chunk]:
        """The corpus as chunks, from the saved position on; stops reading a source once its limit is reached."""
        position = self.state["position"]  # updated in place as results come back
        for r, reading in enumerate(self.readings):
            if r < position[0]:
                continue
            first = position[1] if r == position[0] else 0
            docs, chars, index = [], 0, 0
            for doc in iter_source_documents(self.sources[reading.source], strip_gutenberg=self.cut_gutenberg):
                if self.state["position"][0] > r:  # a token limit ended this reading
                    break
                docs.append(doc)
                chars += len(doc)
                if chars >= CHUNK_CHARS:
                    if index >= first:
                        yield Chunk(r, index, self._rule(reading), docs)
                    docs, chars, index = [], 0, index + 1
            if docs and index >= first and self.state["position"][0] <= r:
                yield Chunk(r, index, self._rule(reading), docs)

    def _limits(self, r: int) -> tuple[int | None, int | None]:
        """(tokens left for this reading, train tokens left) under data.max_tokens and the source's max_tokens."""
        reading = self.readings[r]
        cap = self.sources[reading.source].max_tokens
        done = self.state["readings"][r]
        limit_all = cap - done["tokens"] if cap and reading.copy == 0 else None
        limit_train = None
        if reading.role == "train":
            if self.data.max_tokens:
                limit_train = self.data.max_tokens - self.writers["train"].tokens
            if cap and reading.copy > 0:  # stop where the first reading stopped
                left = self.state["readings"][r - reading.copy]["train_tokens"] - done["train_tokens"]
                limit_train = left if limit_train is None else min(limit_train, left)
        return limit_all, limit_train

    def _estimate_bytes(self) -> int | None:
        try:
            sizes = [sum(p.stat().st_size for p in resolve_source_files(self.sources[r.source])) for r in self.readings]
            return sum(sizes) or None
        except (GptlabError, OSError):
            return None

    # ------------------------------------------------------------------ the run

    def run(self, workers: int, restart: bool = False) -> dict:
        self._choose_val_split()
        self._open(restart)
        encoder = DocumentEncoder(
            self.tokenizer_path,
            self.cfg,
            self.tokenizer.bos_id if self.data.add_bos else None,
            self.tokenizer.eos_id if self.data.add_eos else None,
            self.dtype,
        )
        encoder._tokenizer = self.tokenizer  # used as is when encoding in this process
        bar = tqdm(total=self._estimate_bytes(), unit="B", unit_scale=True, desc="prepare", disable=not self.progress, dynamic_ncols=True)
        try:
            with _encoding(encoder, workers) as encode:
                last_checkpoint = time.monotonic()
                for chunk in encode(self._chunks()):
                    shards_before = self._shards_written()
                    self._add(chunk)
                    bar.update(chunk.raw_bytes)
                    bar.set_postfix(tokens=f"{sum(w.tokens for w in self.writers.values()):,}", refresh=False)
                    if self._shards_written() > shards_before or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                        self._checkpoint()
                        last_checkpoint = time.monotonic()
        except BaseException as e:
            bar.leave = False  # the error line replaces the bar
            # Leave the files for a rerun: the last checkpoint says how much of them is good.
            for w in self.writers.values():
                w.close(finish=False)
            if isinstance(e, GptlabError):  # bad input: fixing it changes the fingerprint, so none of this is of use
                self._clean()
                with contextlib.suppress(OSError):
                    self.out_dir.rmdir()  # if it is empty
            raise
        finally:
            bar.close()
        for w in self.writers.values():
            w.close(finish=True)
        try:
            self._check_result()
        except GptlabError:
            self._clean()
            raise
        return self._finish()

    def _add(self, chunk: EncodedChunk) -> None:
        """Write what of a chunk fits the token limits, and advance the position."""
        state = self.state
        if [chunk.reading, chunk.index] < state["position"]:
            return  # encoded while its reading was still open; a limit has ended it since
        take = take_within(chunk, *self._limits(chunk.reading))
        self.writers["train"].write(chunk.train[: take.tokens["train"]])
        self.writers["val"].write(chunk.val[: take.tokens["val"]])
        reading = state["readings"][chunk.reading]
        reading["tokens"] += take.tokens["train"] + take.tokens["val"]
        reading["train_tokens"] += take.tokens["train"]
        source = state["sources"][self.readings[chunk.reading].source]
        for split in SPLITS:
            state["splits"][split]["documents"] += take.documents[split]
            state["splits"][split]["bytes"] += take.bytes[split]
            for key, value in (("documents", take.documents), ("tokens", take.tokens), ("bytes", take.bytes)):
                source[split][key] += value[split]
        if self.data.max_tokens is not None and self.writers["train"].tokens >= self.data.max_tokens:
            state["position"][:] = [len(self.readings), 0]  # validation sources come first: all done
        elif take.limit_reached:
            state["position"][:] = [chunk.reading + 1, 0]
        else:
            state["position"][:] = [chunk.reading, chunk.index + 1]

    def _check_result(self) -> None:
        train, val = (self.state["splits"][s] for s in SPLITS)
        train_tokens, val_tokens = self.writers["train"].tokens, self.writers["val"].tokens
        if train_tokens == 0:
            raise GptlabError(
                f"no training text: the sources gave {val['documents']} documents, none for training",
                'check data.sources (--data PATH); a single long document can be cut finer (documents = "blank_lines")',
            )
        if self.data.val_sources and val_tokens == 0:
            raise GptlabError("the validation sources (data.val_sources) gave no text", "check their paths")
        if not self.data.val_sources and self.data.val_fraction > 0 and val_tokens == 0:
            raise GptlabError(
                f"the validation split is empty: none of the {train['documents']:,} documents was drawn "
                f"for it with data.val_fraction={self.data.val_fraction}, nor any of their tails long enough",
                'raise data.val_fraction, add data, cut the text into more documents (documents = "blank_lines"), '
                "or name a validation source with --val-data",
            )

    def _finish(self) -> dict:
        copy = self.out_dir / "tokenizer.json"
        if copy.resolve() != self.tokenizer_path.resolve():
            atomic_write_bytes(copy, self.tokenizer_path.read_bytes())
        save_config(self.cfg, self.out_dir / "config.toml")
        meta = self._meta()
        atomic_write_json(self.out_dir / META_FILE, meta)  # last: the folder is complete from here on
        (self.out_dir / PROGRESS_FILE).unlink(missing_ok=True)
        return meta

    def _meta(self) -> dict:
        tok, state = self.tokenizer, self.state
        splits = {}
        for split in SPLITS:
            s, tokens = state["splits"][split], self.writers[split].tokens
            splits[split] = {
                "tokens": tokens,
                "documents": s["documents"],
                "bytes": s["bytes"],
                "bytes_per_token": round(s["bytes"] / tokens, 4) if tokens else None,
                "shards": s["shards"],
            }
        n_train = len(self.data.sources)
        sources = [
            {
                "label": source_label(src),
                "path": src.path,
                "role": "train" if i < n_train else "val",
                "weight": src.weight if i < n_train else 1,
                "max_tokens": src.max_tokens,
                "val_split": None if i >= n_train or self._rule(Reading(i, "train", 0)) == "all_train"
                else "tail" if i in self.tail_sources else "documents",
                **state["sources"][i],
            }
            for i, src in enumerate(self.sources)
        ]
        magic, version = (int(v) for v in make_header(self.dtype, 0)[:2])
        return {
            "format": "gptlab-shards",
            "format_version": FORMAT_VERSION,
            "gptlab_version": gptlab.__version__,
            "fingerprint": self.fingerprint,
            "tokenizer_checksum": tok.checksum,
            "tokenizer": {
                "file": "tokenizer.json",
                "kind": tok.kind,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "checksum": tok.checksum,
            },
            "vocab_size": tok.vocab_size,
            "dtype": self.dtype.name,
            "header": {"magic": magic, "version": version, "words": HEADER_BYTES // 4},
            "add_bos": self.data.add_bos,
            "add_eos": self.data.add_eos,
            "val_fraction": 0.0 if self.data.val_sources else self.data.val_fraction,
            "seed": self.data.seed,
            "shard_size": self.data.shard_size,
            "max_tokens": self.data.max_tokens,
            "splits": splits,
            "sources": sources,
        }


class _encoding:
    """Context manager giving `encode(chunks) -> encoded chunks, in order`: a worker pool, or in-process for one worker."""

    def __init__(self, encoder: DocumentEncoder, workers: int):
        self.encoder, self.workers, self.pool = encoder, workers, None

    def __enter__(self) -> Callable[[Iterator[Chunk]], Iterator[EncodedChunk]]:
        if self.workers <= 1:
            return lambda chunks: map(self.encoder, chunks)
        # fork where it is safe (Linux): workers inherit the loaded tokenizer and start at once, and
        # nothing depends on the caller's __main__ (a notebook, `python -`, an unguarded script).
        # The parent's threads (torch, tqdm) are not needed in the workers, and tokenizers' own
        # thread pool is off there. Elsewhere the platform default (spawn) reloads the tokenizer.
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
        self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.encoder,))
        return lambda chunks: _ordered_map(self.pool, _encode_in_worker, chunks, max_pending=2 * self.workers + 2)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


# --------------------------------------------------------------------------- the API


def prepare_data(cfg: Config, tokenizer_path: str | os.PathLike, force: bool = False, progress: bool = False) -> dict:
    """Encode cfg.data.sources with a tokenizer into token shards in cfg.data.out_dir; return meta.json's content.

    A finished folder made from the same config, tokenizer and files is left as
    it is (force=True redoes it); an interrupted one is resumed.
    """
    data = cfg.data
    if not data.sources:
        raise GptlabError("no data sources given", "pass --data PATH, or set [[data.sources]] in the config")
    if data.shard_size > MAX_SHARD_TOKENS:
        raise GptlabError(f"data.shard_size={data.shard_size:,} is too large", f"llm.c shards hold at most {MAX_SHARD_TOKENS:,} tokens")
    tokenizer = load_tokenizer(tokenizer_path)  # a file, or a folder holding tokenizer.json
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    for flag, token_id, role in ((data.add_bos, tokenizer.bos_id, "bos"), (data.add_eos, tokenizer.eos_id, "eos")):
        if flag and token_id is None:
            raise GptlabError(
                f"data.add_{role} is set but the tokenizer {tokenizer_path} has no {role.upper()} token",
                f"train the tokenizer with tokenizer.{role}_token set, or pass --data.add_{role}=false",
            )
    chat = [is_conversation_source(s) for s in data.sources + data.val_sources]
    if any(chat) and not all(chat):
        raise GptlabError("data.sources mixes text and conversations",
                          "prepare them into two folders: text for pretraining, conversations for gptlab sft")
    job = Preparation(cfg, tokenizer_path, tokenizer, progress)
    check_folder_path(job.out_dir)  # before the sources are read
    if all(chat):
        from gptlab.data.conversations import prepare_conversations

        done = None if force else _finished_meta(job.out_dir, job.fingerprint)
        return done or prepare_conversations(cfg, tokenizer_path, job.fingerprint, progress)
    if not force:
        done = _finished_meta(job.out_dir, job.fingerprint)
        if done is not None:
            job._log(f"{job.out_dir} is already prepared from this config, tokenizer and files (force=True redoes it)")
            return done
    return job.run(data.workers or cpu_count(), restart=force)


def _finished_meta(out_dir: Path, fingerprint: str) -> dict | None:
    if not (out_dir / META_FILE).exists():
        return None
    try:
        meta = load_meta(out_dir)
        if meta.get("fingerprint") != fingerprint:
            return None
        for split in meta["splits"].values():
            for shard in split["shards"]:
                if read_header(out_dir / shard["file"])[1] != shard["tokens"]:
                    return None
        return meta
    except (GptlabError, KeyError):
        return None


def format_prepared(meta: dict, cfg: Config) -> tuple[str, list[str]]:
    """What `gptlab data prepare` reports: one summary line, and a warning per split too short to train on."""
    parts = [f"{name} {split['tokens']:,} tokens / {split['documents']:,} documents in {len(split['shards'])} shard(s)"
             for name, split in meta["splits"].items() if split["tokens"]]
    summary = f"{cfg.data.out_dir}: {'; '.join(parts)}; {meta['splits']['train']['bytes_per_token']} bytes/token, {meta['dtype']}"
    window = cfg.model.context_length + 1
    warnings = [f"split {name} has {split['tokens']:,} tokens, fewer than one window of {window} (model.context_length + 1): "
                "training will refuse it; add data or lower model.context_length"
                for name, split in meta["splits"].items() if 0 < split["tokens"] < window]
    return summary, warnings
