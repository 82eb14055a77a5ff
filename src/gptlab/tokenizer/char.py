"""Character-level tokenizer (nanoGPT's shakespeare_char, DefaultGPT's 95 characters).

The vocabulary is the sorted set of characters in the training text, ids
0..n-1 in that order (as nanoGPT numbers them), then the special tokens.
A character outside the vocabulary is an error naming it, not a silent <unk>:
train on text that contains it, normalise it away ([text] normalize), or use
kind "bpe", which can encode anything.

Saved as a Hugging Face tokenizer.json (WordLevel over single characters), so
it loads in `tokenizers`/transformers too; encoding itself is a vectorised
lookup of code points.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer.base import CorpusSample, SpecialTokens, Tokenizer

HF_UNK = "<unk>"  # required by HF's WordLevel; absent from the vocabulary, so HF fails on unknown characters as gptlab does


class CharTokenizer(Tokenizer):
    kind = "char"

    @classmethod
    def planned_vocab_size(cls, cfg: TokenizerConfig) -> int:
        raise GptlabError("a character tokenizer's vocabulary depends on the corpus", "pass --model.vocab_size=N")

    def __init__(self, chars: list[str], specials: SpecialTokens):
        super().__init__(specials)
        if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
            raise ValueError("the character vocabulary must be distinct single characters, sorted")
        self.chars = list(chars)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._id_to_token = self.chars + specials.all()
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def encode(self, text: str) -> list[int]:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codes)  # ids follow code point order
        known = self._codepoints[np.minimum(ids, len(self.chars) - 1)] == codes
        if not known.all():
            bad = text[int(np.argmin(known))]
            raise GptlabError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in the char tokenizer's vocabulary of {len(self.chars)} characters",
                "train it on text that contains it, normalise it away ([text] normalize), or use tokenizer.kind=bpe",
            )
        return ids.tolist()

    def _decode(self, ids: list[int]) -> str:
        return "".join(self._id_to_token[i] for i in ids)

    @cached_property
    def hf(self) -> HFTokenizer:
        """The same tokenizer as a `tokenizers` object (what the file holds); special strings in text are text."""
        vocab = {c: i for i, c in enumerate(self.chars)}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=HF_UNK))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(self.specials.all())
        hf.encode_special_tokens = True
        return hf

    def to_file_dict(self) -> dict:
        d = json.loads(self.hf.to_str())
        return {**d, "model": {"gptlab": self.meta(), **d["model"]}}

    def _identity(self) -> dict:
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_file_dict(cls, d: dict, meta: dict) -> "CharTokenizer":
        specials = SpecialTokens.from_meta(meta)
        vocab = d["model"]["vocab"]
        chars = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in set(specials.all())]
        tok = cls(chars, specials)
        saved_ids = {**vocab, **{t["content"]: t["id"] for t in d.get("added_tokens", [])}}
        if any(saved_ids.get(t) != i for i, t in enumerate(tok._id_to_token)):
            raise ValueError("vocabulary ids are not in gptlab's char order")
        return tok

    @classmethod
    def train(cls, documents, cfg: TokenizerConfig) -> "CharTokenizer":
        specials = SpecialTokens.from_config(cfg)
        chars: set[str] = set()
        sample = CorpusSample(documents, cfg.train_max_bytes)
        for doc in sample:
            chars.update(doc)
        sample.check()
        return cls(sorted(chars), specials)
