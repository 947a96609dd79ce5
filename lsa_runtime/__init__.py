"""lsa_runtime: the serving side of fm-index (pure torch + transformers + safetensors).

Backbone integration (:mod:`.backbone`, :mod:`.capture`), the memory-indexer math (:mod:`.memory_indexer`),
the CPU cold pool and the Lookahead Sparse Attention decoding :class:`Session`.
It must never import sentence-transformers or datasets.
"""

from .errors import FmIndexError

__all__ = ["FmIndexError", "Session"]


def __getattr__(name):
    if name == "Session":
        from .session import Session

        return Session
    raise AttributeError(name)
