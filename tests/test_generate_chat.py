"""Replies from a chat model: prompt ids, stopping at <|end|>, history fitted to the context, `gptlab sample --chat`."""

from __future__ import annotations

import json

import pytest

from gptlab.cli import main
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate import chat_prompt, chat_replies, chat_reply, generate, read_messages, sample_tokens
from gptlab.runs import load_run
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import ChatFormat

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = SampleConfig(temperature=0, max_new_tokens=12)
CONVERSATION = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
    {"role": "assistant", "content": "The cat sat in the sun."},
    {"role": "user", "content": "And a dog?"},
]


@pytest.fixture(scope="module")
def chat_run(make_export_run, chat_tokenizer):
    """A run with chat tokens and random weights (context 128): the mechanics, not the words."""
    return make_export_run("chat-random", tokenizer=load_tokenizer(chat_tokenizer), context_length=128)


@pytest.fixture
def chat_model(chat_run):
    model, tokenizer, _ = load_run(chat_run)
    return model, tokenizer, ChatFormat.of(tokenizer)


def end_after(model, end_id: int, steps: int):
    """Make the model write <|end|> as its `steps`+1-th new token (a hook on the output layer): a reply of `steps` tokens."""
    calls = {"n": 0}

    def hook(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] == steps + 1:  # the prefill, then one call per new token
            logits = logits.clone()
            logits[..., end_id] += 1e4
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_the_prompt_is_the_chat_formats(chat_model):
    model, tokenizer, fmt = chat_model
    prompt = chat_prompt(tokenizer, CONVERSATION, model.cfg.context_length, 16)
    assert prompt.ids == fmt.prompt(CONVERSATION) and prompt.ids[-1] == fmt.role_ids["assistant"]
    assert prompt.dropped == 0 and prompt.note is None and prompt.messages == CONVERSATION
    assert prompt.max_new_tokens == 16 and prompt.stop_ids == {fmt.end_id, tokenizer.eos_id}
    # ShareGPT's role names are read as conversation data reads them
    shared = [{"role": "human", "content": "Tell me about a cat."}]
    assert chat_prompt(tokenizer, shared, 128, 16).ids == fmt.prompt([{"role": "user", "content": "Tell me about a cat."}])


def test_a_reply_stops_at_end_and_streams_what_it_returns(chat_model):
    model, tokenizer, fmt = chat_model
    free = chat_replies(model, tokenizer, CONVERSATION, GREEDY)[0]  # random weights: no <|end|> within 12 tokens
    new, _ = sample_tokens(model, [fmt.prompt(CONVERSATION)], 12, temperature=0)
    assert free == tokenizer.decode(new[0]) and fmt.end_id not in new[0]

    handle = end_after(model, fmt.end_id, 5)
    streamed = []
    try:
        reply = chat_reply(model, tokenizer, CONVERSATION, GREEDY, on_token=streamed.append)
    finally:
        handle.remove()
    assert reply == tokenizer.decode(new[0][:5])  # the same 5 tokens, then <|end|> ends it, unwritten
    assert "".join(streamed) == reply and len(streamed) >= 1


def test_sample_tokens_stops_at_any_of_several_ids(chat_model):
    model, _, fmt = chat_model
    prompt = [fmt.prompt(CONVERSATION)]
    free = sample_tokens(model, prompt, 12, temperature=0)[0][0]
    stops = {free[3], free[7]}
    first = min(free.index(t) for t in stops)
    assert sample_tokens(model, prompt, 12, temperature=0, eos_id=stops)[0][0] == free[:first]
    assert generate(model, model_tokenizer := chat_model[1], [prompt[0]], GREEDY, stop_ids=stops)[0] == \
        model_tokenizer.decode(free[:first])


def test_the_oldest_turns_are_dropped_to_fit_the_context_and_the_system_message_stays(chat_model):
    model, tokenizer, fmt = chat_model
    turns = [[{"role": "user", "content": f"Tell me story {i}."}, {"role": "assistant", "content": "A cat sat."}]
             for i in range(10)]
    messages = [CONVERSATION[0], *[m for t in turns for m in t], {"role": "user", "content": "And a dog?"}]
    context, room = model.cfg.context_length, 16
    assert len(fmt.prompt(messages)) + room > context

    prompt = chat_prompt(tokenizer, messages, context, room)
    kept_turns = (len(messages) - 2 - 2 * prompt.dropped) // 2
    expected = [CONVERSATION[0], *[m for t in turns[10 - kept_turns:] for m in t], messages[-1]]
    assert prompt.messages == expected and prompt.ids == fmt.prompt(expected)
    assert len(prompt.ids) + room <= context < len(fmt.prompt([expected[0], *turns[9 - kept_turns], *expected[1:]])) + room
    assert prompt.note == f"dropped {prompt.dropped} oldest turns to fit the context" and prompt.dropped >= 2
    assert prompt.max_new_tokens == room

    notes = []
    assert chat_reply(model, tokenizer, messages, GREEDY.model_copy(update={"max_new_tokens": room}),
                      on_note=notes.append) == chat_reply(model, tokenizer, expected, GREEDY.model_copy(update={"max_new_tokens": room}))
    assert notes == [prompt.note]


