"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class T2RError(Exception):
    """A failure caused by the user's input or environment (bad option, missing file, corrupt shard...)."""
