"""Where does the Lightning Indexer rank the needle? Per CSA layer, at the query that predicts the answer's first token.

The default answers nothing at 64K with its native top-64 but 30% of single needles when every compressed entry is
readable (data/reference/README.md, "Indexer or reading?"): its indexer does not pick the needle. This measures how
far down it ranks it: for each sample of ``evaluate_needles``' suite (same seeds, so the same prompts), the prompt
is prefilled in chunks through the stock model with read-only hooks (``lsa_runtime.capture.IndexerCapture``), and at
the position before the answer the raw indexer scores I[t, s] of every CSA layer over its visible compressed entries
are ranked. The needle's entries are those holding a token of the answer's value where it sits in the haystack
(entry s holds tokens 4s .. 4s + 3); the rank reported is that of the best-scored needle entry (1 = the indexer's top
pick), so "rank <= 64" means the native top-64 reads the needle in that layer.

``--attention-rank`` also ranks the needle by the main attention itself: the prompt prefilled again with every
compressed entry readable (``attention.py``'s window attention, ``train_indexer.DenseTeacher``), and at the same query
the head-summed attention probability of each visible entry per CSA layer; reported are the best needle entry's rank
by that mass (``attn_ranks``), the needle entries' share of the layer's compressed-entry mass (``attn_share``),
and the indexer's own rank of the needle inside that same forward (``dense_ranks``: every earlier layer read every
entry there, so the query differs from the native run's). An indexer rank far below the attention rank is the
indexer's failure; both far down, the attention's.

    python -m reference.needle_rank --lengths 8192 32768 65536 --n 5 --out needle_rank.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lsa_runtime.backbone import csa_layers, csa_rate
from lsa_runtime.capture import IndexerCapture, IndexerObserver

from .evaluate_needles import SUITE, eval_samples
from .tasks import TaskBuilder


def needle_positions(input_ids: np.ndarray, answer_start: int, answer_len: int) -> list[int]:
    """Token positions of the answer's value inside the prompt (before the question): every occurrence of the
    answer's tokens after its first (the leading-space token may merge differently in the needle sentence)."""
    answer = input_ids[answer_start:answer_start + answer_len].tolist()
    probe = answer[1:] if len(answer) > 1 else answer
    hay = input_ids[:answer_start].tolist()
    found = []
    for i in range(len(hay) - len(probe) + 1):
        if hay[i:i + len(probe)] == probe:
            found.extend(range(i, i + len(probe)))
    return found


def ranks_of(scores: torch.Tensor, entries: list[int]) -> int:
    """1 + the number of visible entries scored strictly above the best of ``entries`` (scores: [T] over the
    visible entries)."""
    best = scores[entries].max()
    return int((scores > best).sum()) + 1


class _Row(IndexerObserver):
    """Keeps the scores row of one query position per CSA layer."""

    def __init__(self, position: int):
        self.position = position
        self.rows: dict[int, torch.Tensor] = {}

    def on_logits(self, layer, chunk, logits):
        if chunk.start <= self.position < chunk.start + chunk.length:
            self.rows[layer] = logits[self.position - chunk.start].float().cpu()


