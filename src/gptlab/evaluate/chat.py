"""Held-out loss on the assistant's tokens of conversations: how well a model writes the replies it is shown.

Each conversation is scored alone, in one row from its first token (never packed behind another, so
a number does not depend on which conversations share a row or in what order they come), with the
model's context holding all of it. Only the tokens the mask marks are targets:

    chat   the run's chat format (tokenizer/chat.py): <|role|> content <|end|> per message; targets are the
           assistant's content and its <|end|>, exactly what fine-tuning learns (the same ids and mask)
    text   for a base model, which never saw the chat tokens: the messages as plain text, after the run's
           start token (generate.start_id), each followed by a newline; the assistant's content and the
           newline after it (the EOS after the last message) are the targets. The assistant's text is
           then scored given the same conversation as the chat format gives it, so the two compare.

    loss           = sum of -ln p(target) / targets                       (nats per assistant token)
    bits per byte  = sum of -ln p(target) / (ln 2 * UTF-8 bytes of the assistant's messages)

The end token covers no bytes but is scored (knowing where a reply ends is part of writing it), as
the EOS is for text (evaluate/scoring.py). Sums are kept per conversation in float64 and added in
file order, so the result does not depend on the batch size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gptlab.config import DataConfig
from gptlab.errors import GptlabError
from gptlab.evaluate.scoring import token_nll
from gptlab.tokenizer.chat import CHAT_TOKENS, ChatFormat, has_chat_tokens

TEXT_FIX = "--eval.chat_format=text scores the assistant's text after the conversation as plain text"


def render_text(tokenizer, messages: Sequence[dict], data: DataConfig | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of the messages as plain text (see the module docstring): what a base model reads."""
    from gptlab.generate import start_id

    start = start_id(tokenizer, data)
    ids, mask = ([start], [0]) if start is not None else ([], [])
    last = len(messages) - 1
    pieces = tokenizer.encode_batch([m["content"] + ("\n" if m["role"] != "assistant" else "") for m in messages])
    newline = tokenizer.encode("\n")
    for i, (m, piece) in enumerate(zip(messages, pieces)):
        if m["role"] != "assistant":  # encoded with its newline, as a prompt to a base model is
            ids += piece
            mask += [0] * len(piece)
            continue
        end = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) if i == last else newline
        ids += piece + end
        mask += [1] * (len(piece) + len(end))
    return ids, mask


def chat_renderer(tokenizer, as_chat: bool | None, what: str = "the run"):
    """render(messages) -> (ids, mask) for `as_chat` (None: the chat format, which a run without chat tokens cannot take)."""
    if as_chat is None and not has_chat_tokens(tokenizer):
        raise GptlabError(f"{what} has no chat tokens ({', '.join(CHAT_TOKENS)}): it is a base model, not a chat model",
                          f"fine-tune it first (gptlab sft --base RUN --data CONVERSATIONS.jsonl), or {TEXT_FIX}")
    if as_chat is False:
        return None
    return ChatFormat.of(tokenizer, what).render


@torch.no_grad()
def score_masked(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, where: Sequence[str] | None = None,
                 batch_size: int = 16, topk: Sequence[int] = (1, 5, 10), precision: str = "fp32",
                 progress: bool = False, name: str = "conversations") -> dict:
    """Sum of -ln p over the targets of every (ids, mask) row: target i is ids[i] where mask[i] = 1 (i >= 1),
    predicted from ids[:i]. Rows are batched by length; returns {"nll", "tokens", "hits": {k: count}}."""

    context = model.cfg.context_length
    for i, (ids, _) in enumerate(rows):
        if len(ids) - 1 > context:
            label = where[i] if where is not None else f"conversation {i}"
            raise GptlabError(f"the conversation at {label} has {len(ids):,} tokens, more than fit in the model's "
                              f"context of {context} (+1)", "shorten it or leave it out of the evaluation file")
    device = next(model.parameters()).device
    ks = tuple(sorted(set(topk)))
    nll = np.zeros(len(rows), dtype=np.float64)
    hits = {k: 0 for k in ks}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch: little padding
    total = sum(int(np.sum(m[1:])) for _, m in rows)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=name, disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            width = max(len(rows[i][0]) for i in batch) - 1
            x = np.zeros((len(batch), max(width, 1)), dtype=np.int64)
            y = np.full_like(x, -1)
            for r, i in enumerate(batch):
                ids, mask = np.asarray(rows[i][0], dtype=np.int64), np.asarray(rows[i][1], dtype=bool)
                x[r, : len(ids) - 1] = ids[:-1]
                y[r, : len(ids) - 1] = np.where(mask[1:], ids[1:], -1)
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            logits, nll_per_token = token_nll(model, x, y, precision)
            scored = y >= 0
            for i, row_nll in zip(batch, nll_per_token.double().sum(dim=1).tolist()):
                nll[i] = row_nll
            if ks:
                top = logits.topk(min(max(ks), logits.size(-1)), dim=-1).indices
                rank_hit = (top == y[..., None]) & scored[..., None]
                for k in ks:
                    hits[k] += int(rank_hit[..., :k].any(dim=-1).sum())
            bar.update(int(scored.sum()))
    finally:
        model.train(was_training)
        bar.close()
    tokens = total
    if not tokens:
        raise GptlabError(f"{name} has no assistant tokens to score", "give conversations with assistant replies")
    return {"nll": math.fsum(nll.tolist()), "tokens": tokens, "hits": hits}