def test_the_reply_keeps_half_the_context_at_most_and_grows_into_what_is_left(chat_model):
    model, tokenizer, fmt = chat_model
    prompt = chat_prompt(tokenizer, CONVERSATION[:2], 128, 1000)  # max_new_tokens far past the context
    assert prompt.dropped == 0 and prompt.max_new_tokens == 128 - len(prompt.ids)
    assert len(chat_reply(model, tokenizer, CONVERSATION[:2], GREEDY.model_copy(update={"max_new_tokens": 1000}))) > 0


def test_a_turn_too_long_for_the_context_is_one_line(chat_model):
    model, tokenizer, _ = chat_model
    long = [CONVERSATION[0], {"role": "user", "content": "the cat sat on the mat " * 40}]
    with pytest.raises(GptlabError, match=r"the last turn takes \d+ tokens and the system message \d+: with 16 kept "
                                          r"for the reply, that does not fit model.context_length=128 — shorten the message"):
        chat_prompt(tokenizer, long, 128, 16)
    with pytest.raises(GptlabError, match="lower max_new_tokens"):
        chat_reply(model, tokenizer, long[1:], SampleConfig(max_new_tokens=16))


@pytest.mark.parametrize("messages,message", [
    ([], "nothing to reply to"),
    ([{"role": "system", "content": "x"}], "nothing to reply to"),
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": 3}], "holds int, not text"),
    ("hello", "expected a list of messages"),
])
def test_bad_messages_are_one_line(chat_model, messages, message):
    model, tokenizer, _ = chat_model
    with pytest.raises(GptlabError, match=message):
        chat_reply(model, tokenizer, messages)


def test_a_base_run_has_no_chat_tokens(make_export_run):
    model, tokenizer, _ = load_run(make_export_run("base-for-chat"))
    with pytest.raises(GptlabError, match="runs/base has no chat tokens .*gptlab sft"):
        chat_reply(model, tokenizer, CONVERSATION, what="runs/base")


def test_messages_files(tmp_path):
    as_list = tmp_path / "one.json"
    as_list.write_text(json.dumps(CONVERSATION), encoding="utf-8")
    assert read_messages(as_list) == [(str(as_list), CONVERSATION)]
    lines = tmp_path / "many.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CONVERSATION + [{"role": "assistant", "content": "A dog ran."}]},  # a training record
        {"prompt": "Hi", "completion": "Hello"},
    ]) + "\n", encoding="utf-8")
    assert read_messages(lines) == [(f"{lines}:1", CONVERSATION), (f"{lines}:2", [{"role": "user", "content": "Hi"}])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(GptlabError, match="bad.jsonl is not valid JSON"):
        read_messages(bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "a"}]}), encoding="utf-8")
    with pytest.raises(GptlabError, match=r"bad.jsonl:1: message 0 has the unknown role 'robot'"):
        read_messages(bad)


def test_sample_replies_to_chat_and_messages(chat_run, chat_model, tmp_path, capsys):
    model, tokenizer, fmt = chat_model
    flags = ["--temperature", "0", "--max-new-tokens", "10", "-q"]
    assert main(["sample", str(chat_run), "--chat", "Tell me about a cat.", *flags]) == 0
    expected = chat_reply(model, tokenizer, [{"role": "user", "content": "Tell me about a cat."}], GREEDY.model_copy(update={"max_new_tokens": 10}))
    assert capsys.readouterr().out == expected + "\n"

    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION[:3]), encoding="utf-8")
    assert main(["sample", str(chat_run), "--messages", str(path), "--chat", "And a dog?", *flags, "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    reply = chat_reply(model, tokenizer, CONVERSATION, GREEDY.model_copy(update={"max_new_tokens": 10}))
    assert out == f"--- reply 1 to {path}\n{reply}\n\n--- reply 2 to {path}\n{reply}\n\n"  # greedy: twice the same

    assert main(["sample", str(chat_run), "--chat", "hi", "--prompt", "Once"]) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_sample_chat_with_a_base_run_is_one_line(make_export_run, capsys):
    run = str(make_export_run("base-for-chat"))
    assert main(["sample", run, "--chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} has no chat tokens" in err and "gptlab sft" in err
