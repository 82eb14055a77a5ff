"""Conversations prepared with a loss mask, held out by conversation, and packed whole into rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import chat_records, write_jsonl

from gptlab.config import load_config
from gptlab.data import iter_eval_batches, load_meta, prepare_data, training_loader
from gptlab.data.conversations import ConversationSplit
from gptlab.data.conversations import chat_file as mask_file
from gptlab.errors import GptlabError
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import ChatFormat

SETTINGS = dict(split="train", batch_size=4, seq_len=128, seed=3, rank=0, world_size=1)


def _prepare(tmp_path, records, tokenizer, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "prepared"
    cfg = load_config(None, [f"--data.out_dir={str(out)!r}", ("data.sources", [{"path": source}]), "--data.workers=1",
                             *overrides])
    return out, prepare_data(cfg, tokenizer)


def test_the_shards_hold_each_conversation_rendered_and_its_mask(chat_shards, chat_file, chat_tokenizer):
    meta = load_meta(chat_shards)
    assert meta["kind"] == "chat"
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (27, 3)
    chat = ChatFormat.of(load_tokenizer(chat_tokenizer))
    by_where = {f"{chat_file}:{n}": r for n, r in enumerate(chat_records(), 1)}
    from gptlab.text.conversations import conversation_from_record

    for split in ("train", "val"):
        conversations = ConversationSplit(chat_shards, split, seq_len=256)
        assert int(conversations.mask.sum()) == meta["splits"][split]["targets"]
        for i, where in enumerate(conversations.where):
            ids, mask = chat.render(conversation_from_record(by_where[str(where)], where).messages)
            a, b = conversations.starts[i], conversations.starts[i + 1]
            assert conversations.tokens.read(a, b - a).tolist() == ids
            assert conversations.mask[a:b].tolist() == mask


def test_validation_is_held_out_by_conversation_and_does_not_depend_on_order(tmp_path, chat_tokenizer):
    records = chat_records(40)
    _, meta = _prepare(tmp_path / "a", records, chat_tokenizer)
    _, shuffled = _prepare(tmp_path / "b", records[::-1], chat_tokenizer)
    assert meta["splits"]["val"]["documents"] == 4
    assert meta["splits"]["val"]["tokens"] == shuffled["splits"]["val"]["tokens"]
    val_lines = {int(str(w).rsplit(":", 1)[1]) for w in ConversationSplit(tmp_path / "a" / "prepared", "val", 256).where}
    reversed_lines = {41 - int(str(w).rsplit(":", 1)[1])
                      for w in ConversationSplit(tmp_path / "b" / "prepared", "val", 256).where}
    assert val_lines == reversed_lines  # the same conversations, wherever they sit in the file


def test_rows_hold_whole_conversations_and_only_the_assistant_is_a_target(chat_shards):
    loader = training_loader(chat_shards, **SETTINGS)
    split = loader.conversations
    seen = []
    rows_per_epoch = len(loader._epoch_rows(0))
    for _ in range(-(-rows_per_epoch // SETTINGS["batch_size"])):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 128)
        for row in x.tolist():
            assert row[0] in ChatFormat.of(load_tokenizer(chat_shards)).role_ids.values()  # a row starts a conversation
    for g in range(rows_per_epoch):
        seen += loader._row(g).tolist()
    assert sorted(seen) == list(range(len(split)))  # every conversation once an epoch
    # the targets kept are exactly the masked tokens of the conversations in the row
    x, y = split.batch([loader._row(0)])
    expected = [t for i in loader._row(0) for t, m in zip(split.tokens.read(int(split.starts[i]), int(split.lengths[i])),
                                                         split.mask[split.starts[i]:split.starts[i + 1]]) if m]
    assert [t for t in y[0].tolist() if t != -1] == [int(t) for t in expected]


def test_batches_are_a_function_of_seed_and_step_and_ranks_split_the_global_batch(chat_shards):
    one = training_loader(chat_shards, **SETTINGS)
    batches = [one.next_batch() for _ in range(5)]
    resumed = training_loader(chat_shards, **SETTINGS)
    resumed.load_state_dict({**one.state_dict(), "step": 3})
    assert all(np.array_equal(resumed.next_batch()[1], batches[k][1]) for k in (3, 4))
    ranks = [training_loader(chat_shards, **{**SETTINGS, "batch_size": 2, "rank": r, "world_size": 2}) for r in (0, 1)]
    for k in range(5):
        halves = [r.next_batch()[0] for r in ranks]
        assert np.array_equal(np.concatenate(halves), batches[k][0])
    with pytest.raises(GptlabError, match="cannot resume the data loader: batch_size 8 -> 4"):
        training_loader(chat_shards, **SETTINGS).load_state_dict({**one.state_dict(), "batch_size": 8})


def test_validation_batches_score_every_assistant_token_once(chat_shards):
    targets = sum(int((y != -1).sum()) for _, y in iter_eval_batches(chat_shards, "val", 2, 128))
    assert targets == load_meta(chat_shards)["splits"]["val"]["targets"]


def test_a_conversation_longer_than_the_context_is_named(chat_shards, chat_file):
    with pytest.raises(GptlabError, match=rf"conversation at {chat_file}:\d+ has \d+ tokens, more than fit in the "
                                          r"context of 8 .*longer model.context_length"):
        training_loader(chat_shards, **{**SETTINGS, "seq_len": 8})


def test_bad_corpora_are_refused(tmp_path, chat_tokenizer, tiny_tokenizer, tiny_corpus):
    with pytest.raises(GptlabError, match="has no chat tokens.*gptlab sft"):
        _prepare(tmp_path / "a", chat_records(5), tiny_tokenizer)
    with pytest.raises(GptlabError, match="one conversation is too few"):
        _prepare(tmp_path / "b", chat_records(1), chat_tokenizer)
    source = write_jsonl(tmp_path / "chat.jsonl", chat_records(5))
    cfg = load_config(None, [f"--data.out_dir={str(tmp_path / 'c')!r}", "--data.workers=1",
                             ("data.sources", [{"path": source}, {"path": str(tiny_corpus)}])])
    with pytest.raises(GptlabError, match="mixes text and conversations"):
        prepare_data(cfg, chat_tokenizer)


def test_data_prepare_takes_conversations_from_the_command_line(tmp_path, chat_file, chat_tokenizer):
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, "-m", "gptlab", "data", "prepare", "--data", str(chat_file), "--tokenizer",
                           str(chat_tokenizer), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "meta.json").read_text())["kind"] == "chat"
    assert mask_file(out, "train").is_file() and mask_file(out, "val").is_file()