def _summary(score: dict, num_bytes: int, **fields) -> dict:
    loss = score["nll"] / score["tokens"]
    return {**fields, "tokens": score["tokens"], "bytes": num_bytes,
            "bpb": score["nll"] / (math.log(2) * num_bytes) if num_bytes else None,
            "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "topk": {str(k): h / score["tokens"] for k, h in score["hits"].items()}, "topk_by_context": []}


def evaluate_conversations(model, tokenizer, conversations: list, *, as_chat: bool | None = None,
                           data: DataConfig | None = None, name: str = "conversations", what: str = "the run",
                           **kwargs) -> dict:
    """Assistant-token loss, bits per byte and top-k accuracy of `conversations` (text/conversations.py's
    Conversation, or lists of messages). as_chat: True/None the chat format (None: an error where the
    tokenizer has no chat tokens), False plain text (render_text, after data's start token)."""
    if not conversations:
        raise GptlabError(f"{name} holds no conversations", "give a file of conversation records")
    render = chat_renderer(tokenizer, as_chat, what)
    messages = [getattr(c, "messages", c) for c in conversations]
    rows = [render(m) if render else render_text(tokenizer, m, data) for m in messages]
    where = [getattr(c, "where", f"{name} #{i}") for i, c in enumerate(conversations)]
    score = score_masked(model, rows, where=where, name=name, **kwargs)
    num_bytes = sum(len(m["content"].encode("utf-8")) for ms in messages for m in ms if m["role"] == "assistant")
    return _summary(score, num_bytes, name=name, kind="conversations", format="chat" if render else "text",
                    conversations=len(conversations))


def normalize_conversations(conversations: list, text=None) -> list:
    """The conversations with `text` (a run's [text] section) applied to every message, as `data prepare` did."""
    from gptlab.text import Normalizer

    if text is not None:
        normalize = Normalizer(text)
        for c in conversations:
            c.messages = [{**m, "content": normalize(m["content"])} for m in c.messages]
    return conversations


def evaluate_conversation_file(model, tokenizer, path: str | os.PathLike, *, normalize=None, **kwargs) -> dict:
    """evaluate_conversations on every record of a conversation file (a folder or a glob), as `data prepare`
    reads it; `normalize` (a run's [text] section) is applied to every message, as preparing the data did."""
    from gptlab.files import require_file
    from gptlab.text import read_conversations

    if not any(c in str(path) for c in "*?[") and not str(path).startswith("hf:"):
        require_file(path, "conversation file")
    conversations = normalize_conversations(read_conversations(path), normalize)
    return {**evaluate_conversations(model, tokenizer, conversations, name=str(path), **kwargs), "source": str(path)}


def evaluate_conversation_split(model, tokenizer, data_dir: str | Path, split: str = "val", **kwargs) -> dict:
    """The assistant-token loss of a prepared conversation folder's split (data/conversations.py), each
    conversation with the ids and mask it was prepared with; bytes from meta.json."""
    from gptlab.data import check_tokenizer, load_meta
    from gptlab.data.conversations import ConversationSplit

    meta = load_meta(data_dir)
    check_tokenizer(data_dir, tokenizer)
    if split not in meta["splits"]:
        raise GptlabError(f"{data_dir} has no split {split!r}", f"choose one of: {', '.join(meta['splits'])}")
    if not meta["splits"][split]["documents"]:
        raise GptlabError(f"the {split} split of {data_dir} holds no conversations", "choose another --split")
    part = ConversationSplit(data_dir, split, model.cfg.context_length)
    rows = []
    for i in range(len(part)):
        a, b = int(part.starts[i]), int(part.starts[i + 1])
        rows.append((part.tokens.read(a, b - a).astype(np.int64), part.mask[a:b]))
    name = f"{data_dir}:{split}"
    score = score_masked(model, rows, where=[str(w) for w in part.where], name=name, **kwargs)
    return _summary(score, meta["splits"][split].get("bytes") or 0, name=name, kind="conversations", format="chat",
                    conversations=len(part))
