"""FlashMemory's golden labels, as pure tensor functions and one streaming accumulator.

For every token t and every CSA layer (definitions fixed in docs/DESIGN.md, "Triggers and labels"):

1. probabilities, by ``softmax_over``:

   * ``"topk"`` (the authors' release, the default): softmax of the raw indexer logits I[t, s] over the entries
     the layer's native top-k picked for t (k = min(index_topk, n_visible(t)));
   * ``"visible"``: softmax over every visible entry s < n_visible(t);

2. nucleus, entries sorted by probability (descending, ties by lower entry index):

   * ``"topk"``, the release's rule: entry i is kept when the mass of the entries before it is <= p (so the
     entry that crosses p is kept, and one more when the mass hits p exactly);
   * ``"visible"``: the shortest prefix whose mass reaches p; if rounding keeps the total below p, every entry
     with probability > 0;

3. vote: an entry is golden for t if it is in the nucleus at >= min_votes CSA layers (default 3);
4. window union: the label of the trigger at t0 is the union of Golden(t) for t in [t0, t0 + tau), restricted
   to s < n_visible(t0).

The visible nucleus avoids a full sort: a top-k pass (k grows x4 until every row's mass is reached, exact
full-sort fallback at the end), then the cut value v* is located and ties at v* are broken by entry index, so
the result equals a brute-force stable sort exactly. The top-k nucleus sorts at most k values per row.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import torch


def visible_softmax(logits: torch.Tensor, n_visible: torch.Tensor) -> torch.Tensor:
    """[S, T] logits -> [S, T] fp32 probabilities over s < n_visible[row]; 0 elsewhere (all 0 if none visible)."""
    s_len, t_len = logits.shape
    entry = torch.arange(t_len, device=logits.device)
    hidden = entry.unsqueeze(0) >= n_visible.to(logits.device).unsqueeze(1)  # [S, T]
    masked = logits.float().masked_fill(hidden, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def nucleus_mask(probs: torch.Tensor, p: float, first_k: int = 64) -> torch.Tensor:
    """[S, T] probabilities (0 on hidden entries) -> [S, T] bool nucleus of mass p per row (see module doc).

    Rows whose probabilities are all 0 (no visible entry) get an empty nucleus.
    """
    s_len, t_len = probs.shape
    out = torch.zeros_like(probs, dtype=torch.bool)
    if s_len == 0 or t_len == 0:
        return out
    has_mass = probs.sum(-1) > 0
    pending = torch.nonzero(has_mass).flatten()
    k = min(max(1, first_k), t_len)
    while pending.numel():
        rows = probs[pending]  # [R, T]
        values = rows.topk(k, dim=-1).values if k < t_len else rows.sort(dim=-1, descending=True).values
        mass = values.double().cumsum(-1)  # [R, k]
        done = mass[:, -1] >= p
        if k >= t_len and (~done).any():
            # Even the whole row stays below p (rounding, or p ~ 1): take every entry with probability > 0.
            out[pending[~done]] = rows[~done] > 0
        if done.any():
            idx = pending[done]
            r_values, r_mass, r_rows = values[done], mass[done], rows[done]
            cut = (r_mass < p).sum(-1)  # index of the entry that crosses p
            v_star = r_values.gather(1, cut.unsqueeze(1))  # [R', 1]
            above = r_rows > v_star
            tied = r_rows == v_star
            need = (cut + 1 - above.sum(-1)).unsqueeze(1)  # how many of the tied entries belong in
            take_tied = tied & (tied.cumsum(-1) <= need)
            out[idx] = above | take_tied
        pending = pending[~done] if k < t_len else pending[:0]
        k = min(k * 4, t_len)
    return out


def nucleus_mask_for_logits(logits: torch.Tensor, n_visible: torch.Tensor, p: float, first_k: int = 64):
    return nucleus_mask(visible_softmax(logits, n_visible), p, first_k)


SOFTMAX_OVER = ("topk", "visible")


def topk_nucleus_mask(logits: torch.Tensor, picks: torch.Tensor, p: float) -> torch.Tensor:
    """The release's nucleus over the native top-k: logits [S, T] (raw I[t, s]), picks [S, k] (entry indices,
    -1 = no pick) -> [S, T] bool. Per row: softmax over the picked entries' logits, entries sorted by probability
    (descending, ties by lower index), entry i kept when the float64 mass before it is <= p."""
    s_len, t_len = logits.shape
    out = torch.zeros((s_len, t_len), dtype=torch.bool, device=logits.device)
    if s_len == 0 or picks.shape[-1] == 0:
        return out
    valid = picks >= 0
    safe = picks.clamp(min=0)
    values = logits.float().gather(1, safe).masked_fill(~valid, float("-inf"))  # [S, k], in pick order
    probs = torch.nan_to_num(torch.softmax(values, dim=-1), nan=0.0)
    by_index = torch.argsort(safe.masked_fill(~valid, t_len), dim=-1, stable=True)  # ascending entry index
    probs, entries, valid = probs.gather(1, by_index), safe.gather(1, by_index), valid.gather(1, by_index)
    order = torch.argsort(-probs, dim=-1, stable=True)  # descending probability, ties by lower index
    probs, entries, valid = probs.gather(1, order), entries.gather(1, order), valid.gather(1, order)
    mass = probs.double().cumsum(-1)
    before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
    keep = valid & (before <= p)
    rows = torch.arange(s_len, device=logits.device).unsqueeze(1).expand_as(entries)
    out[rows[keep], entries[keep]] = True
    return out


def trigger_positions(n_tokens: int, tau: int, first: int | None = None) -> list[int]:
    """Trigger positions t0 = first + k * tau (k >= 0; ``first`` defaults to tau) whose window t0 .. t0 + tau - 1
    lies inside the document."""
    return list(range(tau if first is None else first, n_tokens - tau + 1, tau))


@dataclass
class TriggerLabel:
    """Labels of one trigger: entries visible at t0 that the window's tokens really need."""

    position: int
    n_visible: int
    positives: torch.Tensor  # sorted int32 entry indices (golden, after the vote)
    native_topk_union: torch.Tensor  # sorted int32 entry indices
    n_candidates: int  # union of all nuclei over the window and the CSA layers (before the vote)


