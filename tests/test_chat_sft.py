"""Fine-tuning a base run on conversations (gptlab sft): the embedding grown by the chat tokens, the loss on
the assistant's tokens only, whole conversations in rows, the command end to end with exact resume, LoRA,
several processes, distillation from a chat teacher, and bad input as one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import chat_records, tiny_config, write_jsonl

from gptlab import runs
from gptlab.chat.sft import finetune
from gptlab.data.conversations import ConversationLoader, ConversationSplit
from gptlab.errors import GptlabError
from gptlab.model import build_model
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import CHAT_TEMPLATE, CHAT_TOKENS, ChatFormat, with_chat_tokens
from gptlab.train import preflight, train

CONTEXT = 128  # the tiny conversations (helpers.chat_records) take 60-90 tokens
FAST = ["--train.threads=1", "--train.peak_flops=1e11", "--train.compile=false", "--train.precision=fp32"]


def gptlab(*argv, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(*argv, timeout: float = 240) -> str:
    proc = gptlab(*argv, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(run: Path, key: str) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r[key]}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_shards) -> Path:
    """A tiny base run (2 x 32, context 128) pretrained for 8 steps on tiny_shards with tiny_tokenizer."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("sft") / "base"
    train(tiny_config(tiny_shards, run, f"--model.context_length={CONTEXT}"), verbose=False)
    torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base, chat_file) -> Path:
    """`gptlab sft` of `base` on chat_file: 3 epochs of 27 conversations (20 steps), 10 evaluations."""
    run = tmp_path_factory.mktemp("sft") / "chat"
    ok("sft", "--base", base, "--data", chat_file, "--run-dir", run, "-q", *FAST)
    return run


# --------------------------------------------------------------------------- the vocabulary grows


