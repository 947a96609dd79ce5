"""One error type for every bad input the user can fix; the CLI prints its message on one line and exits 2."""


class FmIndexError(ValueError):
    """A problem with the user's input (model, corpus, shards, options) that the user can fix."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error messages."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class BackboneError(FmIndexError):
    """A backbone that cannot be used: missing, not DeepSeek-V4, or a layer choice that does not fit it."""
