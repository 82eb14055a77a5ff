"""Replies from a chat model: a conversation's prompt ids, its history fitted to the context, a reply that ends at <|end|>.

    chat_reply(model, tokenizer, messages, cfg=None, on_token=None, on_note=None) -> str
        the assistant's next message; on_token(text) streams it as it is generated
    chat_replies(model, tokenizer, messages, cfg=None, on_token=None, on_note=None) -> list[str]
        cfg.num_samples replies (best first with cfg.best_of); on_token(i, text) streams reply i
    chat_prompt(tokenizer, messages, context_length, max_new_tokens) -> ChatPrompt
        the prompt ids (ChatFormat.prompt) of the messages that fit, and how many turns were dropped
    read_messages(path, replace_last_reply=True) -> list[(where, messages)]
        conversations to reply to, from a JSON file (a list of messages, or records) or JSON lines

`messages` is a list of {"role": "system" | "user" | "assistant", "content": text}, as
OpenAI's API and transformers' apply_chat_template take them. A conversation longer than the
context loses its oldest turns (a user message and the replies after it), never a system
message, with a note "dropped N oldest turns to fit the context"; a last turn that does not fit
on its own is a one-line error.

Room for the reply: max_new_tokens, but at most half the context, so a long max_new_tokens
on a small model still leaves history to talk about. The reply may then grow into whatever room
the history leaves, up to max_new_tokens; it never outgrows the context (sampling's fresh start
from the last 3/4 of the context would cut the system message off).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate.sampling import generate
from gptlab.text.conversations import conversation_from_record
from gptlab.tokenizer.chat import ChatFormat

# The reply is kept at most this share of the context (the rest is for the conversation).
REPLY_SHARE = 0.5


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]  # the prompt: the kept messages, then <|assistant|>
    messages: list[dict]  # the messages kept, in order
    dropped: int  # oldest turns dropped to fit the context
    max_new_tokens: int  # room for the reply: the run's max_new_tokens, or less where the context ends first
    stop_ids: set[int]  # the tokens that end the reply (ChatFormat.stop_ids)

    @property
    def note(self) -> str | None:
        """ "dropped N oldest turns to fit the context", or None where nothing was dropped."""
        if not self.dropped:
            return None
        return f"dropped {self.dropped} oldest turn{'s' if self.dropped > 1 else ''} to fit the context"


def check_messages(messages, where: str = "messages") -> list[dict]:
    """The messages as {"role", "content"} dicts (roles as conversation data reads them: "human" is user, ...);
    a one-line error naming the message that is not one."""
    if isinstance(messages, dict):  # one message alone
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise GptlabError(f"{where}: expected a list of messages, got {type(messages).__name__}",
                          'give [{"role": "user", "content": "..."}, ...]')
    messages = conversation_from_record({"messages": list(messages)}, where, need_reply=False).messages
    if not any(m["role"] != "system" for m in messages):
        raise GptlabError(f"{where}: nothing to reply to (no user message)", 'add {"role": "user", "content": "..."}')
    return messages


def _turns(messages: Sequence[dict]) -> list[list[int]]:
    """The indices of each turn: a user message and the messages after it (system messages belong to none)."""
    turns: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if not turns or m["role"] == "user":
            turns.append([i])
        else:
            turns[-1].append(i)
    return turns


def chat_prompt(tokenizer, messages, context_length: int, max_new_tokens: int, what: str = "this tokenizer") -> ChatPrompt:
    """The prompt asking for the next assistant message, with the oldest turns dropped until it leaves the reply
    room in the context; `what` names the run in the error for a tokenizer without chat tokens."""
    fmt = ChatFormat.of(tokenizer, what)
    messages = check_messages(messages)
    reply_room = max(1, min(max_new_tokens, int(context_length * REPLY_SHARE)))
    budget = context_length - reply_room - 1  # 1: the <|assistant|> that asks for the reply
    lengths = fmt.turn_lengths(messages)
    turns = _turns(messages)
    total, dropped, gone = sum(lengths), 0, set()
    while total > budget and dropped < len(turns) - 1:
        gone.update(turns[dropped])
        total -= sum(lengths[i] for i in turns[dropped])
        dropped += 1
    if total > budget:
        last = sum(lengths[i] for i in turns[-1])
        system = total - last
        raise GptlabError(
            f"the last turn takes {last} tokens{f' and the system message {system}' if system else ''}: with "
            f"{reply_room} kept for the reply, that does not fit model.context_length={context_length}",
            f"shorten the message{' or the system message' if system else ''}, or lower max_new_tokens (--max-new-tokens)")
    kept = [m for i, m in enumerate(messages) if i not in gone]
    ids = fmt.prompt(kept)
    return ChatPrompt(ids, kept, dropped, min(max_new_tokens, context_length - len(ids)), fmt.stop_ids)


def _print_note(note: str) -> None:
    print(f"note: {note}", file=sys.stderr, flush=True)


def chat_replies(
    model,
    tokenizer,
    messages,
    cfg: SampleConfig | None = None,
    *,
    on_token: Callable[[int, str], None] | None = None,
    on_note: Callable[[str], None] | None = _print_note,
    what: str = "this tokenizer",
) -> list[str]:
    """cfg.num_samples next assistant messages of the conversation (with cfg.best_of, best first), each ending
    before <|end|>; on_token(i, text) streams reply i. A dropped-turns note goes to on_note (stderr by default)."""
    cfg = cfg or SampleConfig()
    prompt = chat_prompt(tokenizer, messages, model.cfg.context_length, cfg.max_new_tokens, what)
    if prompt.note and on_note is not None:
        on_note(prompt.note)
    cfg = cfg.model_copy(update={"max_new_tokens": prompt.max_new_tokens})
    return generate(model, tokenizer, [prompt.ids], cfg, on_token, stop_ids=prompt.stop_ids)


def chat_reply(
    model,
    tokenizer,
    messages,
    cfg: SampleConfig | None = None,
    *,
    on_token: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = _print_note,
    what: str = "this tokenizer",
) -> str:
    """The assistant's next message in the conversation `messages`; on_token(text) streams it as it comes.

        reply = chat_reply(model, tokenizer, [{"role": "user", "content": "Tell me a story."}],
                           SampleConfig(temperature=0.7, max_new_tokens=200))
    """
    cfg = (cfg or SampleConfig()).model_copy(update={"num_samples": 1})
    stream = None if on_token is None else (lambda i, text: on_token(text))
    return chat_replies(model, tokenizer, messages, cfg, on_token=stream, on_note=on_note, what=what)[0]


def read_messages(path: str | Path, replace_last_reply: bool = True) -> list[tuple[str, list[dict]]]:
    """(where, messages) of each conversation in a file: a .json file holding a list of messages, one record
    ({"messages": [...]}, or any shape conversation data takes) or a list of records; a .jsonl file, one record
    a line. With replace_last_reply, a conversation that ends with assistant messages (a training record) loses
    them, to be replied to in their place."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"messages file not found: {path}", "give a .json list of messages or a .jsonl of conversations")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            value = json.loads(text)
            if isinstance(value, list) and value and all(isinstance(v, dict) and ("role" in v or "from" in v) for v in value):
                value = {"messages": value}  # a list of messages: one conversation
            records = [(str(path), value)] if not isinstance(value, list) else [(f"{path} record {n}", v) for n, v in enumerate(value)]
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})", "fix the file") from None
    if not records:
        raise GptlabError(f"{path} holds no conversation", 'write [{"role": "user", "content": "..."}]')
    out = []
    for where, record in records:
        messages = conversation_from_record(record, where, need_reply=False).messages
        while replace_last_reply and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        out.append((where, check_messages(messages, where)))
    return out
