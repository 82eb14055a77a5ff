"""gptlab tokenizers <-> the tokenizer files of a Hugging Face model folder.

Export: gptlab's bpe, gpt2 and char files already are Hugging Face
`tokenizer.json`s (gptlab's metadata rides along at `model.gptlab`, which
`tokenizers` ignores and which makes an exported folder import back exactly).
What is added is a post-processor that puts the run's start token before every
text (gptlab.generate.start_id: the BOS or EOS every training document followed,
none if the data put nothing there), as `gptlab sample` starts a prompt and
`gptlab eval` scores: so `tokenizer(text)`, lm-evaluation-harness and llama.cpp
see the model's inputs the way gptlab did; `tokenizer(text, add_special_tokens=False)`
gives exactly gptlab's `encode(text)`.
SentencePiece models have no exact tokenizer.json form and are refused.

A chat run's tokenizer (one with the chat tokens) also carries the chat template
(gptlab.tokenizer.chat.CHAT_TEMPLATE) in tokenizer_config.json, and its chat tokens as
additional special tokens: `apply_chat_template(messages, add_generation_prompt=True)`
gives exactly the ids `gptlab chat` prompts with (ChatFormat.prompt), since the rendered
text is split at the special tokens and each piece encoded alone, as gptlab does.

Import: a byte-level BPE with GPT-2's pre-tokenizer (GPT-2, and any folder
gptlab exported), from tokenizer.json or from GPT-2's vocab.json + merges.txt.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer, tokenizer_from_json
from gptlab.tokenizer.base import FILE_FORMAT, FILE_VERSION
from gptlab.tokenizer.chat import CHAT_TEMPLATE, END_TOKEN, has_chat_tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def special_token_ids(tok: Tokenizer, start: int | None) -> dict[str, int | None]:
    """config.json's bos/eos/pad ids; "bos" is the start token (`start`, the id of start_id), as for GPT-2
    (whose BOS is its EOS); with no start token, the tokenizer's own BOS (never added)."""
    return {"bos": tok.bos_id if start is None else start, "eos": tok.eos_id, "pad": tok.pad_id}


def chat_end_id(tok: Tokenizer) -> int | None:
    """The id of <|end|>, which ends a chat model's reply; None for a tokenizer without the chat tokens."""
    return tok.token_to_id(END_TOKEN) if has_chat_tokens(tok) else None


def stop_ids(tok: Tokenizer) -> list[int]:
    """The ids that end generation: the document EOS, and a chat model's <|end|> (generation_config.json's
    eos_token_id, GGUF's eos/eot)."""
    return list(dict.fromkeys(i for i in (tok.eos_id, chat_end_id(tok)) if i is not None))


def check_exportable(tok: Tokenizer) -> None:
    if tok.kind == "sentencepiece":
        raise GptlabError(
            "the run's tokenizer is a SentencePiece model, which has no exact tokenizer.json form",
            "export runs trained with tokenizer.kind=bpe, gpt2 or char",
        )


def hf_tokenizer_files(tok: Tokenizer, context_length: int, start: int | None) -> dict[str, dict]:
    """{file name: JSON content} of tokenizer.json, tokenizer_config.json and special_tokens_map.json;
    `start` is the id every text starts after (gptlab.generate.start_id), None for none."""
    check_exportable(tok)
    tokenizer_json = tok.to_file_dict()
    bos = tok.specials.bos
    if start is not None:
        bos = tok.decode([start])
        tokenizer_json["post_processor"] = _prepend(bos, start)
    specials = {"bos_token": bos, "eos_token": tok.specials.eos, "pad_token": tok.specials.pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    if tok.specials.extra:  # the chat tokens among them: skip_special_tokens=True drops them from a decoded reply
        specials["additional_special_tokens"] = list(tok.specials.extra)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": start is not None,  # what tokenizer.json's post-processor does, for readers of this file
        "add_eos_token": False,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if has_chat_tokens(tok):  # the template gptlab renders (ChatFormat), whatever the tokenizer's metadata holds
        config["chat_template"] = CHAT_TEMPLATE
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "special_tokens_map.json": specials}


