"""The one exception type a user sees: a one-line message naming what is wrong and how to fix it."""


def one_line(text, limit: int = 200) -> str:
    """Text quoted in an error message (a value from a recipe, another exception's message): one
    line, not too long."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit] + "..."


class Note(UserWarning):
    """A fallback the tool took where the user may expect otherwise, said in one line (the CLI
    prints `note: <message>`; a library caller sees a warning of this class)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MergeError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits non-zero, without a traceback.

    Messages name the file, model and tensor at fault and say what to do, on one line.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
