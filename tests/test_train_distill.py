"""Logit distillation while training (train.teacher): the student's loss mixes cross-entropy with the KL
divergence from a frozen teacher's next-token distributions."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics
from helpers import tiny_config as config  # the student: 2 x 32, context 32

from gptlab.errors import GptlabError
from gptlab.runs import load_run
from gptlab.train import train


def losses(run_dir) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(run_dir)]


def kl_from(teacher, student, x) -> float:
    with torch.no_grad():
        t, s = teacher(x)[0].log_softmax(-1).flatten(0, 1), student(x)[0].log_softmax(-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_weight_zero_is_plain_training(make_export_run, tiny_shards, tmp_path, single_thread):
    plain = tmp_path / "plain"
    train(config(tiny_shards, plain), verbose=False)
    taught = tmp_path / "taught"
    train(config(tiny_shards, taught, f"--train.teacher={str(make_export_run('teacher'))!r}", "--train.distill_weight=0"),
          verbose=False)
    assert losses(taught) == pytest.approx(losses(plain), abs=1e-6)


def test_a_copy_of_the_teacher_starts_at_zero_kl_and_a_student_moves_towards_its_teacher(make_export_run, tiny_shards,
                                                                                          tmp_path, single_thread):
    teacher_run = make_export_run("teacher")
    teacher, _, _ = load_run(teacher_run)
    # weight 1: the loss is T^2 KL alone; a student that starts as the teacher has nothing to learn
    copy = tmp_path / "copy"
    train(config(tiny_shards, copy, f"--train.teacher={str(teacher_run)!r}", "--train.distill_weight=1",
                 f"--train.init_from={str(teacher_run)!r}", "--train.max_steps=1", "--train.lr=1e-9"), verbose=False)
    assert losses(copy)[0] == pytest.approx(0.0, abs=1e-6)

    # from scratch, with T = 2: after 60 steps the student is closer to its teacher than plain training brings it
    x = torch.randint(0, teacher.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, extra in {"taught": [f"--train.teacher={str(teacher_run)!r}", "--train.distill_weight=1",
                                   "--train.distill_temperature=2"], "plain": []}.items():
        train(config(tiny_shards, tmp_path / name, "--train.max_steps=60", "--train.eval_every=60", *extra), verbose=False)
        runs[name] = kl_from(teacher, load_run(tmp_path / name, "last")[0], x)
    fresh = kl_from(teacher, load_run(copy, "last")[0], x)
    assert fresh == pytest.approx(0.0, abs=1e-5)
    assert runs["taught"] < 0.75 * runs["plain"], runs  # measured: 0.46 vs 0.86
    summary = json.loads((tmp_path / "taught" / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])  # validation stays the student's own cross-entropy


def test_a_teacher_with_another_tokenizer_or_a_shorter_context_is_one_line(make_export_run, tiny_shards, tmp_path,
                                                                           tiny_corpus_text):
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    other = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="char"))
    with pytest.raises(GptlabError, match="has another tokenizer than the shards"):
        train(config(tiny_shards, tmp_path / "a", f"--train.teacher={str(make_export_run('char-teacher', tokenizer=other))!r}"),
              verbose=False)
    with pytest.raises(GptlabError, match="reads 64 tokens, fewer than the student's model.context_length=128"):
        train(config(tiny_shards, tmp_path / "b", f"--train.teacher={str(make_export_run('teacher'))!r}",
                     "--model.context_length=128"), verbose=False)
