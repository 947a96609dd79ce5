"""Per-step (HiSparse-style) decoding: a lossless baseline with no triggers.

In the spirit of SGLang's HiSparse: at every decode step the native Lightning Indexer scores *every* compressed
entry (K^IComp of all entries stays on the device in every CSA layer), and the C^Comp rows of its top-k come from
a fixed device buffer of ``capacity`` rows per CSA layer with least-recently-used eviction; misses are fetched
from the cold pool at that step. Decoding is exactly full decoding's; what it saves is C^Comp on the device, what
it pays is a fetch on the critical path of every step that misses. Session mode ``hisparse``
(``SessionConfig.budget`` = buffer rows per layer).
"""

from __future__ import annotations

import torch

from .backbone import CSA
from .cold_pool import ColdPool
from .lsa_cache import PooledCSACache


class EntryBuffer:
    """A fixed device buffer of ``capacity`` C^Comp rows of one CSA layer.

    ``rows(ids)`` serves the rows of entries ``ids`` (the native top-k of one step): hits are read in place,
    misses are fetched from the cold pool into the least recently used slots (free slots first).
    """

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, device, pool: ColdPool, layer: int):
        self.capacity = int(capacity)
        self.data = torch.empty((self.capacity, width), dtype=dtype, device=device)
        self.pool, self.layer, self.device = pool, layer, device
        self.entry_in_slot = torch.full((self.capacity,), -1, dtype=torch.long)
        self.last_used = torch.full((self.capacity,), -1, dtype=torch.long)
        self.slot_of: dict[int, int] = {}
        self.clock = 0
        self.misses = 0

    @property
    def occupancy(self) -> int:
        return len(self.slot_of)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """C^Comp rows of entries ``ids`` (host int64, unique) on the device: ``[len(ids), D]``."""
        ids = ids.reshape(-1)
        if ids.numel() > self.capacity:
            raise ValueError(f"{ids.numel()} picks do not fit a buffer of {self.capacity} entries")
        self.clock += 1
        slots = torch.tensor([self.slot_of.get(int(e), -1) for e in ids], dtype=torch.long)
        hit = slots >= 0
        self.last_used[slots[hit]] = self.clock
        if not bool(hit.all()):
            missing = ids[~hit]
            # the least recently used slots; this step's hits carry the newest clock, so they are never chosen
            victims = torch.argsort(self.last_used, stable=True)[: missing.numel()]
            for old in self.entry_in_slot[victims].tolist():
                if old >= 0:
                    del self.slot_of[old]
            self.data[victims.to(self.device)] = self.pool.gather(self.layer, "compressor", missing, self.device)
            self.misses += missing.numel()
            self.entry_in_slot[victims] = missing
            self.last_used[victims] = self.clock
            self.slot_of.update(zip(missing.tolist(), victims.tolist()))
            slots[~hit] = victims
        return self.data.index_select(0, slots.to(self.device))


class HiSparseCSACache(PooledCSACache):
    """CSA cache layer of per-step decoding: candidates are every entry at every step; the picks' C^Comp comes
    from this layer's :class:`EntryBuffer`."""

    def __init__(self, config, layer_idx: int, pool: ColdPool, buffer_entries: int):
        super().__init__(config, layer_idx, pool, keep_all_index_keys=True)
        self.buffer_entries = int(buffer_entries)
        self.buffer: EntryBuffer | None = None

    def decode_candidates(self, name: str, new: torch.Tensor) -> torch.Tensor:
        return self.every_entry(name, new)

    def picked_rows(self, candidates: torch.Tensor) -> torch.Tensor:
        if self.in_prefill:
            return super().picked_rows(candidates)
        return self.buffer.rows(candidates.cpu())

    def end_prefill(self) -> None:
        super().end_prefill()
        if self.buffer is None and self.storing:
            self.buffer = EntryBuffer(self.buffer_entries, self.widths["compressor"], self.dtype, self.device,
                                      self.pool, self.layer_idx)

    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        kinds = super().device_tensors()
        if self.buffer is not None:
            kinds["resident_kv"].append(self.buffer.data)
        return kinds

    @property
    def resident_count(self) -> int:
        return self.buffer.occupancy if self.buffer is not None else 0

    @property
    def misses(self) -> int:
        """Entries fetched into the buffer so far."""
        return self.buffer.misses if self.buffer is not None else 0


def build_hisparse_cache(config, pool: ColdPool, buffer_entries: int) -> "object":
    """A ``DynamicCache`` for ``config`` whose CSA layers are :class:`HiSparseCSACache` (HCA and sliding stock)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for idx, layer_type in enumerate(config.layer_types):
        if layer_type == CSA:
            cache.layers[idx] = HiSparseCSACache(config, idx, pool, buffer_entries)
    return cache
