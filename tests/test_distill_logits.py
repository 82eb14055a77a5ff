"""Teacher logits stored offline (`gptlab distill TEACHER --logits DATA_DIR`): the teacher's top-k
log-probabilities at every position of the train split, read with each batch so that logit distillation trains
without the teacher in memory (train.teacher = the folder)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics
from helpers import tiny_config as config  # the student: 2 x 32, context 32

from gptlab.cli import main
from gptlab.data.loader import BatchLoader, TokenSplit, iter_eval_batches
from gptlab.data.teacher_logits import TeacherLogits, is_teacher_logits
from gptlab.distill import logits as distill_logits
from gptlab.distill.logits import teacher_windows, write_teacher_logits
from gptlab.errors import GptlabError
from gptlab.runs import load_run
from gptlab.train import resume_config, train


@pytest.fixture(scope="module")
def whole_vocabulary(make_export_run, tiny_shards, tmp_path_factory):
    """(teacher run, stored folder): a teacher of context 32 read in non-overlapping windows (stride 32), k = all 400
    tokens -- exactly what a live teacher sees of a student's sequential windows of 32."""
    teacher = make_export_run("teacher-32", context_length=32)
    out = tmp_path_factory.mktemp("logits") / "whole"
    write_teacher_logits(str(teacher), tiny_shards, out, top_k=1000, batch_size=16, precision="fp32", stride=32, verbose=False)
    return teacher, out


@pytest.fixture(scope="module")
def top_8(make_export_run, tiny_shards, tmp_path_factory):
    """(teacher run, stored folder): the default teacher (context 64, stride 32), its top 8."""
    teacher = make_export_run("teacher")
    out = tmp_path_factory.mktemp("logits") / "top8"
    write_teacher_logits(str(teacher), tiny_shards, out, top_k=8, batch_size=4, precision="fp32", verbose=False)
    return teacher, out


def first_loss(run_dir) -> float:
    return float(read_metrics(run_dir)[0]["loss"])


def test_windows_keep_every_position_once_each_after_at_least_half_a_context():
    for tokens, context, stride in [(100, 32, 16), (97, 32, 32), (33, 32, 16), (20, 32, 16), (1000, 64, 7)]:
        kept = []
        for start, length, keep in teacher_windows(tokens, context, stride):
            assert start >= 0 and start + length <= tokens and length == min(context, tokens)
            kept += [(p, p - start + 1) for p in range(start + keep, start + length)]  # (position, tokens it saw)
        assert [p for p, _ in kept] == list(range(tokens))
        assert all(seen >= context - stride + 1 for p, seen in kept if p >= context)


def test_the_format_is_the_top_k_in_float16_and_small_ids(top_8, tiny_shards):
    _, out = top_8
    info = json.loads((out / "teacher_logits.json").read_text())
    split = TokenSplit(tiny_shards, "train")
    assert info["k"] == 8 and info["positions"] == len(split) and info["stride"] == 32 and info["context"] == 64
    assert len(info["shards"]) == len(split.shards) > 1
    logits = TeacherLogits(out)
    ids, logp = logits.read(0, 5)
    assert ids.dtype == np.uint16 and logp.dtype == np.float16 and ids.shape == logp.shape == (5, 8)
    assert bool((np.diff(logp.astype(np.float32), axis=1) <= 0).all())  # most likely first
    assert bool((np.exp(logp.astype(np.float32)).sum(1) <= 1 + 1e-3).all())
    # 8 ids (2 bytes) and 8 log-probabilities (2 bytes) a token, plus the .npy headers
    assert info["bytes"] == pytest.approx(32 * len(split), rel=0.05)


