"""`gptlab chat RUN`: a conversation driven through piped stdin, its commands, its history, its refusals."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gptlab
from gptlab.chat.terminal import ChatSession, chat_in_terminal
from gptlab.cli import main
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate import chat_reply
from gptlab.runs import load_run
from gptlab.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(gptlab.__file__).resolve().parents[1]
GREEDY = SampleConfig(temperature=0, max_new_tokens=8)
FLAGS = ["--temperature", "0", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def chat_run(make_export_run, chat_tokenizer):
    """A run with chat tokens and random weights (context 128): the mechanics, not the words."""
    return make_export_run("chat-random", tokenizer=load_tokenizer(chat_tokenizer), context_length=128)


def gptlab_process(*argv, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptlab", *argv], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", **kwargs)


def user(text):
    return {"role": "user", "content": text}


def test_a_piped_conversation_with_system_reset_and_quit(chat_run):
    lines = ["Tell me about a cat.", "/system You tell short stories.", "And a dog?", "", "/reset", "Tell me about a cat.",
             "/help", "/bogus", "/quit", "never read"]
    proc = gptlab_process("chat", str(chat_run), *FLAGS)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=120)
    assert proc.returncode == 0, err

    model, tokenizer, _ = load_run(chat_run)
    system = {"role": "system", "content": "You tell short stories."}
    first = chat_reply(model, tokenizer, [user("Tell me about a cat.")], GREEDY)
    second = chat_reply(model, tokenizer, [system, user("Tell me about a cat."), {"role": "assistant", "content": first},
                                           user("And a dog?")], GREEDY)
    third = chat_reply(model, tokenizer, [system, user("Tell me about a cat.")], GREEDY)  # /reset keeps the system message
    assert out == f"{first}\n{second}\n{third}\n"  # the replies alone, in order; "never read" was not
    assert second != third
    for said in ["chatting with", "(system message: 'You tell short stories.')", "(the conversation starts again)",
                 "/reset         forget the conversation", "unknown command /bogus: /help lists them"]:
        assert said in err


def test_end_of_input_and_ctrl_c_end_cleanly(chat_run):
    proc = gptlab_process("chat", str(chat_run), *FLAGS, "-q")
    out, err = proc.communicate("Hello\n", timeout=120)  # no /quit: the input just ends
    assert proc.returncode == 0 and out.count("\n") == 1 and err == ""

    proc = gptlab_process("chat", str(chat_run), *FLAGS)
    assert "chatting with" in proc.stderr.readline()  # the banner: it waits at the prompt now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "" and "Traceback" not in err


def test_a_base_run_is_one_line_exit_2(make_export_run):
    run = make_export_run("base-for-chat")
    proc = gptlab_process("chat", str(run))
    out, err = proc.communicate("Hello\n", timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and f"{run} has no chat tokens" in err and "gptlab sft" in err


def test_a_mismatched_tokenizer_is_one_line(chat_run, tiny_tokenizer, tmp_path, capsys):
    run = shutil.copytree(chat_run, tmp_path / "run")
    shutil.copy(tiny_tokenizer, run / "tokenizer.json")  # the base tokenizer, without the chat tokens
    assert main(["chat", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the tokenizer step_0000010 was trained with" in err


def test_the_session_keeps_the_history_within_the_context(chat_run):
    model, tokenizer, _ = load_run(chat_run)
    session = ChatSession(model, tokenizer, GREEDY, system="You tell short stories.")
    notes = []
    for i in range(12):
        session.say(f"Tell me story number {i}, please.", on_note=notes.append)
    assert notes and all(n.startswith("dropped 1 oldest turn") for n in notes)  # one turn at a time, once full
    assert session.messages[0] == {"role": "system", "content": "You tell short stories."}
    assert session.history[-2] == user("Tell me story number 11, please.") and len(session.history) < 24

    kept = list(session.history)
    with pytest.raises(GptlabError, match="the last turn takes"):
        session.say("the cat sat on the mat " * 40)
    assert session.history == kept  # a message that cannot fit leaves the conversation as it was
    session.reset()
    assert session.messages == [{"role": "system", "content": "You tell short stories."}]


def test_the_terminal_says_a_turn_is_too_long_and_goes_on(chat_run):
    model, tokenizer, _ = load_run(chat_run)
    stdin = io.StringIO("the cat sat on the mat " * 40 + "\nHello\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_in_terminal(ChatSession(model, tokenizer, GREEDY), stdin=stdin, stdout=stdout, stderr=stderr) == 0
    assert stderr.getvalue().startswith("gptlab: error: the last turn takes") and stderr.getvalue().count("\n") == 1
    assert stdout.getvalue() == chat_reply(model, tokenizer, [user("Hello")], GREEDY) + "\n"
