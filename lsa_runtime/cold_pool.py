"""The CPU cold pool of Lookahead Sparse Attention: every CSA layer's compressed entries, all of them, on the host.

FlashMemory (DESIGN.md, "Session") keeps on the device only the compressed entries the memory indexer selected
(the resident set); the full history lives here, one row per compressed entry s:

* ``"compressor"`` -> C^Comp_s, the compressed KV the attention reads (``head_dim`` wide, 512 on V4-Flash);
* ``"indexer"``    -> K^IComp_s, the Lightning Indexer's compressed key (``index_head_dim`` wide, 128).

Rows are appended as the backbone emits entries (one per m = 4 tokens) and gathered back by entry index when a
trigger fetches them. Host memory is pinned when CUDA is available (page-locked memory makes the host->device
copy asynchronous and about twice as fast); on a CPU-only machine it is ordinary memory.

Two gather paths (their speeds: docs/BENCHMARKS.md, "Trigger cost"):

* zero-copy (the default on a GPU with Triton): the device reads the scattered rows straight from the pinned
  pool (``kernels/pool_gather.py``), one pass over the bus;
* staged (CPU, or ``zero_copy=False``): a CPU ``index_select`` into a staging buffer, then one copy to the
  device.

Every transfer to the device is counted here, and only here, by purpose (:data:`PURPOSES`): ``"prefill"`` (rows
the prefill's native top-k picked, index keys restaged for a continued conversation) or ``"fetch"`` (what
decoding fetches: trigger fetches, memory keys streamed to a trigger, per-step buffer misses). Readers ask
:meth:`ColdPool.moved_bytes`; nobody else writes the counts.

Thread safety: the decode thread appends while a prefetch thread (:mod:`~.prefetch`) gathers. A lock makes
"launch a read of the host rows, record its event" and "wait for the last read, grow (move) the rows" atomic
with respect to each other; the transfer counts are updated under it too.
"""

from __future__ import annotations

import threading

import torch

from .kernels.pool_gather import gather_rows, gather_rows_layers, zero_copy_available

PURPOSES = ("prefill", "fetch")


POOL_STORAGE = ("model", "fp8")  # the model's dtype, or FP8 e4m3 with a power-of-two scale per FP8_BLOCK values
FP8_BLOCK = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _n_blocks(width: int) -> int:
    return -(-width // FP8_BLOCK)


def _by_block(rows: torch.Tensor) -> torch.Tensor:
    """[n, w] -> [n, blocks, FP8_BLOCK], the last block zero-padded (a zero changes no block's absmax)."""
    pad = _n_blocks(rows.shape[1]) * FP8_BLOCK - rows.shape[1]
    return torch.nn.functional.pad(rows, (0, pad)).view(rows.shape[0], -1, FP8_BLOCK)


def power_of_two_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``s`` with ``amax / s <= 448`` (1 where ``amax`` is 0), in fp32.

    Powers of two, as the release's UE8M0 scales, make every later step exact (``x / s`` and ``q * s``), and the
    exponent comes from integer work on ``frexp`` alone: a pool quantized on a GPU holds the same bits as one
    quantized on the CPU (a CUDA division by the constant 448 multiplies by its rounded reciprocal, so fp32 scales
    ``amax / 448`` differed from the CPU's in the last bit and moved e4m3 roundings)."""
    mantissa, exponent = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    # m * 2^e <= 448 * 2^k = 7 * 2^(k + 6): k = e - 9 while m <= 7/8, else e - 8
    k = exponent - 9 + (mantissa > 0.875).to(exponent.dtype)
    k = torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-126, 127)
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)  # 2^k built from its IEEE bits


