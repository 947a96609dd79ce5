"""A sequence's text pieces as its tokens arrive, decoding a short tail per token.

Decoding the whole output again after every token costs O(n) a token, O(n^2) a sequence: at B = 128 sequences of
1,000 tokens that is more host time a step than a Flash-shaped 128K step takes on the H200 (docs/BENCHMARKS.md).
:class:`IncrementalText` decodes only the tokens from the one before the last emitted piece on: the text of
``ids[prefix:read]`` (already emitted) against that of ``ids[prefix:]``; the difference is the new piece. A token
that ends inside a multi-byte character decodes to U+FFFD, and the piece waits for the token that completes it. When
the sequence ends, ``Session`` decodes it whole once and yields what that adds (a character left incomplete shows as
U+FFFD, as in the whole decode), so the pieces joined are the returned text (tests/test_detokenize.py).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalText:
    """The text of a growing token sequence, piece by piece (``skip_special_tokens``, as ``Session`` decodes)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.skip_special_tokens = skip_special_tokens
        # a fast tokenizer without the WordPiece space clean-up decodes with its Rust backend alone, which is what
        # transformers' decode then runs, at a quarter of the host time a token (two decodes a token, every row)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decoder = backend if plain else tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # first id of the decoded window: context for the next piece (leading spaces, merges)
        self.read = 0  # ids up to here are in the emitted text

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """Append ``token``; the text it completes ("" while a character or word is still open)."""
        self.ids.append(int(token))
        done = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(done) or now.endswith(REPLACEMENT) or not now.startswith(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(done):]
