"""Instruction following: does a generated reply do what its instruction asked?

An instruction record is a conversation (any shape text/conversations.py reads) whose last message is
the assistant's reference reply, with the constraints the instruction states as an extra field:

    {"messages": [{"role": "user", "content": "Write a story about a girl named Lily that uses the words
                   'ball', 'garden' and 'sad'."}, {"role": "assistant", "content": "<the story>"}],
     "constraints": {"words": ["ball", "garden", "sad"], "name": "Lily"}}

`follows(text, constraints)` checks one text. The rule is strict and literal, so a number it gives
means the same thing for every model:

    words   each word is in the text as a whole word, case-insensitive: "Ball," and "ball's" count for
            "ball", "balls", "football" and "ballet" do not. No inflections: the instruction names a form,
            and the builder (gptlab.chat.instructions) takes that form from the reference story itself,
            so the reference always follows its own instruction.
    name    the name is in the text as a whole word (the same rule).

`instruction_following(model, tokenizer, conversations, sample_cfg)` generates one reply per instruction
and returns the share of replies that meet all their constraints ("rate"), the share per kind of
constraint, and a few examples. A chat run is prompted through its chat format; a base run (no chat
tokens) gets the same instruction as plain text followed by a newline, so base and fine-tuned models
are asked the same thing in the only form each can read.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from gptlab.config import DataConfig, SampleConfig
from gptlab.errors import GptlabError

CONSTRAINT_KINDS = {"words": "a list of words the reply must use", "name": "a name the reply must mention"}
LETTER = r"[^\W\d_]"  # a letter of any script: a word ends where letters end


@lru_cache(maxsize=4096)
def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!{LETTER}){re.escape(word)}(?!{LETTER})", re.IGNORECASE)


def has_word(text: str, word: str) -> bool:
    """`word` occurs in `text` as a whole word (not inside a longer run of letters), case-insensitive."""
    return _word_pattern(word).search(text) is not None


def check_constraints(constraints, where: str = "the record") -> dict:
    """The constraints as {"words": [...], "name": str} (each optional); a one-line error naming `where` otherwise."""
    fix = 'give "constraints": {"words": ["ball", "garden"], "name": "Lily"} (either key may be left out)'
    if not isinstance(constraints, dict) or not constraints:
        raise GptlabError(f"{where}: has no constraints to check a reply against", fix)
    unknown = sorted(set(constraints) - set(CONSTRAINT_KINDS))
    if unknown:
        raise GptlabError(f"{where}: unknown constraint {unknown[0]!r}",
                          "use " + "; ".join(f"{k!r}: {v}" for k, v in CONSTRAINT_KINDS.items()))
    words = constraints.get("words", [])
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise GptlabError(f"{where}: constraints.words is not a list of words", fix)
    name = constraints.get("name")
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise GptlabError(f"{where}: constraints.name is not a name", fix)
    return {k: v for k, v in (("words", [w.strip() for w in words]), ("name", name and name.strip())) if v}


def follows(text: str, constraints: dict) -> dict:
    """Which of `constraints` `text` meets: {"ok": all met, "words": all words used, "words_used": k,
    "words_asked": n, "name": the name present, "missing": what is not there}; keys of absent kinds left out."""
    constraints = check_constraints(constraints, "constraints")
    out: dict = {"missing": []}
    if "words" in constraints:
        used = [w for w in constraints["words"] if has_word(text, w)]
        out.update(words=len(used) == len(constraints["words"]), words_used=len(used),
                   words_asked=len(constraints["words"]))
        out["missing"] += [w for w in constraints["words"] if w not in used]
    if "name" in constraints:
        out["name"] = has_word(text, constraints["name"])
        if not out["name"]:
            out["missing"].append(constraints["name"])
    out["ok"] = not out["missing"]
    return out


def instruction_prompt(messages: Sequence[dict]) -> list[dict]:
    """The messages that ask (all but the reference reply at the end)."""
    return list(messages[:-1])


def plain_prompt(messages: Sequence[dict]) -> str:
    """What a base model is given instead of the chat format: the messages' text, each followed by a newline."""
    return "".join(m["content"] + "\n" for m in messages)