def quantize_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [n, w] -> (e4m3 bit patterns as uint8 [n, w], fp32 scales [n, ceil(w / FP8_BLOCK)]): each block of
    FP8_BLOCK values is divided by the power of two just above absmax / 448 (:func:`power_of_two_scales`) and
    rounded to e4m3 (round to nearest even)."""
    blocks = _by_block(rows.float())
    scales = power_of_two_scales(blocks.abs().amax(dim=2))
    q = (blocks / scales.unsqueeze(2)).flatten(1)[:, : rows.shape[1]]
    return q.to(torch.float8_e4m3fn).view(torch.uint8), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize_fp8` (up to e4m3 rounding), in ``dtype``."""
    blocks = _by_block(q.view(torch.float8_e4m3fn).float())
    return (blocks * scales.unsqueeze(2)).flatten(1)[:, : q.shape[1]].to(dtype)


def pinning_available() -> bool:
    """Pinned (page-locked) host memory exists only with a CUDA runtime."""
    return torch.cuda.is_available()


class GrowingRows:
    """A ``[capacity, width]`` tensor filled up to ``length`` rows: amortised O(1) appends, no per-append copy.

    Used for the cold pool (host) and for the device-side row stores (resident entries, memory-indexer keys).
    ``nbytes`` is the capacity, i.e. what is really allocated.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str, pin: bool = False,
                 capacity: int = 0, growth: float = 0.25, min_growth: int = 64):
        self.width = int(width)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pin = bool(pin) and self.device.type == "cpu"
        self.growth = growth
        self.min_growth = min_growth
        self.length = 0
        self.data = self._allocate(int(capacity))

    @classmethod
    def over(cls, data: torch.Tensor, length: int) -> "GrowingRows":
        """Rows kept in ``data`` (e.g. one layer's slice of a store shared by several layers), ``length`` filled;
        appends past its capacity move them to a tensor of their own."""
        rows = cls.__new__(cls)
        rows.width, rows.dtype, rows.device = data.shape[1], data.dtype, data.device
        rows.pin, rows.growth, rows.min_growth = False, 0.25, 64
        rows.length, rows.data = int(length), data
        return rows

    def _allocate(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, self.width), dtype=self.dtype, device=self.device, pin_memory=self.pin)

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows in total (never shrinks)."""
        if capacity <= self.capacity:
            return
        grown = self._allocate(capacity)
        grown[: self.length].copy_(self.data[: self.length])
        self.data = grown

    def needs_growth(self, n: int) -> bool:
        return self.length + n > self.capacity

    def append(self, rows: torch.Tensor, non_blocking: bool = False) -> None:
        """Append ``rows`` [n, width] (any device; copied here, asynchronously if ``non_blocking``)."""
        n = rows.shape[0]
        if n == 0:
            return
        if self.needs_growth(n):
            want = self.length + n
            self.reserve(max(want, self.capacity + max(int(self.capacity * self.growth), self.min_growth)))
        self.data[self.length : self.length + n].copy_(rows, non_blocking=non_blocking)
        self.length += n

    def view(self) -> torch.Tensor:
        """The filled rows, ``[length, width]`` (a view: valid until the next append)."""
        return self.data[: self.length]

    def __len__(self) -> int:
        return self.length


class ColdPool:
    """Host store of every CSA layer's compressed KV and indexer keys, with counted gathers to the device.

    Usage::

        pool = ColdPool(layers=[2, 4], widths={"compressor": 512, "indexer": 128}, dtype=torch.bfloat16)
        pool.append(2, "compressor", new_entries)          # [n, 512], any device
        rows = pool.gather(2, "compressor", ids, "cuda")    # ids: int64 entry indices -> [len(ids), 512]
    """

    NAMES = ("compressor", "indexer")

    def __init__(self, layers, widths: dict[str, int], dtype: torch.dtype, pin: bool | None = None,
                 initial_entries: int = 0, zero_copy: bool = True, storage: str = "model"):
        if storage not in POOL_STORAGE:
            raise ValueError(f"pool storage must be one of {', '.join(POOL_STORAGE)}, got {storage!r}")
        self.layers = [int(x) for x in layers]
        self.widths = dict(widths)
        self.dtype = dtype  # what gathers return: the model's dtype
        self.storage = storage
        self.pin = pinning_available() if pin is None else bool(pin) and pinning_available()
        stored = torch.uint8 if storage == "fp8" else dtype  # fp8: e4m3 bit patterns (host kernels index uint8)
        self.rows: dict[tuple[int, str], GrowingRows] = {
            (layer, name): GrowingRows(self.widths[name], stored, "cpu", pin=self.pin, capacity=initial_entries,
                                       growth=1.0, min_growth=1024)
            for layer in self.layers for name in self.NAMES
        }
        # fp8: one fp32 scale per FP8_BLOCK values of a row (the power of two just above absmax / 448), beside the rows
        self.scales: dict[tuple[int, str], GrowingRows] = {
            key: GrowingRows(_n_blocks(self.widths[key[1]]), torch.float32, "cpu", pin=self.pin,
                             capacity=initial_entries, growth=1.0, min_growth=1024)
            for key in self.rows} if storage == "fp8" else {}
        self._staging: dict[str, torch.Tensor] = {}
        self._staging_ready: dict[str, object] = {}
        self._appended = None  # CUDA event after the last asynchronous device->host append
        self.zero_copy = bool(zero_copy)  # device-side gather from pinned rows where available
        self._read = None  # CUDA event after the last zero-copy gather (it reads the host rows asynchronously)
        self._moved = {purpose: [0, 0] for purpose in PURPOSES}  # purpose -> [bytes, rows] sent to a device
        self._lock = threading.RLock()

    def _count(self, purpose: str, rows: int, width: int, itemsize: int) -> None:
        if purpose not in self._moved:
            raise ValueError(f"unknown transfer purpose {purpose!r} (one of {', '.join(PURPOSES)})")
        self._moved[purpose][0] += rows * width * itemsize
        self._moved[purpose][1] += rows

    def moved_bytes(self, purpose: str | None = None) -> int:
        """Bytes sent to a device for ``purpose`` (None: all purposes)."""
        with self._lock:
            return sum(b for p, (b, _) in self._moved.items() if purpose in (None, p))

    def moved_rows(self, purpose: str | None = None) -> int:
        """Rows sent to a device for ``purpose`` (None: all purposes; a row of several layers counts per layer)."""
        with self._lock:
            return sum(r for p, (_, r) in self._moved.items() if purpose in (None, p))

    def count(self, layer: int, name: str = "compressor") -> int:
        """Entries stored for ``layer`` (the same for both names once a forward has finished)."""
        return len(self.rows[(layer, name)])

    def append(self, layer: int, name: str, entries: torch.Tensor) -> None:
        """Store freshly emitted entries ``[n, width]``. From an accelerator into pinned memory the copy is
        asynchronous (no stall per emitted entry); readers of the pool wait for it (:meth:`_wait_appends`)."""
        self.append_many([(layer, name, entries)])

    def append_many(self, items) -> None:
        """:meth:`append` for several ``(layer, name, entries)`` at once, as a static row's flush hands every CSA
        layer's born entries: one lock, one wait before any growth and one event after the last copy (readers wait
        for the newest event; the copies before it ran on the same stream), instead of one of each per item."""
        staged = []
        for layer, name, entries in items:
            if entries.shape[0] == 0:  # nothing to store (an fp8 quantization of no rows has no shape)
                continue
            entries = entries.detach()
            scales = None
            if self.storage == "fp8":
                entries, scales = quantize_fp8(entries)  # on the entries' device, before the copy to the host
            staged.append((self.rows[(layer, name)], (layer, name), entries, scales))
        asynchronous = False
        with self._lock:
            if any(rows.needs_growth(entries.shape[0]) for rows, _, entries, _ in staged):
                self._wait_appends()  # growing copies the host rows: pending copies into them must have landed
                self._wait_reads()  # ... and frees the old rows, which a zero-copy gather may still be reading
            for rows, key, entries, scales in staged:
                copy_async = self.pin and entries.device.type == "cuda"
                rows.append(entries, non_blocking=copy_async)
                if scales is not None:
                    self.scales[key].append(scales, non_blocking=copy_async)
                asynchronous |= copy_async
            if asynchronous:
                event = torch.cuda.Event()
                event.record()
                self._appended = event

    def _wait_reads(self) -> None:
        if self._read is not None:
            self._read.synchronize()
            self._read = None

    def _wait_appends(self) -> None:
        event = self._appended  # the newest append's event; earlier appends ran before it on the same stream
        if event is not None:
            event.synchronize()

    def host_rows(self, layer: int, name: str) -> torch.Tensor:
        """All rows of ``layer``/``name`` on the host, ``[count, width]`` (a view)."""
        self._wait_appends()
        if self.storage == "fp8":  # a dequantized copy
            return dequantize_fp8(self.rows[(layer, name)].view(), self.scales[(layer, name)].view(), self.dtype)
        return self.rows[(layer, name)].view()

    def stream_prefix(self, layer: int, name: str, n: int, device: torch.device | str,
                      purpose: str = "fetch") -> torch.Tensor:
        """The first ``n`` rows of ``layer``/``name`` on ``device`` (counted for ``purpose``): a trigger reads the
        memory layers' K^IComp of every entry this way when they are kept in the pool
        (``Session(memory_keys="pool")``), a continued prefill restages all index keys. From a pinned pool the copy
        is asynchronous on the current stream, ordered after pending appends; a pool growth waits for it as for a
        zero-copy gather."""
        self._wait_appends()  # outside the lock: the decode thread's appends need not wait for this wait
        with self._lock:
            rows = self.rows[(layer, name)].view()[: int(n)]
            out = rows.to(device, non_blocking=self.pin, copy=True)  # never a view of the pool (CPU)
            if self.storage == "fp8":
                scales = self.scales[(layer, name)].view()[: int(n)].to(device, non_blocking=self.pin, copy=True)
                out = dequantize_fp8(out, scales, self.dtype)
                self._count(purpose, scales.shape[0], scales.shape[1], scales.element_size())
            if self.pin and torch.device(device).type == "cuda":  # a growth must not free rows this copy reads
                self._read = torch.cuda.Event()
                self._read.record()
            self._count(purpose, rows.shape[0], rows.shape[1], rows.element_size())
        return out

    def gather(self, layer: int, name: str, ids: torch.Tensor, device: torch.device | str,
               device_ids: torch.Tensor | None = None, purpose: str = "fetch") -> torch.Tensor:
        """Rows ``ids`` (int64, any device) of ``layer``/``name`` copied to ``device``: ``[len(ids), width]``,
        counted for ``purpose``. ``device_ids``: the same ids already on ``device`` (a caller gathering many layers
        moves them once).

        On a CUDA ``device`` with a pinned pool (and ``zero_copy``), the device gathers the rows itself from
        the pinned host rows (zero-copy, asynchronous on the current stream). Otherwise the rows are gathered
        into a (pinned, when CUDA is present) staging buffer, then copied to ``device`` asynchronously; the
        staging buffer is reused only after that copy has completed.
        """
        self._wait_appends()  # outside the lock: the decode thread's appends need not wait for this wait
        with self._lock:
            return self._gather(layer, name, ids, torch.device(device), device_ids, purpose)

    def _gather(self, layer, name, ids, device, device_ids, purpose):
        source = self.rows[(layer, name)].view()
        width = self.widths[name]
        if ids.numel() and int(ids.max()) >= source.shape[0]:
            raise IndexError(f"entry {int(ids.max())} is not in the cold pool of layer {layer} "
                             f"({source.shape[0]} entries)")
        if self.storage == "fp8":
            return self._gather_fp8(layer, name, ids, device, purpose)
        if self.zero_copy and device.type == "cuda" and zero_copy_available(source, device):
            out = gather_rows(source, ids if device_ids is None else device_ids, device)
            self._read = torch.cuda.Event()
            self._read.record()
            self._count(purpose, out.shape[0], width, source.element_size())
            return out
        ids = ids.to("cpu", torch.long).reshape(-1)
        n = ids.numel()
        staging = self._staging_buffer(name, n, width)
        rows = staging[:n]
        torch.index_select(source, 0, ids, out=rows)
        # copy=True: on a CPU "device" the result must not alias the staging buffer, which is reused.
        out = rows.to(device, non_blocking=self.pin, copy=True)
        if self.pin and device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._staging_ready[name] = event
        self._count(purpose, n, width, source.element_size())
        return out

    def _gather_fp8(self, layer, name, ids, device, purpose):
        """fp8 storage: the rows and their scales gathered on the host, copied, dequantized on ``device``."""
        ids = ids.to("cpu", torch.long).reshape(-1)
        parts = []
        for store, key in ((self.rows, name), (self.scales, name + ".scale")):
            source = store[(layer, name)].view()
            staging = self._staging_buffer(key, ids.numel(), source.shape[1], source.dtype)[: ids.numel()]
            torch.index_select(source, 0, ids, out=staging)
            parts.append(staging.to(device, non_blocking=self.pin, copy=True))
            if self.pin and device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._staging_ready[key] = event
            self._count(purpose, ids.numel(), source.shape[1], source.element_size())
        return dequantize_fp8(parts[0], parts[1], self.dtype)

    def gather_layers_available(self, device: torch.device | str | None) -> bool:
        """Whether :meth:`gather_layers` can run: the zero-copy gather to a CUDA ``device`` from a pinned pool
        (or the Triton interpreter on the CPU, for checks)."""
        import os

        if device is None or not self.zero_copy or self.storage == "fp8":
            return False
        source = self.rows[(self.layers[0], self.NAMES[0])].data
        if os.environ.get("TRITON_INTERPRET") == "1":
            return zero_copy_available(source, device)
        return torch.device(device).type == "cuda" and zero_copy_available(source, device)

    def gather_layers(self, layers, name: str, ids: torch.Tensor, device_ids: torch.Tensor, dst_rows: torch.Tensor,
                      out: torch.Tensor, purpose: str = "fetch") -> None:
        """``out[j, dst_rows] = rows ids of layers[j]`` for all ``layers`` in one zero-copy launch (see
        :func:`~.kernels.pool_gather.gather_rows_layers`). ``ids``: int64, host or device (checked against the pool),
        ``device_ids`` / ``dst_rows``: int64 on ``out``'s device. Only where :meth:`gather_layers_available`."""
        self._wait_appends()  # outside the lock, as in gather
        with self._lock:
            sources = [self.rows[(layer, name)].view() for layer in layers]
            count = min(source.shape[0] for source in sources)
            if ids.numel() and int(ids.max()) >= count:
                raise IndexError(f"entry {int(ids.max())} is not in the cold pool of every layer ({count} entries)")
            gather_rows_layers(sources, device_ids, dst_rows, out)
            if out.device.type == "cuda":
                self._read = torch.cuda.Event()
                self._read.record()
            self._count(purpose, ids.numel() * len(layers), self.widths[name], out.element_size())

    def _staging_buffer(self, name: str, n: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        ready = self._staging_ready.pop(name, None)
        if ready is not None:
            ready.synchronize()  # the previous async copy still reads this buffer
        buffer = self._staging.get(name)
        if buffer is None or buffer.shape[0] < n:
            capacity = max(n, 2 * buffer.shape[0] if buffer is not None else 256)
            buffer = torch.empty((capacity, width), dtype=dtype or self.dtype, pin_memory=self.pin)
            self._staging[name] = buffer
        return buffer

    @property
    def nbytes(self) -> int:
        """Host bytes allocated by the pool (row stores; the staging buffers excluded)."""
        return sum(rows.nbytes for rows in (*self.rows.values(), *self.scales.values()))

    @property
    def used_bytes(self) -> int:
        """Host bytes of the stored entries (what the pool must hold at minimum)."""
        return sum(len(rows) * rows.width * rows.data.element_size()
                   for rows in (*self.rows.values(), *self.scales.values()))
