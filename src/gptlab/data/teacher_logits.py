"""A teacher's top-k next-token log-probabilities stored beside prepared shards (`gptlab distill --logits`), so
that logit distillation trains without the teacher in memory (train.teacher = this folder).

(The format and the reader are being written; `is_teacher_logits` is the contract the trainer relies on.)
"""

from __future__ import annotations

import os
from pathlib import Path

INFO_FILE = "teacher_logits.json"


def is_teacher_logits(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder of stored teacher logits (not a run directory)."""
    return path is not None and (Path(path) / INFO_FILE).is_file()