def read_instructions(path: str, limit: int | None = None) -> list:
    """The first `limit` records of an instruction file, each checked: a reference reply last, constraints that parse."""
    from gptlab.files import require_file
    from gptlab.text.conversations import read_conversations

    if not any(c in str(path) for c in "*?[") and not str(path).startswith("hf:"):
        require_file(path, "instruction file")
    conversations = read_conversations(path)[:limit]
    for c in conversations:
        if c.messages[-1]["role"] != "assistant":
            raise GptlabError(f"{c.where}: the last message is not the assistant's reference reply",
                              "end each instruction record with the assistant's reply")
        if "constraints" not in c.extra:
            raise GptlabError(f"{c.where}: has no \"constraints\" field to check a reply against",
                              'add "constraints": {"words": [...], "name": "..."} to each record')
        c.extra["constraints"] = check_constraints(c.extra["constraints"], c.where)
    return conversations


def generate_replies(model, tokenizer, conversations: list, sample_cfg: SampleConfig, as_chat: bool,
                     data: DataConfig | None = None, batch_size: int = 16) -> list[str]:
    """One reply per conversation to all of its messages but the last. Batches of `batch_size` prompts, batch k
    drawn with seed sample_cfg.seed + k, so a reply does not depend on how many instructions follow it; a chat
    reply ends at <|end|> (or the base model's EOS), a plain one at EOS."""
    import torch

    from gptlab.generate import prompt_ids, sample_tokens

    if as_chat:
        from gptlab.tokenizer.chat import ChatFormat

        chat = ChatFormat.of(tokenizer, "the run's tokenizer")
        prompts = [chat.prompt(instruction_prompt(c.messages)) for c in conversations]
        stop = chat.stop_ids
    else:
        prompts = [prompt_ids(tokenizer, plain_prompt(instruction_prompt(c.messages)), data) for c in conversations]
        stop = tokenizer.eos_id
    device = next(model.parameters()).device
    replies = []
    for k, first in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator(device=device).manual_seed(sample_cfg.seed + k)
        new, _ = sample_tokens(model, prompts[first : first + batch_size], sample_cfg.max_new_tokens,
                               temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                               eos_id=stop, generator=generator)
        replies += [tokenizer.decode(ids) for ids in new]
    return replies


def instruction_following(model, tokenizer, conversations: list, sample_cfg: SampleConfig | None = None,
                          as_chat: bool | None = None, *, data: DataConfig | None = None, batch_size: int = 16,
                          examples: int = 3, name: str = "instructions") -> dict:
    """Generate a reply to each instruction (conversations read by `read_instructions`) and check it.

    as_chat: True prompts through the chat format, False as plain text (the instruction and a newline, after
    the run's start token); None: the chat format where the tokenizer has the chat tokens, else plain text.
    Returns rate (all constraints met), rates per kind (name; words: all of them; word: each one), the
    references' own rate (1.0 for a set whose references follow their instructions), and `examples`
    instruction/reply pairs.
    """
    from gptlab.tokenizer.chat import has_chat_tokens

    if not conversations:
        raise GptlabError(f"{name} holds no instructions", "give a file of instruction records")
    sample_cfg = sample_cfg or SampleConfig()
    if as_chat is None:
        as_chat = has_chat_tokens(tokenizer)
    for c in conversations:
        c.extra["constraints"] = check_constraints(c.extra.get("constraints"), c.where)
    replies = generate_replies(model, tokenizer, conversations, sample_cfg, as_chat, data, batch_size)
    checks = [follows(r, c.extra["constraints"]) for r, c in zip(replies, conversations)]
    references = [follows(c.messages[-1]["content"], c.extra["constraints"])["ok"] for c in conversations]

    def share(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    asked = sum(c.get("words_asked", 0) for c in checks)
    return {
        "source": name,
        "instructions": len(conversations),
        "format": "chat" if as_chat else "text",
        "rate": share([c["ok"] for c in checks]),
        "rates": {"name": share([c["name"] for c in checks if "name" in c]),
                  "words": share([c["words"] for c in checks if "words" in c]),
                  "word": sum(c.get("words_used", 0) for c in checks) / asked if asked else None},
        "reference_rate": share(references),
        "reply_words": sum(len(r.split()) for r in replies) / len(replies),
        "sampling": {"temperature": sample_cfg.temperature, "top_k": sample_cfg.top_k, "top_p": sample_cfg.top_p,
                     "max_new_tokens": sample_cfg.max_new_tokens, "seed": sample_cfg.seed},
        "examples": [{"where": c.where, "instruction": c.messages[-2]["content"] if len(c.messages) > 1 else "",
                      "reply": r, "ok": k["ok"], "missing": k["missing"]}
                     for c, r, k in list(zip(conversations, replies, checks))[:examples]],
    }
