"""Does the memory indexer fetch the needle? One evaluation prompt at a time, both sides of LSA's first trigger.

``fm-index evaluate`` scores LSA against full decoding; when LSA misses an answer that full decoding finds, this
tells where it was lost. For each prompt of ``fm_eval``'s suite (the same generator, seed and haystack as
``fm-index evaluate``), two runs of the backbone:

* **the fetch** (a ``Session`` in mode lsa with the export, its policy's selection recorded): at the first trigger
  (the prompt's last token, t0 = P - 1) the memory indexer's gated score sigmoid(I_L[t0, s]) of every visible entry
  per memory layer L; reported per layer are the best needle entry's score and rank, how many entries reach the
  threshold, and whether the resident set (scored entries + recency tail + sink) holds a needle entry; the resident
  set itself (entry indices); per band of distance from the query, how many entries reach the threshold;
* **the labels** (``IndexerCapture.generate``, the stock model's greedy continuation of tau tokens, as
  ``build-labels --source generate`` labels it): for the window t0 .. t0 + tau - 1, per CSA layer, whether a needle
  entry is among the native top-k picks and in the layer's nucleus (softmax over the top-k logits, mass p), and the
  most CSA layers whose nucleus holds a needle entry at one token (the vote; golden at >= ``--min-votes``).

The needle's entries are the compressed entries holding a character of an answer value where it sits in the
context (entry s holds tokens rate*s .. rate*s + rate - 1). A needle missing from the labels' golden set cannot be
learnt; one golden but scored low is the memory indexer's miss; one fetched but answered wrong is the reading's.

    python -m reference.needle_fetch --indexer runs/labels_long/export --task niah_single_1 --length 16384 --n 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from indexer_train.labels import topk_nucleus_mask
from lsa_runtime.backbone import csa_layers, csa_rate
from lsa_runtime.capture import IndexerCapture, IndexerObserver


def needle_entries(tokenizer, sample, ids: list[int], rate: int) -> list[int]:
    """Compressed entries holding a character of any answer value inside the context (not the query)."""
    enc = tokenizer(sample.prompt, add_special_tokens=True, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise RuntimeError("the offsets' tokenization differs from the session's")
    spans = []
    for answer in sample.answers:
        start = sample.context.find(answer)
        while start >= 0:
            spans.append((start, start + len(answer)))
            start = sample.context.find(answer, start + 1)
    tokens = {i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a
              and any(a < e and b > s for s, e in spans)}
    return sorted({t // rate for t in tokens})


class WindowNuclei(IndexerObserver):
    """Per CSA layer, for the query rows t0 .. t0 + tau - 1: each row's native top-k picks and its nucleus mask
    (softmax over the picks' logits, mass p), kept chunk by chunk."""

    def __init__(self, t0: int, tau: int, p: float):
        self.lo, self.hi, self.p = t0, t0 + tau, p
        self.logits: dict[int, torch.Tensor] = {}
        self.picks: dict[int, list[torch.Tensor]] = {}
        self.nuclei: dict[int, list[torch.Tensor]] = {}

    def _rows(self, chunk) -> slice | None:
        lo, hi = max(self.lo, chunk.start), min(self.hi, chunk.start + chunk.length)
        return slice(lo - chunk.start, hi - chunk.start) if lo < hi else None

    def on_logits(self, layer, chunk, logits):
        rows = self._rows(chunk)
        if rows is not None:
            self.logits[layer] = logits[rows].float().cpu()

    def on_topk(self, layer, chunk, picks):
        rows = self._rows(chunk)
        if rows is None:
            return
        picks = picks[rows].cpu()
        self.picks.setdefault(layer, []).append(picks)
        self.nuclei.setdefault(layer, []).append(topk_nucleus_mask(self.logits.pop(layer), picks, self.p))


def label_side(model, ids: list[int], needle: list[int], tau: int, p: float, chunk: int) -> dict:
    """The labels' view of the needle for the window after t0 = len(ids) - 1 (see the module docstring)."""
    t0 = len(ids) - 1
    observer = WindowNuclei(t0, tau, p)
    capture = IndexerCapture(model, chunk_size=chunk)
    _, generated = capture.generate(torch.tensor(ids), tau, observer)
    visible = (t0 + 1) // csa_rate(model.config)
    out = {"generated": generated, "layers": {}}
    votes = None
    for layer in csa_layers(model.config):
        width = max(x.shape[1] for x in observer.nuclei[layer])  # decode steps see more entries: pad to the widest
        nucleus = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in observer.nuclei[layer]])
        picks = torch.cat([x.reshape(x.shape[0], -1) for x in observer.picks[layer]], dim=0)
        in_nucleus = nucleus[:, needle].any(1) if needle else torch.zeros(nucleus.shape[0], dtype=torch.bool)
        picked = torch.isin(picks, torch.tensor(needle)).any(1) if needle else in_nucleus
        out["layers"][str(layer)] = {"picked_rows": int(picked.sum()), "nucleus_rows": int(in_nucleus.sum()),
                                     "nucleus_size": round(float(nucleus[:, :visible].sum(1).float().mean()), 1)}
        votes = in_nucleus.int() if votes is None else votes + in_nucleus.int()
    out["max_votes"] = int(votes.max()) if votes is not None else 0
    return out