@pytest.mark.parametrize("tied", [True, False])
def test_the_grown_embedding_keeps_the_base_rows_and_starts_the_chat_tokens_at_their_mean(make_export_run, tied,
                                                                                           single_thread):
    base_run = make_export_run(f"grow-{tied}", tie_embeddings=tied)
    base_model, tok, _ = runs.load_run(base_run)
    chat = with_chat_tokens(tok)
    grown = build_model(base_model.cfg.model_copy(update={"vocab_size": chat.vocab_size}))
    runs.load_weights(grown, runs.find_checkpoint(base_run), grow=True)
    old, new = tok.vocab_size, chat.vocab_size - tok.vocab_size
    assert new == len(CHAT_TOKENS)
    for name in ("tok_emb", "lm_head"):
        before, after = getattr(base_model, name).weight, getattr(grown, name).weight
        assert after.shape == (old + new, before.size(1))
        assert torch.equal(after[:old], before)  # exactly the base's rows
        assert torch.allclose(after[old:], before.mean(0).expand(new, -1), atol=1e-7)
    assert (grown.lm_head.weight is grown.tok_emb.weight) == tied
    # the base's tokens read and predicted as before: logits over the old vocabulary unchanged
    x = torch.randint(0, old, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = base_model(x)[0], grown.eval()(x)[0]
    torch.testing.assert_close(got[..., :old], want, atol=1e-5, rtol=1e-5)
    # each new token's logit is the mean of the old ones': the new tokens take little of the probability
    torch.testing.assert_close(got[..., old:], want.mean(-1, keepdim=True).expand(-1, -1, new), atol=1e-5, rtol=1e-5)
    assert got.softmax(-1)[..., old:].sum(-1).max() < 0.05


def test_init_from_takes_exactly_the_base_tokenizer_plus_the_chat_tokens(base, tiny_tokenizer, tmp_path):
    from helpers import TINY_STORIES

    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    t = tiny_config("unused", "unused", f"--train.init_from={str(base)!r}").train
    tok = load_tokenizer(tiny_tokenizer)
    assert preflight.init_from_checkpoint(t, tok, tmp_path) == runs.find_checkpoint(base)  # the base's own
    chat = with_chat_tokens(tok)
    preflight.init_from_checkpoint(t, chat, tmp_path)  # + the chat tokens: accepted, the vocabulary grows
    assert preflight.model_config_for(tiny_config("a", "b").model, chat, runs.find_checkpoint(base)).vocab_size == 404
    other = train_tokenizer(TINY_STORIES * 10, TokenizerConfig(vocab_size=300))
    for wrong in (other, with_chat_tokens(other)):  # another tokenizer, with or without the chat tokens
        with pytest.raises(GptlabError, match="was trained with another tokenizer than the shards"):
            preflight.init_from_checkpoint(t, wrong, tmp_path)


def test_train_with_init_from_a_base_on_prepared_conversations(base, chat_shards, tmp_path, single_thread):
    """`gptlab train --train.init_from=BASE --data-dir CHAT_DATA`: the same as sft without its defaults."""
    run = tmp_path / "run"
    summary = train(tiny_config(chat_shards, run, f"--train.init_from={str(base)!r}", "--train.max_steps=4",
                                "--train.eval_every=2"), verbose=False)
    assert summary["steps"] == 4 and summary["val_loss"] is not None
    model, tok, cfg = runs.load_run(run)
    assert cfg.model.vocab_size == tok.vocab_size == 404 and cfg.model.context_length == CONTEXT


# --------------------------------------------------------------------------- the loss mask


def _user_targets(split: ConversationSplit) -> np.ndarray:
    """Positions of the token stream that are read but not learnt: role tokens, system and user turns."""
    return np.flatnonzero(split.mask == 0)


def test_the_loss_is_over_the_assistant_tokens_only(chat_shards, chat_tokenizer):
    """Every target of a batch, against the rule read off the token stream itself: a token is learnt when it
    is the content or the <|end|> of an assistant message; role tokens, system and user turns and the padding
    after the last conversation of a row never are."""
    split = ConversationSplit(chat_shards, "train", CONTEXT)
    rows = split.pack(np.arange(len(split)))[:4]
    _, y = split.batch(rows)
    chat = ChatFormat.of(load_tokenizer(chat_tokenizer))
    roles = {v: k for k, v in chat.role_ids.items()}
    learnt = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row.tolist():
            tokens = split.tokens.read(int(split.starts[i]), int(split.lengths[i])).tolist()
            role = None
            for k, token in enumerate(tokens):
                role = roles.get(token, role)
                learn = token not in roles and role == "assistant"
                if k and at + k - 1 < CONTEXT:  # the target of position at + k - 1 is this token
                    assert y[r, at + k - 1].item() == (token if learn else -1), (r, at + k)
                    learnt += learn
            at += len(tokens)
        assert (y[r, at - 1:] == -1).all()
    assert learnt == int((y != -1).sum()) > 0


def test_changing_the_target_of_a_user_token_changes_nothing(chat_shards, single_thread, monkeypatch):
    """The same batch read from a token stream whose user (and system, role) tokens are other tokens as
    targets: the same targets, loss and gradients. With the mask switched off the same change moves them,
    so the test would catch a mask that did not hold."""
    split = ConversationSplit(chat_shards, "train", CONTEXT)
    rows = split.pack(np.arange(len(split)))[:4]
    torch.manual_seed(0)
    model = build_model(tiny_config("a", "b", f"--model.context_length={CONTEXT}").model.model_copy(update={"vocab_size": 404}))

    def loss_and_grads(x, y):
        model.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    user = _user_targets(split)

    def relabelled(split) -> torch.Tensor:
        """The batch's targets from a stream whose unlearnt tokens are swapped for others (inputs kept)."""
        stream = split.tokens.read(0, len(split.tokens)).astype(np.int64)
        stream[user] = (stream[user] + 7) % 400
        monkeypatch.setattr(split.tokens, "read", lambda start, length: stream[start:start + length])
        _, y = split.batch(rows)
        monkeypatch.undo()
        return y

    x, y = split.batch(rows)
    want = loss_and_grads(x, y)
    y_swapped = relabelled(split)
    assert torch.equal(y_swapped, y)
    got = loss_and_grads(x, y_swapped)
    assert got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))

    # the mask switched off: the same swap changes the targets, the loss and the gradients
    unmasked = ConversationSplit(chat_shards, "train", CONTEXT)
    unmasked.mask = np.ones_like(unmasked.mask)
    x_all, y_all = unmasked.batch(rows)
    y_all_swapped = relabelled(unmasked)
    assert not torch.equal(y_all_swapped, y_all)
    assert loss_and_grads(x_all, y_all_swapped)[0] != pytest.approx(loss_and_grads(x_all, y_all)[0], abs=1e-4)