@dataclass
class _OpenTrigger:
    position: int
    n_visible: int
    golden: torch.Tensor
    topk: torch.Tensor
    candidates: torch.Tensor
    seen_tokens: int = 0


@dataclass
class WindowLabeler:
    """Streaming labels for one document: feed each chunk's per-layer logits and picks, collect triggers.

    Memory: per chunk, [S, T] vote counters; per open trigger, three [n_visible] bool vectors. Nothing of
    size [N, T] is ever held. Call order per chunk: ``start_chunk``, then ``add_logits`` / ``add_topk`` for
    every CSA layer (any order), then ``end_chunk`` (which returns the triggers whose windows closed).
    """

    n_tokens: int
    tau: int
    rate: int
    nucleus: float = 0.6
    min_votes: int = 3
    first_k: int = 64
    softmax_over: str = "topk"
    first_trigger: int | None = None  # triggers start here (default tau); generated continuations start later
    _open: dict = field(default_factory=dict)
    _chunk: tuple | None = None
    _pending_logits: torch.Tensor | None = None

    def __post_init__(self):
        if self.softmax_over not in SOFTMAX_OVER:
            raise ValueError(f"softmax_over must be one of {SOFTMAX_OVER}, got {self.softmax_over!r}")
        self.triggers = set(trigger_positions(self.n_tokens, self.tau, self.first_trigger))
        self._sorted = sorted(self.triggers)
        self._idle = False

    def start_chunk(self, start: int, length: int):
        self._chunk = (start, length, None, None, None)
        # a chunk that no trigger window overlaps contributes nothing: skip its nucleus work (a generated
        # continuation's long prompt is mostly such chunks)
        i = bisect_left(self._sorted, start - self.tau + 1)  # first trigger whose window may reach the chunk
        self._idle = not (i < len(self._sorted) and self._sorted[i] < start + length)

    def _buffers(self, t_len: int, device):
        """The chunk's vote, candidate and top-k buffers, made on the device of the first layer that reports (a
        backbone spread over devices reports each layer from its own: callers move their masks here)."""
        start, length, votes, cand, topk = self._chunk
        if votes is not None:
            device = votes.device
        if votes is None or votes.shape[1] < t_len:
            votes = torch.zeros(length, t_len, dtype=torch.int16, device=device)
            cand = torch.zeros(length, t_len, dtype=torch.bool, device=device)
            topk = torch.zeros(length, t_len, dtype=torch.bool, device=device)
            self._chunk = (start, length, votes, cand, topk)
        return votes, cand, topk

    def _n_visible(self, start: int, length: int, device) -> torch.Tensor:
        return (torch.arange(start, start + length, device=device) + 1) // self.rate

    def add_logits(self, logits: torch.Tensor):
        """One CSA layer's raw logits for the chunk: [S, T]. With ``softmax_over="topk"`` they wait for the same
        layer's picks (:meth:`add_topk`, called next)."""
        if self._idle:
            return
        if self.softmax_over == "topk":
            self._pending_logits = logits
            return
        start, length = self._chunk[:2]
        self._vote(nucleus_mask_for_logits(logits, self._n_visible(start, length, logits.device), self.nucleus,
                                           self.first_k))

    def add_topk(self, picks: torch.Tensor, t_len: int):
        """One CSA layer's native top-k picks for the chunk: [S, k], -1 = invalid."""
        if self._idle:
            return
        _, _, topk = self._buffers(t_len, picks.device)
        here = picks.to(topk.device)
        valid = here >= 0
        rows = torch.arange(here.shape[0], device=here.device).unsqueeze(1).expand_as(here)
        topk[rows[valid], here[valid]] = True
        if self.softmax_over == "topk":
            if self._pending_logits is None:
                raise RuntimeError("softmax_over='topk' needs each layer's logits (add_logits) before its picks")
            logits, self._pending_logits = self._pending_logits, None
            self._vote(topk_nucleus_mask(logits, picks, self.nucleus))

    def _vote(self, mask: torch.Tensor) -> None:
        votes, cand, _ = self._buffers(mask.shape[1], mask.device)
        mask = mask.to(votes.device)
        votes[:, : mask.shape[1]] += mask
        cand[:, : mask.shape[1]] |= mask

    def end_chunk(self) -> list[TriggerLabel]:
        start, length, votes, cand, topk = self._chunk
        self._chunk = None
        closed = []
        if votes is None:
            return closed
        golden = votes >= self.min_votes
        end = start + length
        # windows that overlap this chunk, from the first whose window may reach it (sorted once, in __post_init__)
        for k in range(bisect_left(self._sorted, start - self.tau + 1), len(self._sorted)):
            t0 = self._sorted[k]
            if t0 + self.tau <= start:
                continue
            if t0 >= end:
                break
            lo, hi = max(t0, start), min(t0 + self.tau, end)
            if lo >= hi:
                continue
            state = self._open.get(t0)
            if state is None:
                nv = (t0 + 1) // self.rate
                dev = golden.device
                state = _OpenTrigger(t0, nv, torch.zeros(nv, dtype=torch.bool, device=dev),
                                     torch.zeros(nv, dtype=torch.bool, device=dev),
                                     torch.zeros(nv, dtype=torch.bool, device=dev))
                self._open[t0] = state
            nv = state.n_visible
            rows = slice(lo - start, hi - start)
            state.golden |= golden[rows, :nv].any(0)
            state.topk |= topk[rows, :nv].any(0)
            state.candidates |= cand[rows, :nv].any(0)
            state.seen_tokens += hi - lo
            if state.seen_tokens == self.tau:
                del self._open[t0]
                closed.append(TriggerLabel(
                    position=t0,
                    n_visible=nv,
                    positives=torch.nonzero(state.golden).flatten().to(torch.int32).cpu(),
                    native_topk_union=torch.nonzero(state.topk).flatten().to(torch.int32).cpu(),
                    n_candidates=int(state.candidates.sum()),
                ))
        return closed
