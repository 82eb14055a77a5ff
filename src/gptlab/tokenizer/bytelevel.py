"""Byte-level BPE: trained on the corpus (kind "bpe") or GPT-2's own (kind "gpt2").

Both are GPT-2-style: text is split by GPT-2's regex, each piece is turned into
bytes, and BPE merges run on the bytes, so every string round-trips exactly.
The vocabulary is kept as a Hugging Face `tokenizer.json`; encoding runs on a
`tiktoken` Encoding built from the same vocabulary (ranks = ids in merge
order), which gives the same ids several times faster than `tokenizers`.
If a vocabulary's ids are not in merge order (never seen for files gptlab
writes), encoding falls back to `tokenizers`.
"""

from __future__ import annotations

import json
import sys
from functools import cached_property
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer.base import (
    CorpusSample,
    SpecialTokens,
    Tokenizer,
    check_vocab_size,
)

# GPT-2's pre-tokenisation regex, as tiktoken spells it; `tokenizers`' ByteLevel(use_regex=True) uses the same.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257  # GPT-2's encoder.json, <|endoftext|> included


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (the alphabet of byte-level vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _hf_skeleton(model: models.Model) -> HFTokenizer:
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


class ByteLevelBPETokenizer(Tokenizer):
    """Byte-level BPE trained on the corpus with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf_json: dict, specials: SpecialTokens):
        super().__init__(specials)
        model = hf_json["model"]
        if model.get("type") != "BPE" or (hf_json.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
            raise ValueError("not a byte-level BPE tokenizer.json")
        self._json = hf_json
        self._vocab: dict[str, int] = model["vocab"]
        self._merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        self._added = {t["content"]: t["id"] for t in hf_json.get("added_tokens", [])}
        ids = set(self._vocab.values()) | set(self._added.values())
        if len(ids) != max(ids) + 1:
            raise ValueError("token ids are not contiguous")
        self._vocab_size = len(ids)
        missing = [t for t in specials.all() if t not in self._added]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self._tiktoken = self._build_tiktoken()

    def _build_tiktoken(self) -> tiktoken.Encoding | None:
        """A tiktoken Encoding equal to the HF model, or None where ranks are not in merge order."""
        special_ids = set(self._added.values())
        ranks = {bytes(BYTE_DECODER[c] for c in token): i for token, i in self._vocab.items() if i not in special_ids}
        # tiktoken merges the adjacent pair whose concatenation has the lowest id: the same as BPE's
        # merge order when the i-th merge creates id first+i, after both of its parts.
        first = None
        for i, (a, b) in enumerate(self._merges):
            merged, left, right = self._vocab.get(a + b), self._vocab.get(a), self._vocab.get(b)
            if merged is None or left is None or right is None:
                raise ValueError(f"merge {a!r} {b!r} uses tokens missing from the vocabulary")
            first = merged - i if first is None else first
            if merged != first + i or max(left, right) >= merged or merged in special_ids:
                return None  # out of merge order, or a special token shadows an ordinary one
        return tiktoken.Encoding(f"gptlab-{self.kind}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=self._added)

    @cached_property
    def hf(self) -> HFTokenizer:
        """The `tokenizers` object (for export and cross-checks); treats special strings in text as text."""
        hf = HFTokenizer.from_str(json.dumps(self._json))
        hf.encode_special_tokens = True
        return hf

    @property
    def uses_tiktoken(self) -> bool:
        return self._tiktoken is not None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        # Every special in the file: the configured ones, and for gpt2 also its own <|endoftext|>.
        return dict(sorted(self._added.items(), key=lambda kv: kv[1]))

    def token_to_id(self, token: str) -> int | None:
        return self._added.get(token, self._vocab.get(token))

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: callers that want more cores use processes (gptlab data prepare does).
        if self._tiktoken is not None:
            return [self._tiktoken.encode_ordinary(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts)]

    def _decode(self, ids: list[int]) -> str:
        if self._tiktoken is not None:
            return self._tiktoken.decode(ids, errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)

    def to_file_dict(self) -> dict:
        # gptlab's metadata goes first inside "model": `tokenizers` ignores unknown keys there.
        model = {k: v for k, v in self._json["model"].items() if k != "gptlab"}
        return {**self._json, "model": {"gptlab": self.meta(), **model}}

    def _identity(self) -> dict:
        by_id = sorted(self._vocab.items(), key=lambda kv: kv[1])
        return {
            "vocab": [t for t, _ in by_id],
            "merges": [" ".join(m) for m in self._merges],
            "added": sorted(self._added.items(), key=lambda kv: kv[1]),
        }

    @classmethod
    def from_file_dict(cls, d: dict, meta: dict) -> "ByteLevelBPETokenizer":
        return cls(d, SpecialTokens.from_meta(meta))

    @classmethod
    def train(cls, documents, cfg: TokenizerConfig) -> "ByteLevelBPETokenizer":
        specials = SpecialTokens.from_config(cfg)
        n_special = len(specials.all())
        check_vocab_size(cfg, 256 + n_special, f"256 byte tokens + {n_special} special token{'s' * (n_special != 1)}")
        hf = _hf_skeleton(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials.all(),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=sys.stderr.isatty(),
        )
        sample = CorpusSample(documents, cfg.train_max_bytes)
        hf.train_from_iterator(sample, trainer)
        sample.check()
        return cls(json.loads(hf.to_str()), specials)


class GPT2Tokenizer(ByteLevelBPETokenizer):
    """GPT-2's pretrained encoding (50,257 tokens, <|endoftext|> = 50256), read from local files."""

    kind = "gpt2"

    @classmethod
    def planned_vocab_size(cls, cfg: TokenizerConfig) -> int:
        return GPT2_VOCAB_SIZE + len(set(SpecialTokens.from_config(cfg).all()) - {GPT2_EOT})

    @classmethod
    def train(cls, documents, cfg: TokenizerConfig) -> "GPT2Tokenizer":
        """Nothing to learn: read encoder.json + vocab.bpe from cfg.gpt2_dir (never downloaded)."""
        encoder_path, merges_path = _gpt2_files(cfg.gpt2_dir)
        specials = SpecialTokens.from_config(cfg)
        try:
            encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0: "#version: 0.2"
            hf = _hf_skeleton(models.BPE(vocab=encoder, merges=merges))
        except Exception as e:  # bad JSON, bad merges: all mean the files are not GPT-2's
            raise GptlabError(f"cannot read GPT-2's tokenizer files in {cfg.gpt2_dir}: {e}", "use the original encoder.json and vocab.bpe") from None
        # <|endoftext|> is GPT-2's own special (id 50256); other specials get new ids after it.
        hf.add_special_tokens(list(dict.fromkeys([GPT2_EOT, *specials.all()])))
        return cls(json.loads(hf.to_str()), specials)


def _gpt2_files(gpt2_dir: str | None) -> tuple[Path, Path]:
    if gpt2_dir is None:
        raise GptlabError(
            "tokenizer.gpt2_dir is not set: the gpt2 tokenizer is read from local files, never downloaded",
            "point it at a folder holding encoder.json and vocab.bpe, e.g. --tokenizer.gpt2_dir=../shared/data/gpt2_tokenizer",
        )
    folder = Path(gpt2_dir)
    files = folder / "encoder.json", folder / "vocab.bpe"
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GptlabError(
            f"tokenizer.gpt2_dir={gpt2_dir} lacks {' and '.join(missing)}",
            "point it at a folder holding GPT-2's encoder.json and vocab.bpe",
        )
    return files