def _prepend(token: str, token_id: int) -> dict:
    """The JSON of a `tokenizers` TemplateProcessing that puts `token` before each sequence."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, processors

    hf = HFTokenizer(models.BPE())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token}:1 $B:1", special_tokens=[(token, token_id)]
    )
    return json.loads(hf.to_str())["post_processor"]


# --------------------------------------------------------------------------- import


def tokenizer_from_hf(folder: Path, model_config: dict | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder as a gptlab tokenizer (GptlabError if gptlab cannot express it).

    Special tokens come from tokenizer_config.json / special_tokens_map.json, else from the ids in the
    model's config.json (GPT-2's own folder names its <|endoftext|> only there)."""
    tokenizer_json = _read_tokenizer_json(folder)
    tokenizer_json["post_processor"] = None  # gptlab's encode never adds tokens itself
    model = tokenizer_json.get("model") or {}
    meta = model.get("gptlab")
    if not (isinstance(meta, dict) and meta.get("format") == FILE_FORMAT):  # a foreign tokenizer: check and describe it
        _check_byte_level_bpe(tokenizer_json, folder)
        specials = _special_tokens(folder, tokenizer_json, model_config or {})
        _register_specials(tokenizer_json, specials)
        model["gptlab"] = {"format": FILE_FORMAT, "version": FILE_VERSION, "kind": "bpe", **specials}
    return tokenizer_from_json(json.dumps(tokenizer_json), source=str(folder / "tokenizer.json"))


def _read_tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GptlabError(f"{path} is corrupt ({e})", "copy the model folder again") from None
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():  # GPT-2's original files
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        return json.loads(hf.to_str())
    raise GptlabError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)",
                      "give a model folder with its tokenizer files")


def _check_byte_level_bpe(d: dict, folder: Path) -> None:
    """gptlab's byte-level BPE: BPE over GPT-2's ByteLevel pre-tokenizer, no normaliser, no prefix space."""
    model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    problem = None
    if model.get("type") != "BPE":
        problem = f"a {model.get('type')} model"
    elif pre.get("type") != "ByteLevel":
        problem = f"a {pre.get('type')} pre-tokenizer"
    elif pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problem = "a ByteLevel pre-tokenizer without GPT-2's settings"
    elif d.get("normalizer"):
        problem = f"a {d['normalizer'].get('type')} normalizer"
    if problem:
        raise GptlabError(
            f"the tokenizer in {folder} uses {problem}, which gptlab's tokenizers cannot express",
            "gptlab imports byte-level BPE tokenizers with GPT-2's pre-tokenizer (GPT-2 and gptlab exports)",
        )


def _special_tokens(folder: Path, tokenizer_json: dict, model_config: dict) -> dict:
    """bos/eos/pad as gptlab's metadata; a BOS equal to the EOS is GPT-2's way of saying "start after EOS",
    which is what gptlab does with no BOS."""
    found: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GptlabError(f"{path} is corrupt ({e})", "copy the model folder again") from None
            for role in ("bos", "eos", "pad"):
                value = d.get(f"{role}_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and role not in found:
                    found[role] = value
    by_id = {i: t for t, i in tokenizer_json["model"].get("vocab", {}).items()}
    by_id |= {t["id"]: t["content"] for t in tokenizer_json.get("added_tokens", [])}
    for role in ("bos", "eos", "pad"):
        token_id = model_config.get(f"{role}_token_id")
        if role not in found and isinstance(token_id, int) and token_id in by_id:
            found[role] = by_id[token_id]
    if found.get("bos") == found.get("eos"):
        found.pop("bos", None)
    return {"bos_token": found.get("bos"), "eos_token": found.get("eos"), "pad_token": found.get("pad"), "extra_special_tokens": []}


def _register_specials(d: dict, specials: dict) -> None:
    """gptlab keeps its special tokens among `added_tokens`; GPT-2's vocab.json folders have them only in the vocab."""
    added = d.setdefault("added_tokens", [])
    have = {t["content"] for t in added}
    vocab = d["model"].get("vocab", {})
    for token in dict.fromkeys(t for k, t in specials.items() if k != "extra_special_tokens" and t):
        if token in have:
            continue
        if token not in vocab:
            raise GptlabError(f"the special token {token!r} named by the tokenizer config is not in the vocabulary",
                              "fix tokenizer_config.json / special_tokens_map.json of the model folder")
        added.append({"id": vocab[token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