DISTANCE_EDGES = (4096, 8192, 16384, 32768, 65536, 131072)  # tokens between the query and an entry's first token


def above_by_distance(scores: torch.Tensor, threshold: float, t0: int, rate: int,
                      edges: tuple[int, ...] = DISTANCE_EDGES) -> list[dict]:
    """Where the entries that reach the threshold lie: for each band of distance d = t0 - rate * s (in tokens, from
    the query to the entry's first token; bands [0, e_1), [e_1, e_2), ..., [e_last, inf)), how many visible entries
    it holds, how many of them score >= ``threshold`` and their mean score. Beyond the lengths the memory indexer
    was trained at, this tells a drift with the distance (far entries) from one of the query (every band)."""
    distance = t0 - rate * torch.arange(scores.numel())
    bands, lo = [], 0
    for hi in (*edges, None):
        inside = (distance >= lo) & (distance < hi) if hi is not None else distance >= lo
        n = int(inside.sum())
        if n:
            band = scores[inside].float()
            bands.append({"from": lo, "to": hi, "entries": n, "above": int((band >= threshold).sum()),
                          "mean_score": round(float(band.mean()), 4)})
        lo = hi
    return bands


def fetch_side(session_factory, ids: list[int], needle: list[int], rate: int) -> dict:
    """The memory indexer's view of the needle at the first trigger (see the module docstring); ``rate``: tokens
    per compressed entry (for the distance bands)."""
    session, policy = session_factory()
    seen = []
    select = policy.select

    def recording(state):
        chosen = select(state)
        seen.append((state.position, state.n_visible, {k: v.float().cpu() for k, v in state.scores.items()},
                     chosen.cpu()))
        return chosen

    policy.select = recording
    generation = session.generate(ids, max_new_tokens=8, temperature=0.0)
    position, visible, scores, chosen = seen[0]
    needle = [s for s in needle if s < visible]
    out = {"t0": position, "visible": visible, "selected": int(chosen.numel()), "text": generation.text,
           "resident": sorted(int(s) for s in chosen.tolist()),
           "needle_resident": bool(needle) and bool(torch.isin(chosen, torch.tensor(needle)).any()), "layers": {}}
    for layer, s in scores.items():
        row = {"above_threshold": int((s >= policy.threshold).sum()),
               "by_distance": above_by_distance(s, policy.threshold, position, rate)}
        if needle:
            best = s[needle].max()
            row.update(needle_score=round(float(best), 4), needle_rank=int((s > best).sum()) + 1)
        out["layers"][str(layer)] = row
    return out


