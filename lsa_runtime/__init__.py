"""lsa_runtime: the serving side of fm-index (pure torch + transformers + safetensors).

Backbone integration (:mod:`.backbone`, :mod:`.capture`), the memory-indexer math (:mod:`.memory_indexer`),
the CPU cold pool (:mod:`.cold_pool`), the resident set (:mod:`.residency`), the cache layers
(:mod:`.lsa_cache`, :mod:`.hisparse`), trigger policies (:mod:`.policies`) and the Lookahead Sparse Attention
decoding :class:`Session` with its options (:mod:`.config`) and statistics (:mod:`.stats`).
It must never import sentence-transformers or datasets.
"""

from .errors import FmIndexError

__all__ = ["FmIndexError", "Session", "SessionConfig", "SamplingParams"]


def __getattr__(name):
    if name == "Session":
        from .session import Session

        return Session
    if name in ("SessionConfig", "SamplingParams"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
