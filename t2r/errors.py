"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class T2RError(Exception):
    """A failure caused by the user's input or environment (bad option, missing file, corrupt shard...)."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none), for a T2RError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
