"""Train a tokenizer of the configured kind; load any tokenizer file gptlab wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from gptlab.config import Config, TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer.base import FILE_FORMAT, FILE_VERSION, Tokenizer
from gptlab.tokenizer.bytelevel import ByteLevelBPETokenizer, GPT2Tokenizer
from gptlab.tokenizer.char import CharTokenizer
from gptlab.tokenizer.spm import SentencePieceTokenizer

KINDS: dict[str, type[Tokenizer]] = {
    "bpe": ByteLevelBPETokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "gpt2": GPT2Tokenizer,
    "char": CharTokenizer,
}


def train_tokenizer(documents: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Learn a vocabulary from `documents` (at most cfg.train_max_bytes of them); gpt2 just reads its files."""
    return KINDS[cfg.kind].train(documents, cfg)


def train_tokenizer_from_config(cfg: Config) -> Tokenizer:
    """Train cfg.tokenizer on cfg.data.sources, read and normalised as the data stage reads them."""
    from gptlab.text import iter_documents

    if cfg.tokenizer.kind != "gpt2" and not cfg.data.sources:  # gpt2 is pretrained: nothing to read
        raise GptlabError("no corpus to train the tokenizer on", "give --data PATH or set data.sources in the config")
    return train_tokenizer((doc for _, doc in iter_documents(cfg.data.sources, cfg.text)), cfg.tokenizer)


def planned_vocab_size(cfg: TokenizerConfig) -> int:
    """The vocabulary a tokenizer of `cfg` will have, before it is trained (`gptlab model info` sizes a model with it)."""
    return KINDS[cfg.kind].planned_vocab_size(cfg)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file (or a folder holding tokenizer.json, such as a prepared data dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise GptlabError(f"tokenizer file not found: {path}", "train one with `gptlab tokenizer train --out FILE`")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise GptlabError(f"cannot read tokenizer file {path}: {e}", "re-train it or copy it again") from None
    return tokenizer_from_json(text, source=str(path))


def tokenizer_from_json(text: str, source: str = "<string>") -> Tokenizer:
    """A tokenizer from its file content (what `Tokenizer.save` writes)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise GptlabError(f"tokenizer file {source} is corrupt (not JSON: {e})", "re-train it or copy it again") from None
    meta = _metadata(d)
    if meta is None:
        raise GptlabError(
            f"{source} is not a gptlab tokenizer file (no gptlab metadata)",
            "train one with `gptlab tokenizer train`",
        )
    if meta.get("version", 0) > FILE_VERSION or meta.get("kind") not in KINDS:
        raise GptlabError(
            f"tokenizer file {source} has kind {meta.get('kind')!r}, version {meta.get('version')}, which this gptlab cannot read",
            "upgrade gptlab or re-train the tokenizer",
        )
    try:
        tokenizer = KINDS[meta["kind"]].from_file_dict(d, meta)
        tokenizer.chat_template = meta.get("chat_template")
        return tokenizer
    except Exception as e:  # whatever a damaged file trips over inside the libraries
        raise GptlabError(f"tokenizer file {source} is corrupt ({type(e).__name__}: {e})", "re-train it or copy it again") from None


def _metadata(d) -> dict | None:
    """gptlab's metadata: top level (SentencePiece files) or inside "model" (Hugging Face tokenizer.json)."""
    if not isinstance(d, dict):
        return None
    for holder in (d, d.get("model")):
        meta = holder.get("gptlab") if isinstance(holder, dict) else None
        if isinstance(meta, dict) and meta.get("format") == FILE_FORMAT:
            return meta
    return None
