"""Held-out assistant-token loss (evaluate/chat.py), instruction following (evaluate/instructions.py), and
`gptlab eval --conversations / --instructions` on a tiny chat run and a tiny base run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_STORIES, chat_records, tiny_config, write_jsonl

from gptlab.cli import main
from gptlab.config import ModelConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.evaluate.chat import evaluate_conversations, render_text
from gptlab.evaluate.instructions import instruction_following, read_instructions
from gptlab.model import build_model
from gptlab.text.conversations import conversation_from_record
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import ChatFormat

CONVERSATION = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about Tom."},
                {"role": "assistant", "content": TINY_STORIES[0]},
                {"role": "user", "content": "And Lily?"},
                {"role": "assistant", "content": TINY_STORIES[1]}]


@pytest.fixture(scope="module")
def chat_model(chat_tokenizer):
    """A random 2-layer model over the chat tokenizer's vocabulary: scoring does not need a trained one."""
    tok = load_tokenizer(chat_tokenizer)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, context_length=128))
    return model.eval(), tok


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_shards):
    """A tiny chat model trained from scratch for 8 steps on chat_shards (its tokenizer has the chat tokens)."""
    from gptlab.train import train

    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("chat_run") / "run"
    train(tiny_config(chat_shards, run, "--model.context_length=128"), verbose=False)
    torch.set_num_threads(threads)
    return run


