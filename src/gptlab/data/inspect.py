"""`gptlab data inspect DIR`: what a prepared data folder holds, as a dict and as a readable report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptlab.data.meta import check_tokenizer, load_meta, split_shards
from gptlab.data.shards import read_shard
from gptlab.tokenizer import load_tokenizer

SCAN_BLOCK = 1 << 22  # tokens counted at a time: bincount widens them to int64


def inspect_data(
    data_dir: str | os.PathLike, top: int = 20, sample_tokens: int = 200, max_scan_tokens: int | None = 200_000_000
) -> dict:
    """Token counts per split and source, bytes per token, vocabulary usage, the most frequent tokens, a sample.

    Token frequencies are counted over at most `max_scan_tokens` tokens (train first, then val).
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir / meta["tokenizer"]["file"])
    check_tokenizer(data_dir, tokenizer)
    vocab_size = tokenizer.vocab_size

    counts = np.zeros(vocab_size, dtype=np.int64)
    budget = max_scan_tokens if max_scan_tokens is not None else float("inf")
    for split in meta["splits"]:
        for path in split_shards(data_dir, split):
            tokens = read_shard(path)
            for start in range(0, len(tokens), SCAN_BLOCK):
                if budget <= 0:
                    break
                block = tokens[start : start + int(min(SCAN_BLOCK, budget))]
                counts += np.bincount(block, minlength=vocab_size)[:vocab_size]
                budget -= len(block)
    scanned = int(counts.sum())

    order = np.argsort(-counts, kind="stable")[:top]
    top_tokens = [
        {"id": int(i), "text": tokenizer.decode([int(i)]), "count": int(counts[i]), "share": counts[i] / max(scanned, 1)}
        for i in order
        if counts[i]
    ]
    sample_split = "train" if meta["splits"]["train"]["tokens"] else "val"
    first_shard = split_shards(data_dir, sample_split)[:1]
    sample = tokenizer.decode(read_shard(first_shard[0])[:sample_tokens].tolist()) if first_shard else ""
    return {
        "data_dir": str(data_dir),
        "tokenizer": {k: meta["tokenizer"][k] for k in ("kind", "vocab_size", "checksum")},
        "dtype": meta["dtype"],
        "kind": meta.get("kind", "text"),
        "splits": {
            name: {k: s[k] for k in ("tokens", "documents", "bytes", "bytes_per_token", "targets") if k in s}
            | {"shards": len(s["shards"])}
            for name, s in meta["splits"].items()
        },
        "sources": meta["sources"],
        "scanned_tokens": scanned,
        "vocab_used": int(np.count_nonzero(counts)),
        "vocab_usage": float(np.count_nonzero(counts) / vocab_size),
        "top_tokens": top_tokens,
        "sample": {"split": sample_split, "tokens": sample_tokens, "text": sample},
    }


def _table(header: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    cells = [header] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    tok = report["tokenizer"]
    out = [f"{report['data_dir']}: {tok['kind']} tokenizer, {tok['vocab_size']:,} tokens, {report['dtype']} shards", ""]
    rows = [
        [name, s["tokens"], s["documents"], s["bytes"], f"{s['bytes_per_token']:.2f}" if s["bytes_per_token"] else "-", s["shards"]]
        for name, s in report["splits"].items()
    ]
    out += [_table(["split", "tokens", "documents", "bytes", "bytes/token", "shards"], rows, right={1, 2, 3, 4, 5}), ""]
    if report.get("kind") == "chat":
        out += ["conversations: documents are conversations; bytes are what the assistant says, and the model learns "
                + ", ".join(f"{s['targets']:,} of the {s['tokens']:,} {name} tokens" for name, s in report["splits"].items())
                + " (the assistant's, each turn's <|end|> included)", ""]
    rows = [
        [s["label"], s["role"], s["weight"], s["train"]["tokens"], s["val"]["tokens"], s["train"]["documents"] + s["val"]["documents"]]
        for s in report["sources"]
    ]
    out += [_table(["source", "role", "weight", "train tokens", "val tokens", "documents"], rows, right={2, 3, 4, 5}), ""]
    out.append(
        f"vocabulary: {report['vocab_used']:,} of {tok['vocab_size']:,} ids used ({report['vocab_usage']:.1%}) "
        f"in {report['scanned_tokens']:,} tokens"
    )
    if report["top_tokens"]:
        out += ["", "most frequent tokens:"]
        rows = [[t["id"], t["count"], f"{t['share']:.2%}", repr(t["text"])] for t in report["top_tokens"]]
        out.append(_table(["id", "count", "share", "token"], rows, right={0, 1, 2}))
    sample = report["sample"]
    out += ["", f"sample ({sample['split']}, first {sample['tokens']} tokens):", sample["text"]]
    return "\n".join(out)
