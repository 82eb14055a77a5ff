"""What every tokenizer kind shares: special tokens, the file metadata, checksums, id checks.

A tokenizer file is one JSON document. Where the kind allows it (bpe, gpt2,
char) it is a Hugging Face `tokenizer.json` that `tokenizers.Tokenizer.from_file`
and transformers' `PreTrainedTokenizerFast` load as they are; gptlab's own
metadata (kind, which special token is BOS/EOS/PAD) sits at `model.gptlab`, the
one place where the `tokenizers` parser tolerates an extra key (an extra
top-level key is rejected). SentencePiece has no lossless HF form, so its file
holds the metadata at the top level and the serialized model proto in base64.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text

FILE_FORMAT = "gptlab-tokenizer"
FILE_VERSION = 1
MAX_VOCAB = 100_000  # the largest vocabulary gptlab trains (bpe, sentencepiece)


@dataclass(frozen=True)
class SpecialTokens:
    """Which strings are BOS/EOS/PAD, plus any extra special tokens (all optional)."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    extra: tuple[str, ...] = field(default=())

    @classmethod
    def from_config(cls, cfg: TokenizerConfig) -> "SpecialTokens":
        specials = cls(cfg.bos_token, cfg.eos_token, cfg.pad_token, tuple(cfg.extra_special_tokens))
        for token in specials.all():
            # A one-character special would be indistinguishable from that character in text.
            if len(token) < 2 or not token.strip():
                raise GptlabError(
                    f"special token {token!r} is too short to tell apart from ordinary text",
                    "use a marker such as <BEGIN>, <END>, <PAD> or <|endoftext|>",
                )
        return specials

    @classmethod
    def from_meta(cls, meta: dict) -> "SpecialTokens":
        return cls(meta.get("bos_token"), meta.get("eos_token"), meta.get("pad_token"), tuple(meta.get("extra_special_tokens", ())))

    def to_meta(self) -> dict:
        return {"bos_token": self.bos, "eos_token": self.eos, "pad_token": self.pad, "extra_special_tokens": list(self.extra)}

    def all(self) -> list[str]:
        """The distinct special strings in id order: BOS, EOS, PAD, extras (a token may fill several roles)."""
        return list(dict.fromkeys(t for t in (self.bos, self.eos, self.pad, *self.extra) if t is not None))


class Tokenizer:
    """Text <-> token ids. One subclass per kind; build one with `train_tokenizer` or `load_tokenizer`.

    encode() never adds BOS/EOS, and special-token strings inside the text are
    encoded as ordinary text: a corpus that happens to contain "<|endoftext|>"
    cannot inject an EOS. The data stage appends `eos_id` itself.
    decode() renders special ids as their strings.
    """

    kind: str = ""

    @classmethod
    def planned_vocab_size(cls, cfg: TokenizerConfig) -> int:
        """The vocabulary a tokenizer of `cfg` will have, known before it is trained (a model is sized with it)."""
        return cfg.vocab_size

    def __init__(self, specials: SpecialTokens):
        self.specials = specials
        # The Jinja chat template (tokenizer/chat.py) of a tokenizer that holds the chat tokens; None: a base model's.
        self.chat_template: str | None = None

    # ------------------------------------------------------------------ what each kind implements

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (special tokens included), or None."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_file_dict(self) -> dict:
        """The saved file's content (JSON-able), metadata included."""
        raise NotImplementedError

    def _identity(self) -> dict:
        """Everything that decides the encoding (vocabulary, merges/scores), canonical and JSON-able."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: self.token_to_id(t) for t in self.specials.all()}

    @property
    def bos_id(self) -> int | None:
        return None if self.specials.bos is None else self.token_to_id(self.specials.bos)

    @property
    def eos_id(self) -> int | None:
        return None if self.specials.eos is None else self.token_to_id(self.specials.eos)

    @property
    def pad_id(self) -> int | None:
        return None if self.specials.pad is None else self.token_to_id(self.specials.pad)

    def decode(self, ids: Sequence[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise GptlabError(
                f"token id {bad} is outside this {self.kind} tokenizer's vocabulary (0..{self.vocab_size - 1})",
                "decode ids made by the same tokenizer",
            )
        return self._decode(ids)

    def meta(self) -> dict:
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "kind": self.kind, **self.specials.to_meta()}
        return meta if self.chat_template is None else {**meta, "chat_template": self.chat_template}

    def to_json(self) -> str:
        return json.dumps(self.to_file_dict(), ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @cached_property
    def checksum(self) -> str:
        """sha256 of the vocabulary, merges/scores and special roles: equal iff two tokenizers encode alike."""
        identity = {"kind": self.kind, "specials": self.specials.to_meta(), **self._identity()}
        if self.chat_template is not None:  # only then: the checksums of tokenizers without one stay as they were
            identity["chat_template"] = self.chat_template
        canonical = json.dumps(identity, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __reduce__(self):
        # Pickled (e.g. for multiprocessing workers) as its file content; rebuilt on the other side.
        from gptlab.tokenizer.io import tokenizer_from_json

        return tokenizer_from_json, (self.to_json(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


class CorpusSample:
    """Training documents, stopped once `max_bytes` of UTF-8 have been taken.

    The training libraries consume this iterator inside native code, which turns
    any exception into an opaque RuntimeError; so a reader error (a binary file,
    a missing source) is kept here, the iteration ends, and `check()` re-raises
    it intact after training.
    """

    def __init__(self, documents: Iterable[str], max_bytes: int | None):
        self._documents = documents
        self.max_bytes = max_bytes
        self.n_documents = 0
        self.n_bytes = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for doc in self._documents:
                if not doc:
                    continue
                yield doc
                self.n_documents += 1
                self.n_bytes += len(doc.encode("utf-8"))
                if self.max_bytes is not None and self.n_bytes >= self.max_bytes:
                    return
        except (Exception, KeyboardInterrupt) as e:
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.n_documents == 0:
            raise GptlabError(
                "no text to train the tokenizer on: the corpus is empty",
                "check data.sources (--data PATH) and that the files hold text",
            )


def check_vocab_size(cfg: TokenizerConfig, minimum: int, why: str) -> None:
    if cfg.vocab_size < minimum:
        raise GptlabError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for a {cfg.kind} tokenizer",
            f"use at least {minimum} ({why})",
        )
    if cfg.vocab_size > MAX_VOCAB:
        raise GptlabError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too large", f"gptlab trains vocabularies of up to {MAX_VOCAB:,} tokens"
        )
