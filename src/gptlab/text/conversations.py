"""Conversations as a data source: JSON records in the shapes instruction data comes in, read as messages.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}   OpenAI
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}         ShareGPT
    {"instruction": "...", "input": "...", "output": "..."}                                          Alpaca
    {"prompt": "...", "completion": "..."}                                                           pairs

Every shape becomes a list of {"role", "content"} messages with roles system, user and assistant.
A record that is none of them, an unknown role, a message that is not text, or a conversation
with no assistant turn (nothing to learn) is one error naming the file and line.
Other fields of a record (say, the constraints an instruction set checks) are kept as `extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gptlab.config import SourceConfig
from gptlab.errors import GptlabError
from gptlab.text.sources import (
    RECORD_READERS,
    _iter_hf,
    _resolve,
    _split_lines,
    read_lines,
    source_format,
    source_label,
)

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names, and a few common spellings of the three roles
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "model": "assistant", "bot": "assistant"}
SHAPES = "messages: [{role, content}], conversations: [{from, value}], {instruction, input, output} or {prompt, completion}"


@dataclass
class Conversation:
    messages: list[dict]  # {"role", "content"}
    where: str  # "file.jsonl:12": the record it came from
    extra: dict = field(default_factory=dict)  # the record's other fields


def record_shape(record: Any) -> str | None:
    """Which conversation shape a record has: "messages", "conversations", "alpaca", "pair", or None."""
    if not isinstance(record, dict):
        return None
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return key
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "pair"
    return None


_SHAPE_FIELDS = {"messages": {"messages"}, "conversations": {"conversations"},
                 "alpaca": {"instruction", "input", "output", "system"}, "pair": {"prompt", "completion", "system"}}


def conversation_from_record(record: Any, where: str, need_reply: bool = True) -> Conversation:
    """The messages of one record in any of the shapes; a one-line error naming `where` otherwise.
    need_reply=False takes a conversation with no assistant turn yet (a prompt to reply to)."""
    shape = record_shape(record)
    if shape is None:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise GptlabError(f"{where}: not a conversation (it has: {keys})", f"write each record as one of: {SHAPES}")
    if shape in ("messages", "conversations"):
        role_key, content_key = ("role", "content") if shape == "messages" else ("from", "value")
        messages = []
        for i, m in enumerate(record[shape]):
            if not isinstance(m, dict) or role_key not in m or content_key not in m:
                raise GptlabError(f"{where}: message {i} is not an object with {role_key!r} and {content_key!r}",
                                  f"write each message as {{{role_key!r}: ..., {content_key!r}: ...}}")
            role = ROLE_NAMES.get(str(m[role_key]).lower())
            if role is None:
                raise GptlabError(f"{where}: message {i} has the unknown role {m[role_key]!r}",
                                  f"use one of: {', '.join(ROLES)}")
            messages.append({"role": role, "content": m[content_key]})
    elif shape == "alpaca":
        user = record["instruction"] if not record.get("input") else f"{record['instruction']}\n\n{record['input']}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if shape in ("alpaca", "pair") and record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise GptlabError(f"{where}: message {i} ({m['role']}) holds {type(m['content']).__name__}, not text",
                              "give every message's content as a string")
    if need_reply and not any(m["role"] == "assistant" for m in messages):
        raise GptlabError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it",
                          "add the assistant's reply, or drop the record")
    extra = {k: v for k, v in record.items() if k not in _SHAPE_FIELDS[shape]}
    return Conversation(messages, where, extra)


def _records(source: SourceConfig) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a source: "file:line" for JSON lines, "file record N" otherwise."""
    fmt = source_format(source)
    if fmt == "hf":
        for n, record in enumerate(_iter_hf(source)):
            yield f"{source.path} record {n}", record
        return
    if fmt not in RECORD_READERS:
        raise GptlabError(f"{source_label(source)} is plain text, not conversations",
                          f"give conversations as .jsonl, .json or .parquet records ({SHAPES})")
    for path in _resolve(source)[1]:
        if fmt == "jsonl":
            yield from _jsonl_lines(path, source)
        else:
            for n, record in enumerate(RECORD_READERS[fmt](path, source)):
                yield f"{path} record {n}", record


def _jsonl_lines(path: Path, source: SourceConfig) -> Iterator[tuple[str, Any]]:
    import json

    for lineno, line in enumerate(_split_lines(read_lines(path, source.encoding_errors)), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}:{lineno} is not valid JSON: {e.msg} (column {e.colno})", "fix the line or the file") from None


def iter_conversations(source: SourceConfig) -> Iterator[Conversation]:
    """Every conversation of a source, in order; an empty source is an error."""
    count = 0
    for where, record in _records(source):
        count += 1
        yield conversation_from_record(record, where)
    if not count:
        raise GptlabError(f"source {source_label(source)} holds no conversations", "check the path")


def is_conversation_source(source: SourceConfig) -> bool:
    """kind = "chat", or kind = "auto" and its first record is a conversation (and has no text field)."""
    if source.kind != "auto":
        return source.kind == "chat"
    if source_format(source) not in RECORD_READERS:
        return False
    first = next(_records(source), (None, None))[1]
    return record_shape(first) is not None and not (isinstance(first, dict) and source.text_field in first)


def read_conversations(path: str | Path) -> list[Conversation]:
    """All conversations of a file (or folder, or glob), as a source of kind chat reads them."""
    return list(iter_conversations(SourceConfig(path=str(path), kind="chat")))
