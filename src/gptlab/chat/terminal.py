"""`gptlab chat RUN`: a conversation in the terminal, the reply streamed as it is generated.

    ChatSession(model, tokenizer, cfg, system=None)   the history and system message of one conversation
        .say(text, on_token=None, on_note=None) -> str     the reply to a user message (kept in the history)
        .reset(), .system, .messages
    chat_in_terminal(session, ...) -> exit code        the read-reply loop behind `gptlab chat`

Lines come from stdin: typed (with line editing where the readline module exists) or piped, so
a script or a test can drive it. Replies go to stdout; notes, the banner and command answers to
stderr, so stdout is the conversation alone. Commands: /system TEXT, /reset, /help, /quit; end
of input (Ctrl-D) and Ctrl-C at the prompt end the conversation, Ctrl-C during a reply stops
that reply (the turn is forgotten).
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate.chat import chat_prompt, chat_reply
from gptlab.tokenizer.chat import ChatFormat

HELP = """\
/system TEXT   set the system message (the history stays); /system alone removes it
/reset         forget the conversation (the system message stays)
/help          this list
/quit          end the conversation (so do /exit, Ctrl-D and Ctrl-C)"""


class ChatSession:
    """One conversation with a chat model: the history within the context, a system message, replies."""

    def __init__(self, model, tokenizer, cfg: SampleConfig | None = None, system: str | None = None, what: str = "this run"):
        ChatFormat.of(tokenizer, what)  # a base run: one line saying to fine-tune it first
        self.model, self.tokenizer, self.cfg, self.what = model, tokenizer, cfg or SampleConfig(), what
        self.system = system or None
        self.history: list[dict] = []  # user and assistant messages, oldest first

    @property
    def messages(self) -> list[dict]:
        """The conversation as the model sees it: the system message, then the history."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history = []

    def say(self, text: str, on_token: Callable[[str], None] | None = None,
            on_note: Callable[[str], None] | None = None) -> str:
        """The reply to the user message `text`; both join the history, less the oldest turns where the context
        is full (on_note hears of it). A message too long to fit on its own: GptlabError, the history unchanged."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = chat_prompt(self.tokenizer, messages, self.model.cfg.context_length, self.cfg.max_new_tokens, self.what)
        if prompt.note and on_note is not None:
            on_note(prompt.note)
        reply = chat_reply(self.model, self.tokenizer, prompt.messages, self.cfg, on_token=on_token, on_note=None)
        # the dropped turns stay dropped: the next reply starts from what this one saw
        self.history = [m for m in prompt.messages if m["role"] != "system"] + [{"role": "assistant", "content": reply}]
        return reply


def chat_in_terminal(session: ChatSession, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
                     stderr: TextIO | None = None, banner: str | None = None) -> int:
    """Talk until /quit, end of input or Ctrl-C at the prompt; returns the exit code (0)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps their history)
        except ImportError:
            pass

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def read() -> str:
        if stdin is sys.stdin:  # input(): line editing where readline is loaded
            return input("> " if interactive else "")
        line = stdin.readline()
        if not line:
            raise EOFError
        return line

    try:
        if banner:
            say(banner)
        while True:
            try:
                line = read().rstrip("\r\n")
            except EOFError:
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                if not _command(session, line, say):
                    return 0
                continue
            try:
                session.say(line, on_token=write, on_note=lambda note: say(f"note: {note}"))
                write("\n")
            except GptlabError as e:  # a message too long for the context: say so and go on
                say(f"gptlab: error: {e}")
            except KeyboardInterrupt:
                write("\n")
                say("(reply stopped; that turn is forgotten)")
    except KeyboardInterrupt:  # Ctrl-C anywhere but in a reply: the end
        pass
    if interactive:  # the prompt's line ends
        write("\n")
    return 0


def _command(session: ChatSession, line: str, say: Callable[[str], None]) -> bool:
    """Do the /command on `line`; False where it ends the conversation."""
    command, _, rest = line.partition(" ")
    if command in ("/quit", "/exit"):
        return False
    if command == "/help":
        say(HELP)
    elif command == "/reset":
        session.reset()
        say("(the conversation starts again)")
    elif command == "/system":
        session.system = rest.strip() or None
        say(f"(system message: {session.system!r})" if session.system else "(no system message)")
    else:
        say(f"unknown command {command}: /help lists them")
    return True
