"""The one exception type that reaches a user as a single line.

Raise `GptlabError` for anything the user can fix (bad input, bad config, a
missing file). The CLI prints its message alone and exits with code 2; any
other exception is a bug in gptlab and keeps its traceback.
"""


class GptlabError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""

    exit_code = 2
    # True when the process cannot end normally: the CLI exits at once after printing (see LostContact).
    exit_at_once = False

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(" ".join(message.split()))  # one line, whatever the caller passed