def test_rows_across_shard_boundaries_are_the_teachers_own_predictions(top_8, tiny_shards):
    """Each row is the teacher's prediction at that position of the split read as one array: near a shard
    boundary its context runs back into the previous shard (shards read alone would give other rows)."""
    teacher_run, out = top_8
    teacher, _, _ = load_run(teacher_run)
    split, logits = TokenSplit(tiny_shards, "train"), TeacherLogits(out)
    boundary = split.starts[1]  # 1,024
    ids, logp = logits.read(boundary - 6, 12)  # rows of two shards
    plan = teacher_windows(len(split), 64, 32)
    for row, position in enumerate(range(boundary - 6, boundary + 6)):
        start = next(s for s, n, keep in plan if s + keep <= position < s + n)
        x = torch.from_numpy(split.read(start, 64).astype(np.int64))[None]
        with torch.no_grad():
            expected = teacher(x)[0][0, position - start].log_softmax(-1).topk(8)
        assert ids[row].tolist() == expected.indices.tolist()
        assert logp[row].astype(np.float32) == pytest.approx(expected.values.numpy(), abs=2e-2)

    # the loader hands each batch the rows of exactly its x's positions: sequential windows start at k x 32
    loader = BatchLoader(tiny_shards, batch_size=40, seq_len=32, mode="sequential", shuffle=False, teacher_logits=logits)
    x, y, (batch_ids, batch_logp) = loader.next_batch()
    assert batch_ids.shape == batch_logp.shape == (40, 32, 8) and batch_ids.dtype == torch.int64
    row = boundary // 32 - 1  # the window [992, 1024) ends at the boundary; its last target is the next shard's first token
    assert y[row, -1].item() == split.read(boundary, 1)[0]
    assert batch_ids[row].tolist() == logits.read(row * 32, 32)[0].tolist()
    assert batch_logp[row].numpy() == pytest.approx(logits.read(row * 32, 32)[1].astype(np.float32))


def test_stored_logits_of_the_whole_vocabulary_give_the_live_teachers_loss(whole_vocabulary, tiny_shards, tmp_path,
                                                                           single_thread):
    teacher, stored = whole_vocabulary
    runs = {}
    for name, source in {"live": teacher, "stored": stored}.items():
        runs[name] = tmp_path / name
        train(config(tiny_shards, runs[name], f"--train.teacher={str(source)!r}", "--train.distill_weight=1",
                     "--train.loader='sequential'", "--train.max_steps=1"), verbose=False)
    live, stored_loss = first_loss(runs["live"]), first_loss(runs["stored"])
    assert live > 0.5  # a random student far from its teacher
    assert stored_loss == pytest.approx(live, abs=1e-3)  # float16 log-probabilities (measured: 0.63249 vs 0.63262)


