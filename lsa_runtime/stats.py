"""What a Session holds and has moved: :class:`SessionStats`, read from the state's owners, and its table.

``measure_cache`` counts the real device bytes of a cache (stock or cold-pool layers) by kind, next to what full
decoding holds for the same tokens. The counters come from their owners: transfers from the
:class:`~.cold_pool.ColdPool` (by purpose), trigger changes from the :class:`~.residency.ResidentSet`, per-step
misses from the :mod:`~.hisparse` buffers, times from the decode loop. ``Session.stats`` assembles a new
``SessionStats`` from them on every read; nothing is accumulated into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .backbone import CSA, HCA

KINDS = ("window", "pending", "hca", "csa_kv", "csa_index_keys", "memory_index_keys")
KIND_LABELS = {
    "window": "sliding-window KV (all layers)",
    "pending": "open compression windows",
    "hca": "HCA compressed KV",
    "csa_kv": "CSA compressed KV (resident)",
    "csa_index_keys": "CSA indexer keys (resident)",
    "memory_index_keys": "indexer keys of all entries (memory layers)",
}


@dataclass(frozen=True)
class SessionStats:
    """Device KV footprint and trigger/fetch counters of a Session's current decoding state.

    ``device_bytes[kind]``: real bytes of the tensors held on the device (allocated storage, shared storage
    counted once). ``full_bytes[kind]``: what full decoding holds for the same tokens (every CSA entry's KV
    and indexer keys on the device). Two ratios, never to be confused:

    * ``csa_kv_ratio`` = device / full bytes of the CSA attention KV (C^Comp) alone: the paper's footprint
      metric, which leaves out the sliding windows, HCA entries, open compression windows and index keys;
    * ``footprint_ratio`` (also ``total_kv_ratio``) = sum(device_bytes) / sum(full_bytes): every kind of KV
      state on the device, memory-indexer keys included.
    ``selected_per_trigger``: the size of the set each trigger selected (born entries not included): the budget
    a control at the same footprint must match. ``entries_fetched``: entries newly made resident (triggers),
    or buffer misses summed over CSA layers (hisparse).
    """

    mode: str
    policy: str
    context_tokens: int = 0
    csa_entries: int = 0
    resident_entries: int = 0
    device_bytes: dict[str, int] = field(default_factory=dict)
    full_bytes: dict[str, int] = field(default_factory=dict)
    triggers: int = 0
    selected_per_trigger: tuple[int, ...] = ()
    entries_fetched: int = 0
    fetch_bytes_to_device: int = 0
    prefill_bytes_to_device: int = 0
    trigger_seconds: float = 0.0
    prefetch_seconds: float = 0.0
    prefetch_wait_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cold_pool_bytes: int = 0
    device_bytes_by_device: dict[str, int] = field(default_factory=dict)  # the same bytes, per device

    @property
    def device_total(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def full_total(self) -> int:
        return sum(self.full_bytes.values())

    @property
    def footprint_ratio(self) -> float:
        return self.device_total / self.full_total if self.full_total else 1.0

    @property
    def total_kv_ratio(self) -> float:
        return self.footprint_ratio

    @property
    def csa_kv_ratio(self) -> float:
        full = self.full_bytes.get("csa_kv", 0)
        return self.device_bytes.get("csa_kv", 0) / full if full else 1.0

    @property
    def selected_mean(self) -> float | None:
        """Mean entries selected per trigger (None without triggers)."""
        sizes = self.selected_per_trigger
        return sum(sizes) / len(sizes) if sizes else None

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["selected_per_trigger"] = list(self.selected_per_trigger)
        out.update(device_total=self.device_total, full_total=self.full_total,
                   footprint_ratio=self.footprint_ratio, csa_kv_ratio=self.csa_kv_ratio,
                   decode_tokens_per_second=self.decode_tokens_per_second,
                   prefill_tokens_per_second=self.prefill_tokens_per_second)
        return out

    def table(self):
        """A rich ``Table`` of the footprint by kind and the counters."""
        from rich.table import Table

        table = Table(title=f"KV footprint: {self.policy}")
        table.add_column("device state")
        table.add_column("held", justify="right")
        table.add_column("full decoding", justify="right")
        for kind in KINDS:
            table.add_row(KIND_LABELS[kind], human_bytes(self.device_bytes.get(kind, 0)),
                          human_bytes(self.full_bytes.get(kind, 0)))
        table.add_row("[bold]total[/]", f"[bold]{human_bytes(self.device_total)}[/]", human_bytes(self.full_total))
        if len(self.device_bytes_by_device) > 1:
            for name, held in sorted(self.device_bytes_by_device.items()):
                table.add_row(f"  on {name}", human_bytes(held), "")
        table.add_row("[bold]CSA-KV ratio[/] (the paper's footprint: CSA attention KV only)",
                      f"[bold]{self.csa_kv_ratio:.3f}[/]", "1.000")
        table.add_row("[bold]total KV ratio[/] (every kind above)", f"[bold]{self.footprint_ratio:.3f}[/]", "1.000")
        if self.footprint_ratio > 1:
            table.add_row("[dim]above 1: on a short context the room kept for entries born before the next trigger "
                          "and for index-key growth outweighs the entries left out[/]", "", "")
        table.add_section()
        selected = f"{self.selected_mean:,.1f}" if self.selected_mean is not None else "-"
        for label, value in [
            ("context tokens / CSA entries per layer", f"{self.context_tokens:,} / {self.csa_entries:,}"),
            ("resident CSA entries", f"{self.resident_entries:,}"),
            ("triggers / entries selected per trigger (mean)", f"{self.triggers:,} / {selected}"),
            ("entries fetched (host->device)", f"{self.entries_fetched:,}"),
            ("bytes moved after prefill / by prefill", f"{human_bytes(self.fetch_bytes_to_device)} / "
                                                    f"{human_bytes(self.prefill_bytes_to_device)}"),
            ("time in trigger + fetch (decode thread)", f"{self.trigger_seconds * 1000:,.1f} ms"),
            ("prefetch: its jobs / decode thread waited", f"{self.prefetch_seconds * 1000:,.1f} ms / "
                                                          f"{self.prefetch_wait_seconds * 1000:,.1f} ms"),
            ("prefill", f"{self.prefill_tokens:,} tok, {self.prefill_tokens_per_second:,.0f} tok/s"),
            ("decode", f"{self.decode_tokens:,} tok, {self.decode_tokens_per_second:,.1f} tok/s"),
            ("cold pool (host)", human_bytes(self.cold_pool_bytes)),
        ]:
            table.add_row(label, value, "")
        return table


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def measure_cache(cache, config, by_device: dict[str, int] | None = None
                  ) -> tuple[dict[str, int], dict[str, int], int, int]:
    """Real device bytes by kind of ``cache`` (stock or cold-pool layers), and what full decoding holds for the
    same tokens.

    Returns ``(device_bytes, full_bytes, csa_entries_per_layer, resident_entries)``. Storage shared between
    tensors (K = V in DeepSeek-V4, views of one buffer, one store for several layers' rows) is counted once.
    ``by_device``, if given, receives the same bytes summed per device (a backbone spread over devices).
    """
    from .lsa_cache import PooledCSACache

    seen: set[tuple[str, int]] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
            if by_device is not None:
                by_device[str(t.device)] = by_device.get(str(t.device), 0) + storage.nbytes()
        return total

    device = dict.fromkeys(KINDS, 0)
    full = dict.fromkeys(KINDS, 0)
    entries = resident = 0
    for idx, layer in enumerate(cache.layers):
        window = size([getattr(layer, "keys", None), getattr(layer, "values", None)])
        device["window"] += window
        full["window"] += window
        if not hasattr(layer, "compressed_kv"):
            continue
        pending = [t for states in (layer.buffer_kv, layer.buffer_gate, getattr(layer, "overlap_kv", {}),
                                    getattr(layer, "overlap_gate", {})) for t in states.values()]
        pending_bytes = size(pending)
        device["pending"] += pending_bytes
        full["pending"] += pending_bytes
        if config.layer_types[idx] == HCA:
            hca = size([layer.compressed_kv["compressor"]])
            device["hca"] += hca
            full["hca"] += hca
            continue
        if config.layer_types[idx] != CSA:
            continue
        n = layer.entry_count["compressor"]
        entries = max(entries, n)
        if isinstance(layer, PooledCSACache):
            held = layer.device_tensors()
            device["csa_kv"] += size(held["resident_kv"])
            device["csa_index_keys"] += size(held["resident_index_keys"])
            device["memory_index_keys"] += size(held["memory_index_keys"])
            resident = max(resident, layer.resident_count)
            itemsize = torch.empty((), dtype=layer.dtype).element_size() if layer.dtype else 0
            full["csa_kv"] += n * config.head_dim * itemsize
            full["csa_index_keys"] += n * config.index_head_dim * itemsize
        else:
            kv, keys = layer.compressed_kv["compressor"], layer.compressed_kv["indexer"]
            device["csa_kv"] += size([kv])
            device["csa_index_keys"] += size([keys])
            full["csa_kv"] += kv.numel() * kv.element_size() if kv is not None else 0
            full["csa_index_keys"] += keys.numel() * keys.element_size() if keys is not None else 0
            resident = max(resident, n)
    return device, full, entries, resident
