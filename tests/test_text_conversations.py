"""Conversation sources: the record shapes instruction data comes in, read as messages; bad records named by file:line."""

from __future__ import annotations

import json

import pytest
from helpers import write_jsonl

from gptlab.config import SourceConfig
from gptlab.errors import GptlabError
from gptlab.text import is_conversation_source, read_conversations

USER_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_every_shape_becomes_messages_and_other_fields_are_kept(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, *USER_ASSISTANT], "id": 7},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5", "constraints": {"words": ["five"]}},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"prompt": "Hi", "completion": "Hello!", "system": "Be kind."},
    ])
    got = read_conversations(path)
    assert [c.messages for c in got] == [
        [{"role": "system", "content": "Be kind."}, *USER_ASSISTANT],
        USER_ASSISTANT,
        [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [{"role": "system", "content": "Be kind."}, *USER_ASSISTANT],
    ]
    assert got[0].extra == {"id": 7} and got[2].extra == {"constraints": {"words": ["five"]}}
    assert [c.where.rsplit(":", 1)[1] for c in got] == ["1", "2", "3", "4", "5"]


def test_a_json_list_of_records_reads_the_same(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"messages": USER_ASSISTANT}]), encoding="utf-8")
    assert read_conversations(tmp_path / "c.json")[0].messages == USER_ASSISTANT


@pytest.mark.parametrize("record, problem", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"c\.jsonl:2: the conversation has no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, r"c\.jsonl:2: message 0 has the unknown role 'wizard'"),
    ({"messages": [{"role": "user"}]}, r"c\.jsonl:2: message 0 is not an object with 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": 5}]}, r"c\.jsonl:2: message 0 \(assistant\) holds int, not text"),
    ({"text": "a story"}, r"c\.jsonl:2: not a conversation \(it has: text\)"),
    ("{not json", r"c\.jsonl:2 is not valid JSON"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": USER_ASSISTANT}, record])
    with pytest.raises(GptlabError, match=problem):
        read_conversations(path)


def test_auto_tells_conversations_from_text_records(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": USER_ASSISTANT}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time."}])
    (tmp_path / "book.txt").write_text("Once upon a time.", encoding="utf-8")
    assert is_conversation_source(SourceConfig(path=chat))
    assert not is_conversation_source(SourceConfig(path=text))
    assert not is_conversation_source(SourceConfig(path=str(tmp_path / "book.txt")))
    assert not is_conversation_source(SourceConfig(path=chat, kind="text"))