def main(argv=None):
    from fm_eval.runner import prompt_digest
    from fm_eval.tasks import generate_sample
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.config import SessionConfig
    from lsa_runtime.memory_indexer import MemoryIndexer
    from lsa_runtime.policies import make_policy
    from lsa_runtime.session import Session
    from lsa_runtime.window_attention import set_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--indexer", type=Path, required=True, help="an fm-index export directory")
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--n", type=int, default=2, help="prompts (fm-index evaluate's first n at this length)")
    parser.add_argument("--indices", default=None, help="these prompts instead of the first n, e.g. 1,4 (indices in "
                        "fm-index evaluate's runs.jsonl)")
    parser.add_argument("--samples", type=int, default=20, help="fm-index evaluate's --samples (sets the depths)")
    parser.add_argument("--seed", type=int, default=0, help="fm-index evaluate's --seed (0: its prompts; check a "
                        "change on another seed, not on the prompts it is to be judged on)")
    parser.add_argument("--nucleus", type=float, default=0.6)
    parser.add_argument("--min-votes", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens) of both runs")
    parser.add_argument("--attention", choices=("eager", "window"), default="eager",
                        help="the backbone's attention: transformers' eager (the reference) or fm-index's window path "
                             "(fm-index evaluate --attention; same picks, much faster on a CPU at 32K and beyond); "
                             "window only with --fetch-only (the labels' run reads transformers' own indexer scores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fetch-top", type=int, default=None, help="lsa's floor per memory layer (default: the "
                        "export's)")
    parser.add_argument("--page-size", type=int, default=0, help="lsa's page recall: pages of this many entries "
                        "(0: single entries)")
    parser.add_argument("--max-pages", type=int, default=0, help="with --page-size: pages resident per trigger")
    parser.add_argument("--page-ties", choices=("recent", "score"), default="recent", help="with --page-size: "
                        "equal-count pages go to the newer (the release) or the best-scored (SessionConfig.page_ties)")
    parser.add_argument("--distance-cap", type=int, default=None, help="lsa: entries farther than this many tokens "
                        "scored as if this far (SessionConfig.distance_cap; default: off)")
    parser.add_argument("--fetch-only", action="store_true", help="skip the labels' run (half the time)")
    parser.add_argument("--out", type=Path, help="JSON lines, one per prompt")
    args = parser.parse_args(argv)
    try:
        indices = sorted({int(x) for x in args.indices.split(",")}) if args.indices else list(range(args.n))
    except ValueError:
        parser.error(f"--indices {args.indices!r}: give prompt indices separated by commas, e.g. 1,4")
    if any(not 0 <= i < args.samples for i in indices):
        parser.error(f"--indices {args.indices}: each index must lie in 0..{args.samples - 1} (--samples)")
    if args.attention == "window" and not args.fetch_only:
        parser.error("--attention window needs --fetch-only: the labels' run captures transformers' indexer scores, "
                     "which the window path computes itself")
    try:  # every option checked before the model loads
        config = SessionConfig(mode="lsa", static_decode=False, chunk_size=args.chunk, fetch_top=args.fetch_top,
                               page_size=args.page_size, max_pages=args.max_pages, distance_cap=args.distance_cap,
                               page_ties=args.page_ties)
    except ValueError as exc:
        parser.error(str(exc))
    if not (args.indexer / "lsa_config.json").is_file():
        parser.error(f"--indexer {args.indexer} is not an fm-index export (no lsa_config.json)")
    model, tokenizer = load_backbone(args.model, device=args.device, dtype="float32")
    set_attention(model, args.attention)
    indexer = MemoryIndexer.from_export(args.indexer, backbone_config=model.config, device=args.device)
    config = config.resolved(indexer.config.tau, indexer.config.threshold)

    def session_factory():
        policy = make_policy(config, indexer)
        return Session(model, tokenizer, config, policy=policy), policy

    rate, tau = csa_rate(model.config), indexer.config.tau
    for i in indices:
        # only the asked prompts, each fm-index evaluate's prompt of that index (at 128K one takes ~10 s to build)
        sample = generate_sample(args.task, tokenizer, args.length, seed=args.seed, index=i, num_samples=args.samples)
        t = time.time()
        ids = tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
        needle = needle_entries(tokenizer, sample, ids, rate)
        row = {"task": args.task, "length": args.length, "seed": args.seed, "index": i,
               "prompt_sha": prompt_digest(sample), "answers": sample.answers,
               "needle": needle,
               "fetch_top": config.fetch_top, "pages": [config.page_size, config.max_pages],
               "attention": args.attention, "chunk": args.chunk,
               **({"distance_cap": config.distance_cap} if config.distance_cap else {}),
               **({"page_ties": config.page_ties} if config.page_ties != "recent" else {}),
               "fetch": fetch_side(session_factory, ids, needle, rate)}
        if not args.fetch_only:
            row["labels"] = label_side(model, ids, needle, tau, args.nucleus, args.chunk)
            row["labels"]["golden"] = row["labels"]["max_votes"] >= args.min_votes
            row["labels"]["generated"] = tokenizer.decode(row["labels"]["generated"])
        row["seconds"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


if __name__ == "__main__":
    main()
