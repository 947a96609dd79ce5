"""Decoding several sequences in one :class:`~.static_decode.StaticDecodeState`: rows join from prefilled stock
caches and leave back into them; on a GPU the step is one CUDA graph, captured when the runner is built.

A Session with ``static_decode=True`` (mode ``full``) decodes through this: each prompt is prefilled with the stock
model into its own ``DynamicCache`` (chunked, as always), joins a free row (``load_row``), decodes in the fixed-
shape step with the others, and on finishing is written back into its cache (``store_row``), so its footprint is
measured from the cache exactly as the stock path's is, and ``keep_context`` continues from it. A row with no
sequence is stepped with its last token at a frozen position and its logits ignored (the shapes never change,
so the captured graph stays valid; tests/test_static_decode.py). The graph is captured once per runner (one per
``generate``/``stream`` call: its capacity is that call's longest prompt plus ``max_new_tokens``).

In LSA's resident mode (``resident=R``; trigger modes) each row's CSA layers hold R entry slots: the sequence's
resident set after its first trigger, then the entries it emits; the Session runs each trigger between steps
(:class:`~.static_residency.StaticResidentRows`: born entries to the row's cold pool, the selection installed in
place), reading h_t at the memory layers from buffers the captured step itself writes (:attr:`StaticRunner.hidden`).
"""

from __future__ import annotations

import torch

from .backbone import csa_layers
from .static_decode import StaticDecodeState, install_static_attention, static_step, use_capturable_experts
from .static_residency import StaticResidentRows


def release_cache(cache) -> None:
    """Replace the big tensors of a batch-1 stock ``cache`` (window K=V, compressed entries) by empty ones of the
    same layout; the small open-window buffers stay. Only :meth:`StaticDecodeState.store_row` may follow."""
    for layer in cache.layers:
        layer.keys = layer.keys.new_empty(layer.keys.shape[:2] + (0, layer.keys.shape[3]))
        layer.values = layer.keys
        for name, entries in getattr(layer, "compressed_kv", {}).items():
            if entries is not None:
                layer.compressed_kv[name] = entries.new_empty((entries.shape[0], 0, entries.shape[2]))


class StaticRunner:
    """``rows`` decode slots of ``capacity`` tokens each for ``model`` (its device and dtype); ``graph``: capture
    the step as one CUDA graph (a CUDA device), else run it eagerly. ``resident``: LSA's resident mode, that many
    CSA entry slots per row (:mod:`.static_residency`; the benchmark's, not yet the Session's)."""

    def __init__(self, model, rows: int, capacity: int, graph: bool, resident: int | None = None,
                 hidden_layers=()):
        self.model = model
        install_static_attention(model)
        self.state = StaticDecodeState(model.config, rows, capacity, model.dtype, model.device, resident=resident)
        self.positions = [0] * rows  # host copies: tokens seen per row, the next step's token per row
        self.tokens = [0] * rows
        # LSA's resident mode: which entries each row's CSA slots hold, changed by triggers between steps
        self.resident = StaticResidentRows(self.state, csa_layers(model.config), self.positions) \
            if resident is not None else None
        # h_t (the attention input) of every row at the memory layers, written by the step itself into the layer's
        # stores (StaticLayer.hidden; compiled and captured with the step): a trigger reads the last step's
        self.hidden = {int(i): torch.zeros(rows, model.config.hidden_size, dtype=model.dtype, device=model.device)
                       for i in hidden_layers}
        for i, buffer in self.hidden.items():
            self.state.layers[i].hidden = buffer
        self.free = list(range(rows - 1, -1, -1))  # rows without a sequence (popped from the end: row 0 first)
        self.graph, self.logits = None, None
        if graph:
            self.capture()

    def capture(self) -> None:
        """Warm up off the capture (it steps the rows as they are: harmless, a row is reset when a sequence joins),
        then capture one step; its logits buffer is what every replay writes. (bench/bench_static.py calls it
        after filling the rows itself.)"""
        use_capturable_experts(self.model)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                static_step(self.model, self.state)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = static_step(self.model, self.state)

    def join(self, cache, residency=None, pool=None) -> int:
        """Put a sequence prefilled into the batch-1 ``cache`` in a free row; returns the row. The cache's window
        keys and compressed entries are released (the row holds them now; :meth:`leave` writes them back), so a
        sequence's KV is held once, not twice, while it decodes here. Resident mode: ``residency`` / ``pool`` are
        the sequence's ``ResidentSet`` (its rows move into the slots) and cold pool (kept in use)."""
        if (residency is None) != (self.resident is None):
            raise ValueError("a runner in LSA's resident mode takes sequences with their resident set and cold pool, "
                             "a full one without")
        row = self.free.pop()
        if residency is None:
            self.positions[row] = self.state.load_row(row, cache)
        else:
            self.positions[row] = self.resident.join(row, cache, residency, pool)
            residency.hand_over()
        release_cache(cache)
        return row

    def leave(self, row: int, cache, residency=None, index_keys: dict | None = None) -> None:
        """Write ``row`` back into the sequence's ``cache`` (resident mode: and its ``residency``; ``index_keys``
        as :meth:`StaticResidentRows.flush` takes them) and free the row."""
        if residency is None:
            self.state.store_row(row, cache, self.positions[row])
        else:
            self.resident.leave(row, cache, residency, self.positions[row], index_keys)
        self.free.append(row)

    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Decode ``tokens[row]`` in each given row at its next position; returns logits ``[rows, vocab]`` (rows not
        given are stepped and must be ignored). The returned tensor is overwritten by the next step."""
        for row, token in tokens.items():
            if self.positions[row] >= self.state.geometry.capacity:
                raise ValueError(f"row {row}: position {self.positions[row]} is beyond the capacity of "
                                 f"{self.state.geometry.capacity} tokens")
            self.tokens[row] = token
        self.state.tokens.copy_(torch.tensor(self.tokens))
        self.state.positions.copy_(torch.tensor(self.positions))
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            with torch.no_grad():
                logits = static_step(self.model, self.state)
        for row in tokens:
            self.positions[row] += 1
        return logits
