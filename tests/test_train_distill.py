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

from gptlab.data.loader import iter_eval_batches
from gptlab.errors import GptlabError
from gptlab.runs import load_run
from gptlab.train import resume_config, train


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


# --------------------------------------------------------------------------- the divergences


def test_beta_zero_and_one_are_the_forward_and_reverse_kl_and_between_a_jsd_bounded_by_log_two():
    from gptlab.train.distillation import divergence

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g).log_softmax(-1), (3 * torch.randn(5, 7, generator=g)).log_softmax(-1)
    s, t = student.exp(), teacher.exp()
    assert divergence(student, teacher, 0.0) == pytest.approx((t * (teacher - student)).sum(-1), abs=1e-6)
    assert divergence(student, teacher, 1.0) == pytest.approx((s * (student - teacher)).sum(-1), abs=1e-6)
    m = (s + t) / 2
    jsd = 0.5 * (t * (teacher - m.log())).sum(-1) + 0.5 * (s * (student - m.log())).sum(-1)
    assert divergence(student, teacher, 0.5) == pytest.approx(jsd, abs=1e-6)
    assert bool((divergence(student, teacher, 0.5) <= math.log(2) + 1e-6).all())
    for beta in (0.0, 0.3, 1.0):
        assert divergence(teacher, teacher, beta) == pytest.approx(torch.zeros(5), abs=1e-6)
    # the JSD moves from the forward KL's side to the reverse KL's: its gradient's sign matches both ends'
    assert all(bool((divergence(student, teacher, b) > 0).all()) for b in (0.1, 0.5, 0.9))


def test_a_top_k_teacher_over_the_whole_vocabulary_is_the_full_divergence():
    from gptlab.train.distillation import divergence, top_k_buckets

    g = torch.Generator().manual_seed(1)
    student_logits, teacher_logits = torch.randn(2, 3, 11, generator=g), 2 * torch.randn(2, 3, 11, generator=g)
    teacher_logp = teacher_logits.log_softmax(-1)
    full = divergence(student_logits.log_softmax(-1), teacher_logp, 0.0)
    ids = teacher_logp.topk(11).indices
    s, t = top_k_buckets(student_logits, ids, teacher_logp.gather(-1, ids), 1.0)
    assert divergence(s, t, 0.0) == pytest.approx(full, abs=1e-4)  # the tail bucket is (almost) empty
    # top 3 of 11: the tail bucket counts what the student puts outside the teacher's three
    ids = teacher_logp.topk(3).indices
    s, t = top_k_buckets(student_logits, ids, teacher_logp.gather(-1, ids), 1.0)
    assert s.exp().sum(-1) == pytest.approx(torch.ones(2, 3), abs=1e-5)
    assert t.exp().sum(-1) == pytest.approx(torch.ones(2, 3), abs=1e-5)
    assert bool((divergence(s, t, 0.0) <= full + 1e-5).all())  # merging buckets never adds divergence


# --------------------------------------------------------------------------- on-policy


def test_the_student_writes_its_on_policy_rows_after_a_real_prompt(make_export_run):
    from gptlab.train.distillation import LiveTeacher

    teacher, _, _ = load_run(make_export_run("teacher"))
    student, _, _ = load_run(make_export_run("teacher"))
    on_policy = LiveTeacher(teacher, weight=0.5, temperature=1.0, beta=0.5, on_policy=0.5, new_tokens=10, seed=3)
    x = torch.randint(0, teacher.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    new_x, new_y, written = on_policy.rollout(student, x, y, micro_step=0)
    assert torch.equal(new_x[2:], x[2:]) and torch.equal(new_y[2:], y[2:])  # half the rows stay real
    assert torch.equal(new_x[:2, :22], x[:2, :22])  # the written rows keep 32 - 10 real tokens as their prompt
    assert not torch.equal(new_x[:2, 22:], x[:2, 22:])
    assert bool((new_y[:2] == -1).all())  # no cross-entropy on the student's own text
    assert written[:2, 21:].all() and not written[:2, :21].any() and not written[2:].any()
    # seeded by (seed, step, micro-step): the same step draws the same rows again, the next one others
    again = on_policy.rollout(student, x, y, micro_step=0)[0]
    on_policy.step = 1
    assert torch.equal(again, new_x) and not torch.equal(on_policy.rollout(student, x, y, micro_step=0)[0], new_x)
    # a student that is the teacher has nothing to learn from its own rows either
    logits = student(new_x)[0]
    loss = on_policy.loss(new_x, new_y, logits, torch.tensor(0.0), written)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_on_policy_training_moves_the_student_towards_its_teacher_and_resumes_exactly(make_export_run, tiny_shards,
                                                                                       tmp_path, single_thread):
    teacher_run = make_export_run("teacher")
    teacher, _, _ = load_run(teacher_run)
    on_policy = [f"--train.teacher={str(teacher_run)!r}", "--train.distill_on_policy=1", "--train.distill_new_tokens=16",
                 "--train.distill_beta=0.1", "--train.distill_weight=1"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(config(tiny_shards, whole, "--train.max_steps=40", "--train.eval_every=20", *on_policy), verbose=False)
    train(config(tiny_shards, tmp_path / "plain", "--train.max_steps=40", "--train.eval_every=20"), verbose=False)
    x = next(iter_eval_batches(tiny_shards, "val", batch_size=8, seq_len=32))[0]  # real text, held out
    taught, plain = (kl_from(teacher, load_run(tmp_path / n, "last")[0], x) for n in ("whole", "plain"))
    assert taught < 0.8 * plain, (taught, plain)  # measured: 0.53 vs 0.80
    # stopped at step 20 and resumed: the student draws the same samples, so the run ends where the whole one did
    train(config(tiny_shards, halves, "--train.max_steps=40", "--train.eval_every=20", *on_policy),
          on_step=lambda step: "interrupted" if step == 20 else None, verbose=False)
    train(resume_config(halves), resume=True, verbose=False)
    assert losses(halves) == pytest.approx(losses(whole), abs=1e-5)


def test_on_policy_distillation_from_stored_logits_is_one_line(tiny_shards, tmp_path):
    stored = tmp_path / "logits"
    stored.mkdir()
    (stored / "teacher_logits.json").write_text("{}")
    with pytest.raises(GptlabError, match="distill_on_policy needs the teacher itself"):
        train(config(tiny_shards, tmp_path / "a", f"--train.teacher={str(stored)!r}", "--train.distill_on_policy=0.5"),
              verbose=False)
