"""HellaSwag (Zellers et al. 2019): pick the most likely of four endings, scored as completions.

The method is lm-evaluation-harness's:

    context  = preprocess(activity_label + ": " + ctx)      ctx = ctx_a + " " + ctx_b.capitalize() (official file)
    ending i = " " + preprocess(endings[i])
    score    = sum of log p(ending token | context, earlier ending tokens)
    acc      = argmax of the score is the label
    acc_norm = argmax of score / len(preprocess(endings[i])) in characters   (lm-eval's acc_norm)

plus acc_per_token (score / ending tokens, what nanoGPT/llm.c call acc_norm). The context starts
as `gptlab sample` starts a prompt: after the token every training document followed (the run's BOS
or EOS, gptlab.generate.start_id); one too long for the model's window loses its
start, so that it and its longest ending fit.

Batched and shared: items are sorted by length, and a batch of them runs as one forward pass over
their contexts, which fills a KV cache, then one pass per ending position (1st, 2nd, 3rd, 4th ending
of every item) continuing from that cache. Each context is thus computed once, not four times (about
half the tokens of HellaSwag are context). The output layer runs only where an ending token is
predicted: at small widths it is much of the model's work, and context positions need no logits.

Files: the official rowanz/hellaswag JSONL (ctx_a, ctx_b, activity_label, endings, label), the
preprocessed JSONL in ../shared/data/hellaswag ({"idx", "activity_label", "ctx", "label",
"endings"}), or `hf:Rowan/hellaswag` (the validation split, through `datasets`, where there is a network).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptlab.errors import GptlabError
from gptlab.generate import prompt_ids

HF_PREFIX = "hf:"
LOCAL_HINT = "pass a local file instead, e.g. --hellaswag ../shared/data/hellaswag/hellaswag_val_preprocessed.jsonl"


@dataclass(frozen=True)
class HellaSwagItem:
    context: str
    endings: tuple[str, ...]
    label: int


def preprocess(text: str) -> str:
    """lm-eval's cleaning: WikiHow's [title]/[step] markers out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def item_from_record(record: dict) -> HellaSwagItem:
    """One item from an official, preprocessed or Hugging Face record; KeyError/ValueError/TypeError if malformed."""
    if "ctx_a" in record:
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    else:
        ctx = record["ctx"]
    if not isinstance(ctx, str):
        raise TypeError("ctx is not a string")
    label_text = record.get("activity_label")
    context = preprocess(f"{label_text}: {ctx}" if label_text else ctx)
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise ValueError("endings must be a list of 4 strings")
    label = int(record["label"])  # the HF dataset stores it as a string
    if not 0 <= label < 4:
        raise ValueError(f"label {label} is not 0-3")
    return HellaSwagItem(context, tuple(preprocess(e) for e in endings), label)


def load_hellaswag(source: str | Path, limit: int | None = None) -> list[HellaSwagItem]:
    """The first `limit` items (all if None) of a HellaSwag JSONL file or `hf:NAME` dataset's validation split."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        return _load_hf(source[len(HF_PREFIX):], limit)
    path = Path(source)
    if not path.is_file():
        raise GptlabError(f"HellaSwag file not found: {path}", LOCAL_HINT if "hellaswag" not in str(path) else "check the path")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                items.append(item_from_record(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
                what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                raise GptlabError(f"{path}:{lineno}: not a HellaSwag item ({what})",
                                  "each line must be a JSON object with ctx (or ctx_a/ctx_b), 4 endings and a label 0-3") from None
    if not items:
        raise GptlabError(f"{path} holds no HellaSwag items", "give the validation JSONL")
    return items


def _load_hf(name: str, limit: int | None) -> list[HellaSwagItem]:
    import logging

    import datasets  # a dependency of gptlab; importing it sets the hub's log level, so it comes first

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, its retry warnings would precede our one line
    try:
        split = "validation" if limit is None else f"validation[:{limit}]"
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # no network, no such dataset: the datasets library raises many kinds
        raise GptlabError(f"cannot load hf:{name} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no details'})",
                          LOCAL_HINT) from None
    finally:
        hub_log.setLevel(level)
    return [item_from_record(dict(r)) for r in rows]


# --------------------------------------------------------------------------- scoring


def logits_at(model, idx: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Logits [M, V] at the positions where `select` ([B, T] bool) is True, in row-major order.

    A GPT's output layer sees only the selected hidden states (a pre-hook picks them out), so the
    vocabulary-sized matmul is paid only where a prediction is needed. A model without an `lm_head`
    runs whole and is indexed afterwards.
    """
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Module):
        return model(idx)[0][select]
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][select],))
    try:
        logits, _ = model(idx)
    finally:
        handle.remove()
    return logits


def encode_item(tokenizer, item: HellaSwagItem, context_length: int, data=None) -> tuple[list[int], list[list[int]]]:
    """(context tokens, the 4 endings' tokens), the context cut from the left so that it and its longest
    ending fit the model's window (the last ending token is only a target: T + 1 tokens fit a window of T).
    The context is encoded as `gptlab sample` encodes a prompt (after the run's start token)."""
    context = prompt_ids(tokenizer, item.context, data)
    endings = [tokenizer.encode(" " + e)[:context_length] for e in item.endings]  # too long: the ending's start
    keep = max(1, context_length + 1 - max(map(len, endings)))
    return context[-keep:], endings