def needle_entries(sample, rate: int) -> tuple[int, int, list[int], list[int]]:
    """(query, visible entries, needle entries, needle tokens): the query before the answer, the compressed entries
    it sees, and those of them holding a needle token."""
    query = sample.answer_start - 1
    tokens = needle_positions(sample.input_ids, sample.answer_start, sample.answer_len)
    visible = (query + 1) // rate
    return query, visible, sorted({t // rate for t in tokens if t // rate < visible}), tokens


def rank_sample(model, sample, chunk: int) -> dict:
    """Per CSA layer: the needle's best rank, the visible entries, and the needle entries' count."""
    query, visible, entries, tokens = needle_entries(sample, csa_rate(model.config))
    observer = _Row(query)
    capture = IndexerCapture(model, chunk_size=chunk, topk=False)
    capture.prefill(torch.as_tensor(sample.input_ids[:query + 1]), observer)
    out = {"query": query, "visible": visible, "needle_tokens": tokens, "needle_entries": entries, "ranks": {}}
    for layer in csa_layers(model.config):
        row = observer.rows[layer][:visible]
        out["ranks"][str(layer)] = ranks_of(row, entries) if entries else None
    return out


def attention_ranks(model, sample, chunk: int, max_bytes: int = 8 << 30) -> dict:
    """Per CSA layer, with every compressed entry readable: the best needle entry's rank by the main attention's
    head-summed probability at the query before the answer, and the needle entries' share of the compressed-entry
    mass there, and the indexer's rank of the needle in that same forward. ``{"attn_ranks": {layer: rank},
    "attn_share": {layer: share}, "dense_ranks": {layer: rank}}``; the model is left as it was."""
    from lsa_runtime.window_attention import NAME, set_attention, set_chunked_indexers
    from .evaluate_needles import set_topk
    from .train_indexer import EVERY_ENTRY, DenseTeacher, indexer_scores

    layers = csa_layers(model.config)
    query, visible, entries, _ = needle_entries(sample, csa_rate(model.config))
    previous, topk = model.config._attn_implementation, model.config.index_topk
    set_attention(model, "window")
    set_topk(model, EVERY_ENTRY)
    teacher = DenseTeacher(model, layers, mass_dtype=torch.float32, rows=[query])
    try:
        device = next(model.parameters()).device
        captured = teacher.run(torch.as_tensor(sample.input_ids[:query + 1], device=device), chunk, max_bytes)
    finally:
        teacher.remove()
        set_topk(model, topk)
        set_chunked_indexers(model, previous == NAME)
        model.config._attn_implementation = previous
    out = {"attn_ranks": {}, "attn_share": {}, "dense_ranks": {}}
    for layer in layers:
        x, q_res, pos, mass = captured[layer]
        row = mass[0, :visible].cpu()
        scores = indexer_scores(model.model.layers[layer].self_attn.compressor.indexer, x, q_res, pos, [query])
        scores = scores[0, :visible].cpu()
        out["attn_ranks"][str(layer)] = ranks_of(row, entries) if entries else None
        out["attn_share"][str(layer)] = round(float(row[entries].sum() / row.sum()), 6) if entries else None
        out["dense_ranks"][str(layer)] = ranks_of(scores, entries) if entries else None
    return out


def main(argv=None):
    from lsa_runtime.backbone import load_backbone

    from .build_corpus import WORK

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--corpus", type=Path, default=WORK / "corpus.npz", help="corpus.npz from build_corpus")
    parser.add_argument("--task", default="single_number_code", choices=list(SUITE))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--n", type=int, default=5, help="samples per length (evaluate_needles' first n)")
    parser.add_argument("--seed", type=int, default=1234, help="evaluate_needles' default seed")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens; shrinks with context)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="JSON written after every sample")
    parser.add_argument("--attention-rank", action="store_true",
                        help="also rank the needle by the main attention's own mass with every entry readable")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus} does not exist (python -m reference.build_corpus makes it)")
    if (Path(args.model) / "state.json").is_file():  # a training checkpoint (train.py's or train_indexer.py's)
        from transformers import AutoTokenizer

        from .build_corpus import REFERENCE_DIR
        from .train import load_checkpoint

        model = load_checkpoint(Path(args.model))[0].to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    else:
        model, tokenizer = load_backbone(args.model, device=args.device, dtype="float32")
    if model.config.max_position_embeddings < max(args.lengths):
        model.config.max_position_embeddings = max(args.lengths) + 256
    builder = TaskBuilder(tokenizer, np.load(args.corpus)["eval"], tokenizer.bos_token_id)
    results = {"model": str(args.model), "task": args.task, "seed": args.seed, "samples": {}}
    for length in args.lengths:
        for i, sample in enumerate(eval_samples(builder, args.task, length, args.n, args.seed)):
            t0 = time.time()
            row = rank_sample(model, sample, args.chunk)
            if args.attention_rank:
                row.update(attention_ranks(model, sample, args.chunk))
            row["seconds"] = round(time.time() - t0, 1)
            results["samples"][f"{length}/{i}"] = row
            print(json.dumps({"length": length, "sample": i, "visible": row["visible"],
                              "needle_entries": row["needle_entries"], "ranks": row["ranks"],
                              **({"attn_ranks": row["attn_ranks"], "dense_ranks": row["dense_ranks"]}
                                 if args.attention_rank else {}),
                              "seconds": row["seconds"]}), flush=True)
            if args.out:
                tmp = args.out.with_name(args.out.name + ".tmp")
                tmp.write_text(json.dumps(results, indent=1) + "\n")
                os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
