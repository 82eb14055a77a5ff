"""meta.json: what a prepared data folder holds, and the checks made before using it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptlab.errors import GptlabError

META_FILE = "meta.json"
PROGRESS_FILE = ".progress.json"


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json of a prepared data folder; it is written last, so its absence means prepare did not finish."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        hint = "prepare did not finish; re-run it" if (Path(data_dir) / PROGRESS_FILE).exists() else "run gptlab data prepare first"
        raise GptlabError(f"{data_dir} has no meta.json, so it is not a prepared data folder", hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is corrupt ({e})", "re-run gptlab data prepare") from None


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """A split's shard files: listed in meta.json, or for a plain llm.c folder (no meta.json), found by name."""
    data_dir = Path(data_dir)
    if (data_dir / META_FILE).exists() or (data_dir / PROGRESS_FILE).exists():
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise GptlabError(f"{data_dir} has no split {split!r}", f"choose one of: {', '.join(meta['splits'])}")
        return [data_dir / s["file"] for s in meta["splits"][split]["shards"]]
    if not data_dir.is_dir():
        raise GptlabError(f"data folder not found: {data_dir}", "run gptlab data prepare, or check train.data_dir")
    files = sorted(data_dir.glob(f"*{split}_*.bin")) or sorted(data_dir.glob(f"*{split}.bin"))
    if not files:
        raise GptlabError(f"{data_dir} has neither meta.json nor {split} shards", "run gptlab data prepare first")
    return files


def check_tokenizer(data_dir: str | os.PathLike, tokenizer) -> None:
    """Refuse to pair shards with a tokenizer other than the one that made them."""
    meta = load_meta(data_dir)
    made_with = meta["tokenizer_checksum"]
    if tokenizer.checksum != made_with:
        raise GptlabError(
            f"the shards in {data_dir} were made with another tokenizer "
            f"(checksum {made_with[:12]}, this one {tokenizer.checksum[:12]})",
            f"use {Path(data_dir) / 'tokenizer.json'}, or re-run gptlab data prepare with this tokenizer",
        )
