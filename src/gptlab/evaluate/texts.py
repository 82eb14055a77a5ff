"""Where scored tokens come from: a string, any text source gptlab.text reads, or a prepared split.

Each returns `StreamScore.summary(bytes)` plus where the numbers came from. The bytes are those of
the text the tokens encode:

    evaluate_text   the string's UTF-8 bytes, all of them (no EOS added)
    evaluate_source the documents as `gptlab data prepare` reads them (gptlab.text's iter_documents:
                    the source's document boundaries, separators dropped, the run's normalisation with
                    its Gutenberg header stripping, surrounding whitespace stripped), each followed by
                    EOS as prepare writes them: the same bytes meta.json counts for a split, so a file
                    and the same file prepared as a split score the same
    evaluate_split  meta.json's byte count of the split
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from gptlab.config import DataConfig, SourceConfig, TextConfig
from gptlab.errors import GptlabError
from gptlab.evaluate.scoring import score_stream
from gptlab.generate import start_id

ENCODE_BATCH = 256  # documents encoded per call


def _score(model, tokenizer, ids, num_bytes: int | None, name: str, data: DataConfig | None = None, **kwargs) -> dict:
    start = start_id(tokenizer, data)  # what the text starts after: as the run's documents, as a sampled prompt
    if start is None and len(ids) and num_bytes:
        # Nothing to predict the first token from: it goes unscored, and so do its bytes.
        num_bytes -= len(tokenizer.decode([int(ids[0])]).encode("utf-8"))
    result = score_stream(model, ids, start, name=name, **kwargs).summary(num_bytes)
    return {"name": name, **result}


def evaluate_text(model, tokenizer, text: str, *, name: str = "text", **kwargs) -> dict:
    """Loss, perplexity, bits per byte and top-k accuracy of `text`, every byte of it counted once."""
    return {**_score(model, tokenizer, tokenizer.encode(text), len(text.encode("utf-8")), name, **kwargs), "kind": "text"}


def evaluate_source(
    model,
    tokenizer,
    source: str | SourceConfig,
    *,
    text: TextConfig | None = None,
    add_bos: bool = False,
    add_eos: bool = True,
    max_tokens: int | None = None,
    **kwargs,
) -> dict:
    """Score a text source (file, folder, glob, .jsonl/.parquet, hf:NAME) document by document.

    `text` is the normalisation to apply (a run's cfg.text); add_bos/add_eos as the run's data was
    prepared. With max_tokens, whole documents are taken until that many tokens are reached.
    """
    from gptlab.text import iter_documents

    if isinstance(source, str):
        source = SourceConfig(path=source)
    text = text or TextConfig()
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    suffix = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
    pieces, num_tokens, num_bytes, documents = [], 0, 0, 0
    docs = (doc for _, doc in iter_documents([source], text))
    while max_tokens is None or num_tokens < max_tokens:
        batch = list(itertools.islice(docs, ENCODE_BATCH))
        if not batch:
            break
        for doc, ids in zip(batch, tokenizer.encode_batch(batch)):
            pieces.append(np.asarray(prefix + ids + suffix, dtype=np.int64))
            num_tokens += len(pieces[-1])
            num_bytes += len(doc.encode("utf-8"))
            documents += 1
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    name = source.label or source.path
    result = _score(model, tokenizer, ids, num_bytes, name, DataConfig(add_bos=add_bos, add_eos=add_eos), **kwargs)
    return {**result, "kind": "text", "documents": documents,
            "normalize": list(text.normalize)}


def evaluate_split(model, tokenizer, data_dir: str | Path, split: str = "val", *, max_tokens: int | None = None, **kwargs) -> dict:
    """Score a split of a prepared data folder (its own tokenizer checked against the model's)."""
    from gptlab.data import check_tokenizer, load_meta
    from gptlab.data.loader import TokenSplit

    meta = load_meta(data_dir)
    check_tokenizer(data_dir, tokenizer)
    info = meta["splits"].get(split)
    if info is None:
        raise GptlabError(f"{data_dir} has no split {split!r}", f"choose one of: {', '.join(meta['splits'])}")
    tokens = TokenSplit(data_dir, split)
    n = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
    ids = tokens.read(0, n).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    # A prefix of the split: its bytes estimated at the split's bytes per token.
    num_bytes = info.get("bytes") or None
    estimated = bool(num_bytes) and n < len(tokens)
    if estimated:
        num_bytes = round(num_bytes * n / len(tokens))
    prepared = DataConfig(add_bos=meta.get("add_bos", False), add_eos=meta.get("add_eos", True))
    result = _score(model, tokenizer, ids, num_bytes, f"{data_dir}:{split}", prepared, **kwargs)
    return {**result, "kind": "split", "bytes_estimated": estimated}


def evaluate_data(model, tokenizer, path: str | SourceConfig, *, split: str = "val", text: TextConfig | None = None,
                  add_bos: bool = False, add_eos: bool = True, max_tokens: int | None = None, **kwargs) -> dict:
    """A prepared data folder (it holds meta.json) is scored as a split; anything else as a text source
    (a SourceConfig says how to cut it into documents, as in [[data.sources]])."""
    if isinstance(path, (str, Path)) and (Path(path) / "meta.json").is_file():
        return evaluate_split(model, tokenizer, path, split, max_tokens=max_tokens, **kwargs)
    return evaluate_source(model, tokenizer, path, text=text, add_bos=add_bos, add_eos=add_eos, max_tokens=max_tokens, **kwargs)