def test_a_student_moves_towards_its_teacher_from_its_top_8(top_8, tiny_shards, tmp_path, single_thread):
    teacher_run, stored = top_8
    teacher, _, _ = load_run(teacher_run)
    x = torch.cat([x for x, _ in iter_eval_batches(tiny_shards, "val", batch_size=8, seq_len=32, max_batches=1)])

    def kl_from_teacher(run) -> float:
        student, _, _ = load_run(run, "last")
        with torch.no_grad():
            t, s = teacher(x)[0].log_softmax(-1).flatten(0, 1), student(x)[0].log_softmax(-1).flatten(0, 1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean").item()

    kl = {}
    for name, extra in {"stored": [f"--train.teacher={str(stored)!r}", "--train.distill_weight=1",
                                   "--train.distill_temperature=2"], "plain": []}.items():
        train(config(tiny_shards, tmp_path / name, "--train.max_steps=40", "--train.eval_every=40", *extra), verbose=False)
        kl[name] = kl_from_teacher(tmp_path / name)
        assert all(math.isfinite(float(r["loss"])) for r in read_metrics(tmp_path / name))
    assert kl["stored"] < 0.8 * kl["plain"], kl  # measured: 0.48 vs 0.78


def test_a_run_trained_from_stored_logits_resumes_exactly(top_8, tiny_shards, tmp_path, single_thread):
    _, stored = top_8
    taught = [f"--train.teacher={str(stored)!r}", "--train.distill_weight=0.7"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(config(tiny_shards, whole, *taught), verbose=False)
    train(config(tiny_shards, halves, *taught), on_step=lambda step: "interrupted" if step == 4 else None, verbose=False)
    train(resume_config(halves), resume=True, verbose=False)
    assert [r["loss"] for r in read_metrics(halves)] == [r["loss"] for r in read_metrics(whole)]


def test_an_interrupted_write_leaves_nothing_that_loads_and_continues(make_export_run, top_8, tiny_shards, tmp_path,
                                                                      monkeypatch):
    teacher, whole = top_8
    out = tmp_path / "logits"
    writes = 0

    def interrupt_after_a_few(*args):
        nonlocal writes
        writes += 1
        if writes > 12:
            raise KeyboardInterrupt
        put(*args)

    put = distill_logits._put
    monkeypatch.setattr(distill_logits, "_put", interrupt_after_a_few)
    monkeypatch.setattr(distill_logits, "SAVE_EVERY_S", 0.0)  # progress saved after every batch
    with pytest.raises(KeyboardInterrupt):
        write_teacher_logits(str(teacher), tiny_shards, out, top_k=8, batch_size=4, precision="fp32", verbose=False)
    assert not is_teacher_logits(out)
    with pytest.raises(GptlabError, match="are not finished"):
        train(config(tiny_shards, tmp_path / "run", f"--train.teacher={str(out)!r}"), verbose=False)

    monkeypatch.setattr(distill_logits, "_put", put)
    result = write_teacher_logits(str(teacher), tiny_shards, out, top_k=8, batch_size=4, precision="fp32", verbose=False)
    assert result["resumed_at"] > 0 and is_teacher_logits(out)
    again, once = TeacherLogits(out), TeacherLogits(whole)
    assert np.array_equal(again.read(0, len(once))[0], once.read(0, len(once))[0])
    assert np.array_equal(again.read(0, len(once))[1], once.read(0, len(once))[1])
    with pytest.raises(GptlabError, match="already holds teacher logits"):
        write_teacher_logits(str(teacher), tiny_shards, out, top_k=8, verbose=False)


def test_the_command_writes_them_and_says_what_it_wrote(make_export_run, tiny_shards, tmp_path, capsys):
    out = tmp_path / "logits"
    assert main(["distill", str(make_export_run("teacher")), "--logits", str(tiny_shards), "--logits-out", str(out),
                 "--top-k", "4", "--batch-size", "16", "-q"]) == 0
    printed = capsys.readouterr().out
    positions = len(TokenSplit(tiny_shards, "train"))
    assert f"wrote the top 4 log-probabilities of {make_export_run('teacher')} at {positions:,} positions" in printed
    assert f"--train.teacher={out}" in printed and TeacherLogits(out).k == 4


# --------------------------------------------------------------------------- bad input


def test_a_teacher_with_another_tokenizer_is_one_line(make_export_run, tiny_shards, tiny_corpus_text, tmp_path, capsys):
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    other = make_export_run("char-teacher", tokenizer=train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="char")))
    assert main(["distill", str(other), "--logits", str(tiny_shards), "--logits-out", str(tmp_path / "x"), "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert "has another tokenizer than the shards" in error and "sequence-level distillation (gptlab distill --prompts) " \
        "works across tokenizers" in error and len(error.splitlines()) == 1
    assert main(["distill", str(other)]) == 2
    assert "needs --prompts FILE and --out FILE" in capsys.readouterr().err


def test_stored_logits_from_other_shards_another_tokenizer_or_for_conversations_are_one_line(
        top_8, tiny_shards, tiny_corpus, tiny_tokenizer, chat_shards, make_export_run, tmp_path):
    from gptlab.config import load_config
    from gptlab.data import prepare_data

    _, stored = top_8
    other_shards = tmp_path / "other"  # the same text and tokenizer, split otherwise
    prepare_data(load_config(None, [f"--data.sources=[{{path = {str(tiny_corpus)!r}}}]", f"--data.out_dir={str(other_shards)!r}",
                                    "--data.val_fraction=0.4", "--data.workers=1"]), tiny_tokenizer)
    with pytest.raises(GptlabError, match=f"written for other shards \\({tiny_shards}\\) than the ones in {other_shards}"):
        train(config(other_shards, tmp_path / "a", f"--train.teacher={str(stored)!r}"), verbose=False)

    retokenized = tmp_path / "retokenized"
    shutil.copytree(stored, retokenized)
    info = json.loads((retokenized / "teacher_logits.json").read_text())
    (retokenized / "teacher_logits.json").write_text(json.dumps({**info, "tokenizer_checksum": "0" * 64}))
    with pytest.raises(GptlabError, match="were written with another tokenizer than the shards"):
        train(config(tiny_shards, tmp_path / "b", f"--train.teacher={str(retokenized)!r}"), verbose=False)

    with pytest.raises(GptlabError, match="holds conversations"):
        train(config(chat_shards, tmp_path / "c", f"--train.teacher={str(stored)!r}"), verbose=False)
    with pytest.raises(GptlabError, match="holds conversations"):
        write_teacher_logits(str(make_export_run("teacher")), chat_shards, tmp_path / "d", verbose=False)
