"""Tokenizers: byte-level BPE, SentencePiece, GPT-2 (tiktoken) and character level, behind one interface.

    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer, load_tokenizer

    tok = train_tokenizer(documents, TokenizerConfig(kind="bpe", vocab_size=4096))
    tok.save("tok.json")
    tok = load_tokenizer("tok.json")
    ids = tok.encode("Once upon a time")   # no BOS/EOS added; "<|endoftext|>" in text is plain text
    tok.decode(ids), tok.eos_id, tok.checksum

Each kind is saved as one self-describing JSON file: a Hugging Face
tokenizer.json for bpe, gpt2 and char (gptlab's metadata at `model.gptlab`),
or JSON around the serialized model for sentencepiece.
"""

from gptlab.tokenizer.base import MAX_VOCAB, SpecialTokens, Tokenizer
from gptlab.tokenizer.bytelevel import ByteLevelBPETokenizer, GPT2Tokenizer
from gptlab.tokenizer.char import CharTokenizer
from gptlab.tokenizer.io import (
    KINDS,
    load_tokenizer,
    planned_vocab_size,
    tokenizer_from_json,
    train_tokenizer,
    train_tokenizer_from_config,
)
from gptlab.tokenizer.spm import SentencePieceTokenizer

__all__ = [
    "KINDS",
    "MAX_VOCAB",
    "ByteLevelBPETokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "SentencePieceTokenizer",
    "SpecialTokens",
    "Tokenizer",
    "load_tokenizer",
    "planned_vocab_size",
    "tokenizer_from_json",
    "train_tokenizer",
    "train_tokenizer_from_config",
]
