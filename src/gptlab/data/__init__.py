"""The data stage: documents -> token shards (prepare), shards -> batches (loader), and a report (inspect).

Folder layout written by `prepare_data` (cfg.data.out_dir):
    train_000000.bin ...   llm.c-format token shards (see shards.py)
    val_000000.bin ...
    tokenizer.json         a copy of the tokenizer that made them
    config.toml            the resolved config
    meta.json              written last: sources, split sizes, tokenizer checksum

The loader needs torch and is imported on first use, so preparing data (and its
worker processes) never pays for importing torch.
"""

from gptlab.data.meta import check_tokenizer, load_meta
from gptlab.data.shards import read_shard, token_dtype, write_shard

__all__ = [
    "BatchLoader",
    "check_tokenizer",
    "inspect_data",
    "iter_eval_batches",
    "load_meta",
    "prepare_data",
    "read_shard",
    "token_dtype",
    "training_loader",
    "write_shard",
]

_LAZY = {
    "BatchLoader": "gptlab.data.loader",
    "iter_eval_batches": "gptlab.data.loader",
    "training_loader": "gptlab.data.loader",
    "prepare_data": "gptlab.data.prepare",
    "inspect_data": "gptlab.data.inspect",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptlab.data' has no attribute {name!r}")