def _padded(rows: list[list[int]], device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) [len(rows), longest]: rows padded with 0 on the right (or left), valid marking real tokens."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, cols] = torch.tensor(row, dtype=torch.long)
        valid[r, cols] = True
    return ids.to(device), valid.to(device)


def _score_shared(model, encoded: list[tuple[list[int], list[list[int]]]], device) -> np.ndarray:
    """[items, 4] summed ending log-probabilities, each context run once: contexts fill a KV cache (left
    padded), then each ending continues it in turn, the cache rewound to the context between endings.
    The final norm's output is caught by a hook, so logits are computed only where an ending token is
    predicted (the cache path itself returns the last position's only)."""
    from gptlab.model import KVCache

    contexts = [ctx for ctx, _ in encoded]
    ctx_ids, ctx_valid = _padded(contexts, device, left=True)
    longest_ending = max(len(e) for _, endings in encoded for e in endings)
    # slack: a window layer's ring keeps the context's last window while an ending is written past it
    cache = KVCache(len(encoded), ctx_ids.size(1) + longest_ending, device, slack=longest_ending)
    last, _ = model(ctx_ids, cache=cache, valid=ctx_valid)
    first_logprobs = F.log_softmax(last[:, -1].float(), dim=-1)  # predicts each ending's first token
    context_end = cache.length
    hidden: list[torch.Tensor] = []
    handle = model.norm_f.register_forward_hook(lambda module, args, out: hidden.append(out))
    scores = torch.zeros(len(encoded), 4, dtype=torch.float64, device=device)
    try:
        for j in range(4):
            endings = [endings[j] for _, endings in encoded]
            first = torch.tensor([e[0] for e in endings], device=device)
            scores[:, j] = first_logprobs.gather(1, first[:, None]).squeeze(1).double()
            if max(map(len, endings)) == 1:
                continue
            ids, valid = _padded([e[:-1] for e in endings], device)  # the last token is only a target
            targets, _ = _padded([e[1:] for e in endings], device)
            cache.length = context_end  # rewind: the previous ending is forgotten
            hidden.clear()
            model(ids, cache=cache, valid=valid)
            logits = model.lm_head(hidden[-1][valid])
            token_logprob = -F.cross_entropy(logits.float(), targets[valid], reduction="none")
            scores[:, j].index_add_(0, valid.nonzero()[:, 0], token_logprob.double())
    finally:
        handle.remove()
    return scores.cpu().numpy()


def _score_flat(model, encoded: list[tuple[list[int], list[list[int]]]], device) -> np.ndarray:
    """[items, 4] summed ending log-probabilities, one right-padded row per context + ending (any model)."""
    rows = [(ctx + e, len(e)) for ctx, endings in encoded for e in endings]
    x, valid = _padded([ids[:-1] for ids, _ in rows], device)
    y = torch.full_like(x, -1)
    for r, (ids, n_end) in enumerate(rows):
        y[r, len(ids) - 1 - n_end : len(ids) - 1] = torch.tensor(ids[-n_end:], device=device)  # the ending's tokens
    select = y >= 0
    token_logprob = -F.cross_entropy(logits_at(model, x, select).float(), y[select], reduction="none")
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, select.nonzero()[:, 0], token_logprob.double())
    return sums.reshape(len(encoded), 4).cpu().numpy()


@torch.no_grad()
def score_hellaswag(
    model,
    tokenizer,
    items: list[HellaSwagItem],
    *,
    batch_size: int = 16,
    context_length: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    share_context: bool = True,
    data=None,
) -> dict:
    """acc, acc_norm and acc_per_token over `items`; batch_size items per forward pass.

    `data` is the run's [data] section: each context starts after the token its documents started after
    (gptlab.generate.start_id; None: as `data prepare`'s defaults put it).

    share_context (a gptlab GPT only): each context runs once for its 4 endings (KV cache); otherwise
    each context + ending is its own row. Both give the same log-probabilities.
    """
    from gptlab.device import autocast
    from gptlab.model import GPT

    if not items:
        raise GptlabError("no HellaSwag items to score", "give a file with at least one item")
    T = context_length or model.cfg.context_length
    device = next(model.parameters()).device
    encoded = [encode_item(tokenizer, item, T, data) for item in items]
    score_batch = _score_shared if share_context and isinstance(model, GPT) else _score_flat
    # Longest first, so each batch's rows have similar lengths and little padding.
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]) + max(map(len, encoded[i][1])), reverse=True)
    logprob = np.zeros((len(items), 4), dtype=np.float64)
    started = time.perf_counter()
    bar = tqdm(total=len(items), unit="item", desc="hellaswag", disable=not progress, dynamic_ncols=True)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        with autocast(device, precision):
            logprob[batch] = score_batch(model, [encoded[i] for i in batch], device)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - started
    tokens = np.array([[len(e) for e in endings] for _, endings in encoded], dtype=np.float64)
    chars = np.array([[len(e) for e in item.endings] for item in items], dtype=np.float64)
    labels = np.array([item.label for item in items])

    def accuracy(scores: np.ndarray) -> float:
        return float((scores.argmax(axis=1) == labels).mean())

    return {
        "items": len(items),
        "acc": accuracy(logprob),
        "acc_norm": accuracy(logprob / np.maximum(chars, 1)),
        "acc_per_token": accuracy(logprob / tokens),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(items) / seconds, 1) if seconds else None,
        "logprobs": logprob,  # [N, 4] summed ending log-probabilities (not written to eval.json)
    }
