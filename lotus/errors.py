"""The one exception type users see."""


class LotusError(Exception):
    """A user-facing error: one line saying what is wrong and what to do about it.

    The CLI prints it without a traceback; anything else escaping is a bug in LOTUS.
    """