# --------------------------------------------------------------------------- whole conversations in rows


def test_rows_hold_whole_conversations_each_once_an_epoch(chat_shards, chat_tokenizer):
    split = ConversationSplit(chat_shards, "train", CONTEXT)
    conversations = {tuple(split.tokens.read(int(split.starts[i]), int(split.lengths[i])).tolist()): i
                     for i in range(len(split))}
    assert len(conversations) == len(split) == 27
    role_ids = set(ChatFormat.of(load_tokenizer(chat_tokenizer)).role_ids.values())
    loader = ConversationLoader(chat_shards, "train", batch_size=1, seq_len=CONTEXT, seed=3)
    per_epoch = loader.rows_per_epoch()
    assert per_epoch < len(split)  # rows are packed with several conversations
    for epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            x, y = loader.next_batch()
            row = x[0].tolist() + [max(y[0, -1].item(), 0)]  # the last token is only in y (if learnt)
            assert row[0] in role_ids  # a row begins with a conversation, never inside one
            at = 0
            while at < len(row) and row[at] in role_ids:
                match = [c for c in conversations if tuple(row[at:at + len(c)]) == c
                         or (at + len(c) == len(row) and tuple(row[at:-1]) == c[:-1])]  # the row's last token
                assert len(match) == 1, f"epoch {epoch}: no whole conversation at {at}"
                seen.append(conversations[match[0]])
                at += len(match[0])
            assert not any(row[at:-1])  # then only padding
        assert sorted(seen) == list(range(len(split))), f"epoch {epoch}"  # each conversation once an epoch


# --------------------------------------------------------------------------- gptlab sft end to end


def test_sft_writes_a_chat_run_whose_assistant_loss_falls(sft_run, base, chat_file):
    tok = load_tokenizer(sft_run / "tokenizer.json")
    assert all(tok.token_to_id(t) is not None for t in CHAT_TOKENS) and tok.chat_template == CHAT_TEMPLATE
    assert json.loads((sft_run / "tokenizer.json").read_text())["model"]["gptlab"]["chat_template"] == CHAT_TEMPLATE
    assert (sft_run / "data" / "meta.json").is_file() and (sft_run / "data" / "tokenizer.json").read_text() == \
        (sft_run / "tokenizer.json").read_text()  # the run holds what it was made from
    assert [p.name for p in runs.checkpoint_dirs(sft_run)][-1] == "step_0000020"
    val = metrics(sft_run, "val_loss")
    assert len(val) == 10 and list(val.values())[-1] < list(val.values())[0]  # held-out assistant tokens
    cfg = runs.load_run_config(sft_run)
    assert cfg.train.init_from == str(base.resolve()) and cfg.train.lr == 3e-3 and cfg.train.schedule == "linear"
    assert cfg.train.eval_batches is None and cfg.train.batch_size == 4  # the profile; the base's batch
    model, tok, _ = runs.load_run(sft_run)
    assert model.cfg.vocab_size == 404
    # the validation loss is the mean over the held-out assistant tokens, each once
    from gptlab.data import iter_eval_batches

    total = count = 0
    with torch.no_grad():
        for x, y in iter_eval_batches(sft_run / "data", "val", 16, CONTEXT):
            n = int((y != -1).sum())
            total, count = total + model(x, y)[1].item() * n, count + n
    assert count == json.loads((sft_run / "data" / "meta.json").read_text())["splits"]["val"]["targets"]
    best = json.loads((sft_run / "checkpoints" / "best.json").read_text())
    assert total / count == pytest.approx(best["val_loss"], abs=1e-5)


