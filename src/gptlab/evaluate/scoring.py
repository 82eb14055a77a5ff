"""Teacher-forced scoring of a token stream: loss, perplexity, bits per byte, top-k accuracy.

How a stream is cut (the same rule for a text, a file and a prepared split):

    stream   s = [start] + tokens         start = the token every training document followed (the run's
                                          BOS or EOS, gptlab.generate.start_id), as `gptlab sample` starts
                                          a prompt; not added when the tokens already begin with it
    window k inputs  s[kT : kT+T]         T = the model's context length; consecutive, non-overlapping
             targets s[kT+1 : kT+T+1]     the last window may be shorter (its padding is not scored)

so every token of the text is predicted exactly once, from the tokens before it in its window (at
most T of them), and every UTF-8 byte of the text is counted once:

    bits per byte = sum of -ln p(token) over all tokens / (ln 2 * UTF-8 bytes of the text)

Bits per byte do not depend on the tokenizer, which is what makes runs with different vocabularies
comparable. Special tokens (the EOS between documents) cover no bytes but are predicted and scored:
knowing where a document ends is part of modelling the text.

Sums are kept per window in float64 and added in window order, so the result does not depend on how
many windows share a forward pass (up to the kernels' own rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptlab.errors import GptlabError


def position_buckets(context_length: int) -> list[tuple[int, int]]:
    """Context sizes grouped by powers of two: [1, 1], [2, 2], [3, 4], [5, 8], ... up to the context length."""
    buckets, low = [], 1
    while low <= context_length:
        high = min(context_length, 1 if low == 1 else 2 * (low - 1))
        buckets.append((low, high))
        low = high + 1
    return buckets


@dataclass
class StreamScore:
    """Sums over every scored token; `hits[k][p]` counts targets in the top k with p + 1 tokens of context."""

    topk: tuple[int, ...]
    context_length: int
    nll: float = 0.0  # nats, summed
    tokens: int = 0
    hits: dict[int, np.ndarray] = field(default_factory=dict)
    per_position: np.ndarray | None = None  # scored tokens at each position in the window

    def __post_init__(self):
        self.hits = {k: np.zeros(self.context_length, dtype=np.int64) for k in self.topk}
        self.per_position = np.zeros(self.context_length, dtype=np.int64)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    def summary(self, num_bytes: int | None) -> dict:
        """loss, perplexity, bits per byte (given the bytes the tokens cover), top-k overall and by context size."""
        out = {
            "tokens": self.tokens,
            "bytes": num_bytes,
            "bpb": self.nll / (math.log(2) * num_bytes) if num_bytes else None,
            "loss": self.loss,
            "perplexity": math.exp(min(self.loss, 50.0)),
            "topk": {str(k): int(h.sum()) / self.tokens for k, h in self.hits.items()},
            "topk_by_context": [],
        }
        for low, high in position_buckets(self.context_length):
            n = int(self.per_position[low - 1 : high].sum())
            if n:
                row = {"context": f"{low}" if low == high else f"{low}-{high}", "tokens": n}
                row.update({f"top{k}": int(h[low - 1 : high].sum()) / n for k, h in self.hits.items()})
                out["topk_by_context"].append(row)
        return out


@torch.no_grad()
def token_nll(model, x: torch.Tensor, y: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, -ln p(y) per position; 0 where y is -1) of a batch, the model run under autocast."""
    from gptlab.device import autocast

    with autocast(x.device, precision):
        logits, _ = model(x)
    logits = logits.float()
    return logits, F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none") * (y >= 0)


def score_stream(
    model,
    tokens,
    start_id: int | None,
    *,
    batch_size: int = 16,
    context_length: int | None = None,
    topk: tuple[int, ...] | list[int] = (1, 5, 10),
    precision: str = "fp32",
    progress: bool = False,
    name: str = "text",
) -> StreamScore:
    """Score every token of `tokens` (1-D ints) in consecutive windows; see the module docstring."""

    T = context_length or model.cfg.context_length
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) and start_id is not None and tokens[0] != start_id:  # not when the text starts with BOS already
        tokens = np.concatenate([[start_id], tokens])  # the context of the first real token
    targets_total = len(tokens) - 1
    if targets_total < 1:
        raise GptlabError(f"{name} is empty: there is no token to score", "give a non-empty text")
    if targets_total < T:
        raise GptlabError(
            f"{name} has {targets_total:,} tokens to score, fewer than one window of the model's context ({T})",
            "give a longer text (bits per byte on less than a window would not be comparable)",
        )
    device = next(model.parameters()).device
    ks = tuple(sorted(set(topk)))
    score = StreamScore(ks, T)
    starts = np.arange(0, targets_total, T)
    hits = {k: torch.zeros(T, dtype=torch.long, device=device) for k in ks}
    per_position = torch.zeros(T, dtype=torch.long, device=device)
    bar = tqdm(total=targets_total, unit="tok", unit_scale=True, desc=name, disable=not progress, dynamic_ncols=True)
    for first in range(0, len(starts), batch_size):
        rows = starts[first : first + batch_size]
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for r, s in enumerate(rows):
            window = tokens[s : s + T + 1]
            x[r, : len(window) - 1] = window[:-1]
            y[r, : len(window) - 1] = window[1:]
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        logits, nll = token_nll(model, x, y, precision)
        scored = y >= 0
        for window_nll in nll.double().sum(dim=1).tolist():  # window order: batch-size independent sums
            score.nll += window_nll
        if ks:
            top = logits.topk(max(ks), dim=-1).indices  # [B, T, kmax]
            rank_hit = (top == y[..., None]) & scored[..., None]
            for k in ks:
                hits[k] += rank_hit[..., :k].any(dim=-1).sum(dim=0)
        per_position += scored.sum(dim=0)
        bar.update(int(scored.sum()))
    bar.close()
    score.tokens = targets_total
    score.per_position = per_position.cpu().numpy()
    score.hits = {k: h.cpu().numpy() for k, h in hits.items()}
    return score
