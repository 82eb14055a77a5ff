"""The chat format: role tokens, a conversation rendered to ids and a loss mask, and the same as a Jinja template.

A conversation is its messages one after another, each as

    <|role|> content <|end|>

with no BOS, separator or newline in between, so the Jinja template (CHAT_TEMPLATE,
what a Hugging Face export puts in tokenizer_config.json) renders to the same ids:
`apply_chat_template` splits the text at the special tokens and encodes each piece
alone, as `render` does. A reply is asked for with `<|assistant|>` and ends with `<|end|>`.

The loss mask marks the tokens the model learns to write: the assistant's content
and its `<|end|>` (so it learns to stop), nothing else (nanochat's and TRL's
"assistant-only loss").

A tokenizer takes the format when it holds the four tokens. `with_chat_tokens`
adds them to one trained without (new ids after the last one; the model's
embedding grows to match when it is fine-tuned); SentencePiece cannot add
symbols to a trained model, so one must be trained with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from gptlab.errors import GptlabError
from gptlab.tokenizer.base import SpecialTokens, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_TOKEN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
NO_CHAT_FIX = "fine-tune it into a chat model first: gptlab sft --base RUN --data CONVERSATIONS.jsonl"


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None and t in tokenizer.special_tokens for t in CHAT_TOKENS)


@dataclass(frozen=True)
class ChatFormat:
    """Renders conversations with a tokenizer that holds the chat tokens (build it with `ChatFormat.of`)."""

    tokenizer: Tokenizer
    role_ids: dict[str, int]
    end_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, what: str = "this tokenizer") -> "ChatFormat":
        """The format for `tokenizer`; a one-line error naming `what` (a run, a file) where it has no chat tokens."""
        if not has_chat_tokens(tokenizer):
            raise GptlabError(f"{what} has no chat tokens ({', '.join(CHAT_TOKENS)}): it is not a chat model", NO_CHAT_FIX)
        ids = {t: tokenizer.token_to_id(t) for t in CHAT_TOKENS}
        return cls(tokenizer, {role: ids[token] for role, token in ROLE_TOKENS.items()}, ids[END_TOKEN])

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 where ids[i] is a token the model learns to write (assistant content and <|end|>)."""
        ids: list[int] = []
        mask: list[int] = []
        contents = self.tokenizer.encode_batch([m["content"] for m in messages])
        for message, content in zip(messages, contents):
            learn = int(message["role"] == "assistant")
            ids += [self.role_ids[message["role"]], *content, self.end_id]
            mask += [0] + [learn] * (len(content) + 1)
        return ids, mask

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        """The ids that ask for the next assistant message: the conversation so far, then <|assistant|>."""
        return self.render(messages)[0] + [self.role_ids["assistant"]]

    def turn_lengths(self, messages: Sequence[dict]) -> list[int]:
        """Tokens each message takes, role and end tokens included."""
        return [len(c) + 2 for c in self.tokenizer.encode_batch([m["content"] for m in messages])]

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a reply: <|end|>, and the document end a base model learnt."""
        return {self.end_id} | ({self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set())


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the chat tokens it lacks added as special tokens after its last id (existing ids unchanged),
    and the chat template in its metadata; the tokenizer itself where it has them all."""
    from gptlab.tokenizer.io import tokenizer_from_json

    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        if tokenizer.chat_template is None:
            tokenizer = tokenizer_from_json(tokenizer.to_json())
            tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer
    clash = [t for t in missing if tokenizer.token_to_id(t) is not None]
    if clash or tokenizer.kind == "sentencepiece":
        why = (f"{clash[0]!r} is an ordinary token of its vocabulary" if clash
               else "a trained SentencePiece model cannot take new special tokens")
        raise GptlabError(f"this {tokenizer.kind} tokenizer cannot take the chat template: {why}",
                          "train the base model's tokenizer with the chat tokens: "
                          f"--tokenizer.extra_special_tokens='{json.dumps(list(CHAT_TOKENS))}'")
    d = tokenizer.to_file_dict()
    specials = SpecialTokens(tokenizer.specials.bos, tokenizer.specials.eos, tokenizer.specials.pad,
                             (*tokenizer.specials.extra, *missing))
    meta = {**tokenizer.meta(), **specials.to_meta(), "chat_template": CHAT_TEMPLATE}
    d["added_tokens"] = d.get("added_tokens", []) + [
        {"id": tokenizer.vocab_size + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(missing)]
    d["model"] = {**d["model"], "gptlab": meta}
    if tokenizer.kind == "char":  # its vocab lists the specials too
        d["model"]["vocab"] = {**d["model"]["vocab"], **{t: tokenizer.vocab_size + i for i, t in enumerate(missing)}}
    return tokenizer_from_json(json.dumps(d, ensure_ascii=False), source=f"{tokenizer.kind} tokenizer + chat tokens")