def test_resume_continues_a_fine_tuning_run_exactly(sft_run, tmp_path):
    """The finished run with its last checkpoint removed, resumed: the same last weights, bit for bit."""
    copy = tmp_path / "copy"
    shutil.copytree(sft_run, copy)
    last = runs.checkpoint_dirs(copy)[-1]
    shutil.rmtree(last)
    (copy / "summary.json").unlink()
    ok("sft", "--resume", copy, "-q")
    got = runs.load_run(copy, "last")[0].state_dict()
    want = runs.load_run(sft_run, "last")[0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert metrics(copy, "val_loss") == metrics(sft_run, "val_loss")


def test_the_python_api_and_a_prepared_folder(sft_run, base, tmp_path, single_thread):
    """finetune() on the folder an earlier sft prepared (not copied): 2 epochs, the plan in the summary."""
    summary = finetune(base, sft_run / "data", tmp_path / "again", epochs=2, overrides=[*FAST, "--train.lr=1e-4"],
                       verbose=False)
    assert summary["data_dir"] == str(sft_run / "data") and summary["epochs"] >= 2
    assert summary["steps"] == -(-2 * summary["rows_per_epoch"] // 4)
    assert not (tmp_path / "again" / "data").exists()
    assert runs.load_run_config(tmp_path / "again").train.lr == 1e-4


def test_epochs_and_a_step_limit_are_one_or_the_other(base, chat_file, tmp_path):
    with pytest.raises(GptlabError, match="--epochs=2 and train.max_steps both set the run's length"):
        finetune(base, chat_file, tmp_path / "run", epochs=2, overrides=["--train.max_steps=3"], verbose=False)
    with pytest.raises(GptlabError, match="is not a positive number"):
        finetune(base, chat_file, tmp_path / "run", epochs=0, verbose=False)
    assert not (tmp_path / "run").exists()


def test_distillation_from_a_chat_teacher(sft_run, base, chat_file, tmp_path, single_thread):
    """A student fine-tuned from the teacher itself, weight 1: nothing to learn, the KL over the assistant's
    tokens is 0; from the base, the loss is the mix and finite."""
    copy = finetune(sft_run, chat_file, tmp_path / "copy", overrides=[
        *FAST, f"--train.teacher={str(sft_run)!r}", "--train.distill_weight=1", "--train.max_steps=1", "--train.lr=1e-9"],
        verbose=False)
    assert copy["train_loss"] == pytest.approx(0.0, abs=1e-6)
    taught = finetune(base, chat_file, tmp_path / "taught", overrides=[
        *FAST, f"--train.teacher={str(sft_run)!r}", "--train.max_steps=4"], verbose=False)
    assert np.isfinite(taught["train_loss"]) and np.isfinite(taught["val_loss"])


@pytest.mark.slow
def test_two_processes_fine_tune_as_one(base, chat_file, tmp_path):
    """--nproc 2 on conversations: the loader gives each rank half of the same packed rows, so the losses are
    the single process's."""
    args = ["--base", base, "--data", chat_file, "--train.max_steps=6", "--train.eval_every=3", "--train.log_every=1", *FAST]
    ok("sft", *args, "--run-dir", tmp_path / "one", "-q")
    ok("sft", *args, "--run-dir", tmp_path / "two", "--nproc", "2", "-q", timeout=300)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    for key in ("loss", "val_loss"):
        one, two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert list(one) == list(two) and list(two.values()) == pytest.approx(list(one.values()), abs=2e-5)


def test_micro_steps_weigh_every_assistant_token_alike(base, chat_shards, tmp_path, single_thread):
    """Rows hold different numbers of assistant tokens: 2 micro-steps of 2 rows train as 1 step of 4 rows
    (a mean over all the step's targets, not a mean of the micro-steps' means)."""
    curves = {}
    for name, batch in (("whole", ["--train.batch_size=4"]), ("accum", ["--train.batch_size=2", "--train.grad_accum=2"])):
        train(tiny_config(chat_shards, tmp_path / name, f"--train.init_from={str(base)!r}", "--train.max_steps=4", *batch),
              verbose=False)
        curves[name] = metrics(tmp_path / name, "loss")
    assert list(curves["accum"].values()) == pytest.approx(list(curves["whole"].values()), abs=1e-6)


def test_the_validator_pads_conversation_batches_under_fsdp(chat_shards, single_thread):
    from dataclasses import replace

    from gptlab.data.conversations import eval_rows
    from gptlab.train.distributed import Dist
    from gptlab.train.validator import Validator

    torch.manual_seed(0)
    model = build_model(tiny_config("a", "b", f"--model.context_length={CONTEXT}").model.model_copy(update={"vocab_size": 404}))
    rows = len(eval_rows(chat_shards, "val", CONTEXT)[1])
    counts = []
    for rank in (0, 1):
        dist = replace(Dist(torch.device("cpu")), rank=rank, world_size=2, mode="fsdp")
        v = Validator(model, chat_shards, CONTEXT, 2, None, 0, "fp32", dist, True, None)
        passes = list(v.batches())
        counts.append((len(passes), sum(y is not None for _, y in passes)))
    assert counts[0][0] == counts[1][0] >= 1  # as many forward passes on each rank
    assert counts[0][1] + counts[1][1] == rows  # one row a batch a rank: every packed row scored once


def test_a_batch_without_targets_is_not_scored(chat_shards, single_thread, monkeypatch):
    from gptlab.train.distributed import Dist
    from gptlab.train.validator import Validator

    torch.manual_seed(0)
    model = build_model(tiny_config("a", "b", f"--model.context_length={CONTEXT}").model.model_copy(update={"vocab_size": 404}))
    v = Validator(model, chat_shards, CONTEXT, 4, None, 0, "fp32", Dist(torch.device("cpu")), True, None)
    want = v.evaluate()["loss"]
    batches = list(v.batches())
    empty = (batches[0][0], torch.full_like(batches[0][1], -1))
    monkeypatch.setattr(Validator, "batches", lambda self: iter([empty, *batches]))
    assert v.evaluate()["loss"] == pytest.approx(want, rel=1e-9)  # not NaN
    monkeypatch.setattr(Validator, "batches", lambda self: iter([empty]))
    assert v.evaluate() is None and v(step=1) is None  # nothing scored: no validation result


# --------------------------------------------------------------------------- LoRA


def test_lora_fine_tunes_a_low_rank_update_saved_as_a_plain_model_and_resumes_exactly(base, chat_file, tmp_path,
                                                                                       single_thread):
    run = tmp_path / "lora"
    summary = finetune(base, chat_file, run, overrides=[*FAST, "--train.lora_rank=2", "--train.lr=3e-3"], verbose=False)
    assert summary["steps"] == 20
    tuned, tok, _ = runs.load_run(run, "last")  # a plain model: no adapter in its weights
    plain = runs.load_run(base)[0]
    assert not any("lora" in k for k in tuned.state_dict())
    for name, w in tuned.state_dict().items():
        before = plain.state_dict()[name]
        if name in ("tok_emb.weight", "lm_head.weight"):  # grown, and trained in full (the chat tokens' rows are new)
            assert w.size(0) == 404 and not torch.equal(w[:400], before)
        elif w.dim() == 2:  # a block's matrix: moved by a rank-2 update
            assert 0 < torch.linalg.matrix_rank(w - before, atol=1e-6) <= 2, name
        else:
            assert torch.equal(w, before), name  # norms frozen
    # resumed from its next-to-last checkpoint: the same last weights, bit for bit
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(runs.checkpoint_dirs(copy)[-1])
    train(runs.load_run_config(copy), resume=True, verbose=False)
    got = runs.load_run(copy, "last")[0].state_dict()
    assert all(torch.equal(got[k], w) for k, w in tuned.state_dict().items())
    with pytest.raises(GptlabError, match="was trained with train.lora_rank=2, not 0"):
        train(runs.load_run_config(copy, ["--train.max_steps=30", "--train.lora_rank=0"]), resume=True, verbose=False)


# --------------------------------------------------------------------------- bad input


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error:") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name, record, fragments", [
    ("no_reply", {"messages": [{"role": "user", "content": "hi"}]}, ["no_reply.jsonl:2", "no assistant turn"]),
    ("robot", {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]},
     ["robot.jsonl:2", "unknown role 'robot'"]),
])
def test_a_bad_conversation_is_one_line_naming_its_file_and_line(base, tmp_path, name, record, fragments):
    data = write_jsonl(tmp_path / f"{name}.jsonl", [chat_records(1)[0], record])
    one_line_error(gptlab("sft", "--base", base, "--data", data, "--run-dir", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run").exists()  # nothing half made left behind


def test_a_missing_base_run_is_one_line(chat_file, tmp_path, capsys):
    one_line_error(gptlab("sft", "--base", tmp_path / "nope", "--data", chat_file), "the base run", "nope", "does not exist")
    from gptlab.cli import main

    assert main(["sft", "--data", str(chat_file)]) == 2
    assert "needs --base RUN" in capsys.readouterr().err


def test_a_conversation_longer_than_the_context_is_named(eval_runs, chat_file, tmp_path):
    # eval_runs read 32 tokens: the conversations do not fit; the first is named, with what to do
    one_line_error(gptlab("sft", "--base", eval_runs[0], "--data", chat_file, "--run-dir", tmp_path / "short"),
                   "chat.jsonl:1", "more than fit in the context of 32", "model.context_length")
    assert not (tmp_path / "short").exists()


def test_a_sentencepiece_base_without_chat_tokens_is_one_line(make_export_run, chat_file, tiny_corpus_text):
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    spm = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="sentencepiece", vocab_size=300))
    one_line_error(gptlab("sft", "--base", make_export_run("spm", tokenizer=spm), "--data", chat_file),
                   "cannot take the chat template", "extra_special_tokens")


def test_conversations_prepared_with_another_tokenizer_are_one_line(make_export_run, chat_shards, tmp_path, tiny_corpus_text):
    """chat_shards hold tiny_tokenizer's ids; this base reads characters."""
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    char = make_export_run("char", tokenizer=train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="char")))
    one_line_error(gptlab("sft", "--base", char, "--data", chat_shards, "--run-dir", tmp_path / "c"),
                   "prepared with another tokenizer")
    one_line_error(gptlab("train", "--data-dir", chat_shards, "--run", tmp_path / "d", f"--train.init_from={json.dumps(str(char))}",
                          "--train.max_steps=1"), "was trained with another tokenizer than the shards", "gptlab sft")


def test_lora_settings_that_cannot_work_are_one_line(chat_shards, base, chat_file, tmp_path):
    with pytest.raises(GptlabError, match="adapts a trained model"):
        train(tiny_config(chat_shards, tmp_path / "a", "--train.lora_rank=4"), verbose=False)
    one_line_error(gptlab("sft", "--base", base, "--data", chat_file, "--run-dir", tmp_path / "b", "--lora-rank", "4",
                          "--nproc", "2"), "train.lora_rank=4 trains in one process")