def _by_hand(model, ids, mask) -> tuple[float, int]:
    """Summed -ln p of the masked targets, one conversation, computed directly."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits, _ = model(x)
    logp = F.log_softmax(logits[0].float(), dim=-1)
    targets = [(i - 1, t) for i, (t, m) in enumerate(zip(ids, mask)) if i >= 1 and m]
    return -sum(logp[p, t].item() for p, t in targets), len(targets)


def test_assistant_loss_equals_a_hand_computation(chat_model):
    model, tok = chat_model
    ids, mask = ChatFormat.of(tok).render(CONVERSATION)
    nll, count = _by_hand(model, ids, mask)
    result = evaluate_conversations(model, tok, [CONVERSATION], topk=(1,))
    assistant_bytes = len(TINY_STORIES[0].encode()) + len(TINY_STORIES[1].encode())
    # the targets are both replies' content and their <|end|>: nothing of the system or user turns
    assert count == sum(len(tok.encode(s)) + 1 for s in TINY_STORIES[:2]) == result["tokens"]
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / (math.log(2) * assistant_bytes), rel=1e-5)
    assert result["bytes"] == assistant_bytes and result["format"] == "chat" and result["conversations"] == 1


def test_user_tokens_are_never_targets(chat_model):
    """A user turn after the last reply changes nothing (it is not scored), and neither does the batch size."""
    model, tok = chat_model
    base = evaluate_conversations(model, tok, [CONVERSATION], topk=())
    longer = evaluate_conversations(model, tok, [CONVERSATION + [{"role": "user", "content": "Thanks! Another?"}]], topk=())
    assert (longer["tokens"], longer["bytes"]) == (base["tokens"], base["bytes"])
    assert longer["loss"] == pytest.approx(base["loss"], rel=1e-6)
    many = [CONVERSATION, CONVERSATION[:3], CONVERSATION[1:3]] * 3
    one_by_one = evaluate_conversations(model, tok, many, batch_size=1, topk=(1, 5))
    batched = evaluate_conversations(model, tok, many, batch_size=4, topk=(1, 5))
    assert batched["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5) and batched["topk"] == one_by_one["topk"]


def test_plain_text_scores_the_replies_after_the_conversation(chat_model):
    """A base model reads the turns as text lines after its start token; the targets are the replies and what ends them."""
    model, tok = chat_model
    messages = CONVERSATION[1:3]
    ids, mask = render_text(tok, messages)
    assert tok.decode(ids) == f"<|endoftext|>Tell me about Tom.\n{TINY_STORIES[0]}<|endoftext|>"
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == TINY_STORIES[0] + "<|endoftext|>"
    nll, count = _by_hand(model, ids, mask)
    result = evaluate_conversations(model, tok, [messages], as_chat=False, topk=())
    assert result["format"] == "text" and result["tokens"] == count and result["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_a_base_tokenizer_cannot_take_the_chat_format(tiny_tokenizer, chat_model):
    tok = load_tokenizer(tiny_tokenizer)
    model, _ = chat_model
    with pytest.raises(GptlabError, match="no chat tokens") as e:
        evaluate_conversations(model, tok, [CONVERSATION])
    assert "--eval.chat_format=text" in str(e.value)


def test_a_conversation_longer_than_the_context_is_named(chat_model):
    model, tok = chat_model
    long = conversation_from_record({"prompt": "Go on.", "completion": " ".join(TINY_STORIES * 3)}, "long.jsonl:7")
    with pytest.raises(GptlabError, match="long.jsonl:7 has .* tokens, more than fit in the model's context of 128"):
        evaluate_conversations(model, tok, [long])


def test_instruction_following_checks_each_reply(chat_run, tmp_path):
    """Replies are drawn per batch with seed + k: the first replies do not depend on how many instructions follow."""
    from gptlab.runs import load_run

    model, tok, cfg = load_run(chat_run)
    path = write_jsonl(tmp_path / "instructions.jsonl", chat_records(12))
    sample = SampleConfig(max_new_tokens=12, temperature=1.0, seed=5)
    instructions = read_instructions(path)
    full = instruction_following(model, tok, instructions, sample, batch_size=4, examples=12)
    first = instruction_following(model, tok, read_instructions(path, limit=4), sample, batch_size=4, examples=4)
    assert [e["reply"] for e in first["examples"]] == [e["reply"] for e in full["examples"][:4]]
    assert full["format"] == "chat" and full["instructions"] == 12 and full["reference_rate"] == 1.0
    # the rate is what the checker says of the replies
    assert full["rate"] == sum(e["ok"] for e in full["examples"]) / 12 and full["rates"]["name"] is None
    as_text = instruction_following(model, tok, instructions, sample, as_chat=False, batch_size=4)
    assert as_text["format"] == "text"


@pytest.fixture()
def base_run(eval_runs, tmp_path):
    return shutil.copytree(eval_runs[0], tmp_path / "base")


def test_eval_cli_conversations_and_instructions_on_a_chat_run(chat_run, chat_file, tmp_path, capsys):
    run = shutil.copytree(chat_run, tmp_path / "run")
    instructions = write_jsonl(tmp_path / "instructions.jsonl", chat_records(6))
    code = main(["eval", str(run), "--conversations", str(chat_file), "--instructions", instructions,
                 "--instruction-limit", "4", "--sample.max_new_tokens=8", "--no-samples", "-q"])
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    own, conversations = report["datasets"]
    # the run's own validation split is conversations too: scored on the assistant's tokens, with its bytes
    assert own["kind"] == "conversations" and own["name"].endswith(":val") and own["conversations"] == 3
    assert conversations["source"] == str(chat_file) and conversations["conversations"] == 30
    assert 0 < conversations["bpb"] < 20 and conversations["format"] == "chat"
    r = report["instructions"]
    assert r["instructions"] == 4 and r["sampling"]["max_new_tokens"] == 8 and 0 <= r["rate"] <= 1
    markdown = (run / "eval.md").read_text()
    assert "assistant tokens of 30 conversations" in markdown and "## Instruction following (4 instructions" in markdown
    assert "instructions (4, chat format)" in out


def test_eval_cli_on_a_base_run(base_run, chat_file, tmp_path, capsys):
    """A base run: conversations need the chat tokens (one line), or score as text; instructions go as plain text."""
    assert main(["eval", str(base_run), "--conversations", str(chat_file), "--no-samples", "-q"]) == 2
    err = capsys.readouterr().err
    assert "has no chat tokens" in err and "--eval.chat_format=text" in err and err.count("\n") == 1
    # short records: this run's context is 32 tokens
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": f"Who is {n}?", "completion": f"{n} is a cat.",
                                                    "constraints": {"name": n, "words": ["cat"]}} for n in ("Tom", "Sue")])
    code = main(["eval", str(base_run), "--conversations", short, "--eval.chat_format=text",
                 "--instructions", short, "--sample.max_new_tokens=4", "--no-samples", "-q"])
    assert code == 0
    report = json.loads((base_run / "eval.json").read_text())
    assert report["datasets"][1]["format"] == "text" and report["datasets"][1]["tokens"] > 0
    assert report["instructions"]["format"] == "text" and report["instructions"]["reference_rate"] == 1.0


def test_eval_cli_bad_instruction_and_conversation_files(base_run, tmp_path, capsys):
    good = chat_records(2)
    no_constraints = {"prompt": "Write.", "completion": "Tom ran."}
    cases = [
        (["--instructions", str(tmp_path / "missing.jsonl")], "instruction file not found"),
        (["--conversations", str(tmp_path / "missing.jsonl"), "--eval.chat_format=text"], "conversation file not found"),
        (["--instructions", write_jsonl(tmp_path / "a.jsonl", [good[0], no_constraints])], 'a.jsonl:2: has no "constraints"'),
        (["--instructions", write_jsonl(tmp_path / "b.jsonl", [good[0], "{oops"])], "b.jsonl:2 is not valid JSON"),
        (["--instructions", write_jsonl(tmp_path / "c.jsonl", [{**good[1], "constraints": {"words": "ball"}}])],
         "c.jsonl:1: constraints.words is not a list of words"),
        (["--instructions", write_jsonl(tmp_path / "d.jsonl", [{**good[1], "constraints": {"colour": "red"}}])],
         "d.jsonl:1: unknown constraint 'colour'"),
        (["--instructions", write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."},
                                                                             {"role": "user", "content": "Bye."}],
                                                                "constraints": {"name": "Tom"}}])],
         "e.jsonl:1: the last message is not the assistant's reference reply"),
        (["--conversations", write_jsonl(tmp_path / "f.jsonl", [{"text": "not a conversation"}]), "--eval.chat_format=text"],
         "f.jsonl:1: not a conversation"),
        (["--instructions", write_jsonl(tmp_path / "g.jsonl", good), "--eval.chat_format=chat"], "has no chat tokens"),
    ]
    for flags, message in cases:
        assert main(["eval", str(base_run), "--no-samples", "-q", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
