"""Host time a generated token's text costs, per sequence: decoding the whole output again at every token (what
``Session`` did up to 2026-12-03) against ``IncrementalText`` (a short tail per token; lsa_runtime/detokenize.py).

    python bench/bench_detokenize.py [--model reference] [--lengths 100,300,1000,3000] [--rows 128]

For each output length n, one random token stream of n tokens (the model's vocabulary, seeded) is turned into
text piece by piece both ways, timed on the host clock (best of three); reported: microseconds per token
averaged over the stream, a token's cost at the stream's end (the median of its last 50 tokens; the whole decode's
grows with n; the incremental stream's one whole decode at the very end is counted in its average only), and what
a step of ``--rows`` sequences at that length spends on text (that cost times the rows). Both ways give the same
text (checked). A serving step of a Flash-shaped model at 128K and 128 rows takes ~42 ms on the H200
(docs/BENCHMARKS.md, runs 13-15): the column to compare with it is the last.
"""

from __future__ import annotations

import argparse
import random
import time

from lsa_runtime.backbone import load_backbone
from lsa_runtime.detokenize import IncrementalText


def whole_each_token(tokenizer, ids: list[int]) -> tuple[str, list[float]]:
    """The text piece by piece by decoding the whole output at every token; the seconds each token took."""
    text, times = "", []
    for i in range(1, len(ids) + 1):
        start = time.perf_counter()
        so_far = tokenizer.decode(ids[:i], skip_special_tokens=True)
        piece, text = so_far[len(text):], so_far  # noqa: F841 - the piece a stream would yield
        times.append(time.perf_counter() - start)
    return text, times


def incremental(tokenizer, ids: list[int]) -> tuple[str, list[float]]:
    """The same with IncrementalText, the whole decoded once at the end (as Session does when a sequence ends)."""
    text, times, pieces = IncrementalText(tokenizer), [], []
    for token in ids:
        start = time.perf_counter()
        pieces.append(text.add(token))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    times[-1] += time.perf_counter() - start
    joined = "".join(pieces)
    assert whole.startswith(joined)
    return whole, times


def best_of(fn, tokenizer, ids, runs: int = 3):
    results = [fn(tokenizer, ids) for _ in range(runs)]
    return min(results, key=lambda r: sum(r[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference", help="whose tokenizer (tiny, reference, or a path)")
    ap.add_argument("--lengths", default="100,300,1000,3000", help="output lengths in tokens, comma-separated")
    ap.add_argument("--rows", type=int, default=128, help="sequences decoding together (the last column)")
    args = ap.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1 or args.rows < 1:
        raise SystemExit("error: --lengths must be positive integers, comma-separated, and --rows positive")
    _, tokenizer = load_backbone(args.model, device="cpu")
    rng = random.Random(0)
    print(f"{'tokens':>7} {'whole us/tok':>13} {'whole last us':>14} {'incremental us/tok':>19} "
          f"{'incr. last us':>14} {'whole ms/step':>14} {'incr. ms/step':>14}  ({args.rows} rows)")
    for n in lengths:
        ids = [rng.randrange(len(tokenizer)) for _ in range(n)]
        text_a, whole = best_of(whole_each_token, tokenizer, ids)
        text_b, incr = best_of(incremental, tokenizer, ids)
        assert text_a == text_b, "the two ways gave different texts"
        # the last token of the incremental stream includes the one whole decode at the end: report a middle one
        incr_last = sorted(incr[-50:])[len(incr[-50:]) // 2]
        whole_last = sorted(whole[-50:])[len(whole[-50:]) // 2]
        print(f"{n:>7,} {1e6 * sum(whole) / n:13.1f} {1e6 * whole_last:14.1f} {1e6 * sum(incr) / n:19.1f} "
              f"{1e6 * incr_last:14.1f} {1e3 * whole_last * args.rows:14.2f} {1e3 * incr_last * args.rows:14.2f}",
              flush=True)


if __name__ == "__main__":
    main()
