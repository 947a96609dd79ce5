"""One error type for every bad input the user can fix; the CLI prints its message on one line and exits 2."""


class FmIndexError(ValueError):
    """A problem with the user's input (model, corpus, shards, options) that the user can fix."""
