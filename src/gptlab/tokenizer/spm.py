"""SentencePiece BPE or unigram (AureliusGPT-Torch), trained with the `sentencepiece` library.

Trained for exact round trips: no normalisation (the text stage normalises),
whitespace kept as it is, no dummy prefix, and byte fallback, so a character
never seen in training becomes its UTF-8 bytes instead of <unk>. SentencePiece
reads sentences, so documents are fed line by line and "\\n" is a piece of its
own. Special tokens are control symbols: they have ids but are never matched
in text.

There is no lossless Hugging Face form of such a model, so the file is JSON
holding gptlab's metadata and the serialized model proto (base64).
"""

from __future__ import annotations

import base64
import io
import os
import re

import sentencepiece as spm

from gptlab.config import TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer.base import (
    CorpusSample,
    SpecialTokens,
    Tokenizer,
    check_vocab_size,
)

UNK = "<unk>"  # SentencePiece requires one; byte fallback means encode never produces it


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, specials: SpecialTokens):
        super().__init__(specials)
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._special_by_id = {}
        for token in specials.all():
            i = self.sp.piece_to_id(token)
            if not self.sp.is_control(i):
                raise ValueError(f"special token {token!r} is not a control symbol of the model")
            self._special_by_id[i] = token

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != UNK else i

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)  # processes, not threads, are gptlab's parallelism

    def _decode(self, ids: list[int]) -> str:
        # SentencePiece decodes control symbols to "": render gptlab's special tokens as their strings.
        parts, run = [], []
        for i in ids:
            if i in self._special_by_id:
                parts += [self.sp.decode(run), self._special_by_id[i]]
                run = []
            else:
                run.append(i)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def to_file_dict(self) -> dict:
        return {"gptlab": self.meta(), "sentencepiece_model": base64.b64encode(self.model_proto).decode("ascii")}

    def _identity(self) -> dict:
        sp = self.sp
        return {"pieces": [[sp.id_to_piece(i), sp.get_score(i), _piece_type(sp, i)] for i in range(sp.get_piece_size())]}

    @classmethod
    def from_file_dict(cls, d: dict, meta: dict) -> "SentencePieceTokenizer":
        return cls(base64.b64decode(d["sentencepiece_model"], validate=True), SpecialTokens.from_meta(meta))

    @classmethod
    def train(cls, documents, cfg: TokenizerConfig) -> "SentencePieceTokenizer":
        specials = SpecialTokens.from_config(cfg)
        n_special = len(specials.all())
        pieces = f"<unk>, newline, 256 byte pieces, {n_special} special token{'s' * (n_special != 1)}, then the corpus' characters"
        check_vocab_size(cfg, 258 + n_special, pieces)
        sample = CorpusSample(documents, cfg.train_max_bytes)
        lines = (line for doc in sample for line in doc.split("\n") if line)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                model_type=cfg.sp_model_type,
                vocab_size=cfg.vocab_size,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                unk_id=0,
                bos_id=-1,  # gptlab's specials are control symbols at ids 1..n instead of SentencePiece's built-ins
                eos_id=-1,
                pad_id=-1,
                control_symbols=specials.all(),
                user_defined_symbols=["\n"],
                max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            sample.check()  # a reader error, or an empty corpus, explains the failure better
            raise _sentencepiece_error(str(e), cfg) from None
        sample.check()
        return cls(model.getvalue(), specials)


def _piece_type(sp: spm.SentencePieceProcessor, i: int) -> str:
    for name in ("control", "unknown", "byte", "unused"):
        if getattr(sp, f"is_{name}")(i):
            return name
    return "normal"


def _sentencepiece_error(message: str, cfg: TokenizerConfig) -> GptlabError:
    """SentencePiece's C++ check failures, as one line naming the vocab size that works."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return GptlabError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus' characters",
            f"use at least {too_small.group(1)}",
        )
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        return GptlabError(
            f"tokenizer.vocab_size={cfg.vocab_size} is more than SentencePiece can learn from this corpus",
            f"use at most {too_large.group(1)}, or train on more text",
        )
    return GptlabError(f"SentencePiece training failed: {message.splitlines()[0]}")
