"""Seeded needle-in-a-haystack evaluation of a DeepSeek-V4 checkpoint (greedy decoding, exact match).

For each context length and task, ``n`` samples are drawn with a fixed seed from the held-out stdlib packages
(haystack ``code``) or noise sentences (``noise``). A sample counts as correct when greedy decoding reproduces
the whole answer. This is computed by teacher forcing in one forward pass: the greedy continuation equals the
answer exactly when every answer token is the argmax given the answer's own prefix (``--verify-generate N``
checks that against ``model.generate`` on N samples per task). Attention is the model's native sparse
attention: each CSA query reads its ``index_topk`` best compressed entries plus the sliding window, computed by
``attention.py`` (``--attention window``, exact, without the dense score matrix) or transformers' eager path.

Long prompts: above ``--chunk-above`` tokens (``--chunk-above 0``: at every length) a sample runs as a chunked prefill
through the model's ``DynamicCache`` (the answer tokens ride along as the last chunk's teacher-forced input), so
memory stays bounded at 64K tokens and more; chunk sizes follow ``chunk_length`` (the fp32 [chunk, heads,
entries + window] score block kept under ``--chunk-gib``). It gives the one-pass argmax (tests).

Chance levels: single needle ~0 (a 7-digit number or a 32-hex uuid); multi-key 25% (copying one of the 4
needles at random); multi-value ~0 (all 4 values in order); multi-query 1/24 (the 4 asked values, copied in a
random order); variable tracking ~0 (every variable of the chain).

Run: ``python -m reference.evaluate_needles --model data/reference --lengths 4096 8192 16384 32768 65536``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lsa_runtime.window_attention import set_attention
from .tasks import TaskBuilder

# name -> (task, value kind, haystack source)
SUITE = {
    "single_number_code": ("niah_single", "number", "code"),
    "single_number_noise": ("niah_single", "number", "noise"),
    "single_uuid_code": ("niah_single", "uuid", "code"),
    "multikey_number_code": ("niah_multikey", "number", "code"),
    "multivalue_number_code": ("niah_multivalue", "number", "code"),
    "vt_noise": ("vt", "number", "noise"),
    "multiquery_number_code": ("niah_multiquery", "number", "code"),  # last: the others keep their seeds
}
CHANCE = {"single_number_code": 0.0, "single_number_noise": 0.0, "single_uuid_code": 0.0,
          "multikey_number_code": 0.25, "multivalue_number_code": 0.0, "vt_noise": 0.0,
          "multiquery_number_code": round(1 / 24, 4)}


def eval_samples(builder: TaskBuilder, name: str, length: int, n: int, seed: int):
    task, kind, source = SUITE[name]
    rng = np.random.default_rng([seed, length, list(SUITE).index(name)])
    return [builder.build(rng, task, length, kind=kind, source=source) for _ in range(n)]


@torch.no_grad()
def exact_match(model, samples, batch_size: int, device) -> list[bool]:
    """Teacher-forced greedy exact match of each sample's answer span."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ids = torch.as_tensor(np.stack([s.input_ids for s in chunk]), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits
        for b, s in enumerate(chunk):
            pred = logits[b, s.answer_start - 1:s.answer_start - 1 + s.answer_len].argmax(-1)
            gold = ids[b, s.answer_start:s.answer_start + s.answer_len]
            out.append(bool((pred == gold).all()))
        del logits
    return out


def chunk_length(config, start: int, chunk: int, max_bytes: int) -> int:
    """Prefill chunk at ``start``: ``chunk`` halved (not below 16) while the fp32 [chunk, heads, entries +
    window] score block (heads = the larger of the indexer's and the attention's) exceeds ``max_bytes``."""
    heads = max(config.index_n_heads, config.num_attention_heads)
    rate = config.compress_rates["compressed_sparse_attention"]
    length = chunk
    while length > 16 and length * heads * ((start + length) // rate + config.sliding_window) * 4 > max_bytes:
        length //= 2
    return max(1, min(length, chunk))


def _cache_kwarg(model) -> str:
    """transformers 5.17 names the cache argument ``past_key_values``; later versions ``cache``."""
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


@torch.no_grad()
def chunked_logits(model, ids: np.ndarray, first: int, count: int, chunk: int, max_bytes: int,
                   device) -> torch.Tensor:
    """Next-token logits [count, vocab] (fp32) at positions ``first .. first + count - 1`` of ``ids`` [S], by a
    chunked prefill through a ``DynamicCache`` (teacher forcing: the whole sequence is input)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kwarg = _cache_kwarg(model)
    kept, start, n = [], 0, len(ids)
    while start < n:
        length = min(chunk_length(model.config, start, chunk, max_bytes), n - start)
        x = torch.as_tensor(ids[start:start + length], device=device)[None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.model(input_ids=x, use_cache=True, **{kwarg: cache}).last_hidden_state
            lo, hi = max(start, first), min(start + length, first + count)
            if lo < hi:
                kept.append(model.lm_head(hidden[0, lo - start:hi - start]).float())
        start += length
    return torch.cat(kept)


@torch.no_grad()
def exact_match_chunked(model, samples, chunk: int, max_bytes: int, device) -> list[bool]:
    out = []
    for s in samples:
        pred = chunked_logits(model, s.input_ids, s.answer_start - 1, s.answer_len, chunk, max_bytes,
                              device).argmax(-1)
        gold = torch.as_tensor(s.input_ids[s.answer_start:s.answer_start + s.answer_len], device=pred.device)
        out.append(bool((pred == gold).all()))
    return out


@torch.no_grad()
def generate_match(model, sample, device) -> bool:
    """Real greedy decoding with the KV cache (transformers' generate) for one sample."""
    prompt = torch.as_tensor(sample.input_ids[:sample.answer_start], device=device)[None]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        gen = model.generate(prompt, max_new_tokens=sample.answer_len, do_sample=False,
                             attention_mask=torch.ones_like(prompt))
    gold = sample.input_ids[sample.answer_start:sample.answer_start + sample.answer_len]
    return gen[0, prompt.shape[1]:].cpu().numpy().tolist() == gold.tolist()


def evaluate(model, tokenizer, haystack: np.ndarray, lengths, n: int, seed: int = 1234,
             batch_tokens: int = 32768, names=None, verify_generate: int = 0, log=print, chunk_above: int = 32768,
             chunk: int = 4096, chunk_bytes: int = 2**30, deadline: float | None = None, on_row=None,
             n_by_length: dict | None = None) -> dict:
    """Accuracy per task and length; ``deadline`` (time.time()) stops early, ``on_row(results)`` after each row;
    ``n_by_length`` overrides ``n`` at some lengths."""
    device = next(model.parameters()).device
    builder = TaskBuilder(tokenizer, haystack, tokenizer.bos_token_id)
    results = {}
    for length in lengths:
        for name in names or SUITE:
            if deadline and time.time() > deadline:
                log(f"time budget reached before {name}@{length}")
                return results
            t0 = time.time()
            n_here = (n_by_length or {}).get(length, n)
            samples = eval_samples(builder, name, length, n_here, seed)
            chunked = length > chunk_above
            if chunked:
                hits = exact_match_chunked(model, samples, chunk, chunk_bytes, device)
            else:
                hits = exact_match(model, samples, max(1, batch_tokens // length), device)
            row = {"length": length, "task": name, "n": n_here, "accuracy": float(np.mean(hits)),
                   "chance": CHANCE[name], "index_topk": _topk(model), "seconds": round(time.time() - t0, 1),
                   "hits": "".join("1" if h else "0" for h in hits)}
            if chunked:
                row["chunked_prefill"] = chunk
            if verify_generate and length == lengths[0]:
                try:
                    agree = [generate_match(model, s, device) == h for s, h in zip(samples[:verify_generate], hits)]
                    row["generate_agrees"] = f"{sum(agree)}/{len(agree)}"
                except Exception as exc:  # report, do not lose the accuracy numbers
                    row["generate_agrees"] = f"error: {type(exc).__name__}: {exc}"[:200]
            if device.type == "cuda":
                row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            results[f"{name}@{length}"] = row
            log(json.dumps(row))
            if on_row:
                on_row(results)
    return results


def _topk(model) -> int:
    for layer in model.model.layers:
        comp = getattr(layer.self_attn, "compressor", None)
        if comp is not None and hasattr(comp, "indexer"):
            return int(comp.indexer.index_topk)
    return 0


def set_topk(model, topk: int) -> None:
    for layer in model.model.layers:
        comp = getattr(layer.self_attn, "compressor", None)
        if comp is not None and hasattr(comp, "indexer"):
            comp.indexer.index_topk = topk


def main(argv=None):
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM

    from .build_corpus import REFERENCE_DIR, WORK

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REFERENCE_DIR,
                        help="a save_pretrained folder, or a training checkpoint folder (with state.json)")
    parser.add_argument("--tokenizer", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--corpus", type=Path, default=WORK / "corpus.npz", help="corpus.npz from build_corpus")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--n", type=int, default=100, help="samples per task and length")
    parser.add_argument("--n-at", nargs="*", default=[], metavar="LENGTH=N",
                        help="other sample counts at some lengths, e.g. 65536=10")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--topk", type=int, default=None, help="override index_topk (default: the config's)")
    parser.add_argument("--verify-generate", type=int, default=0)
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward pass")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(SUITE), help="subset of the suite")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every row)")
    parser.add_argument("--attention", choices=["window", "eager"], default="window",
                        help="window: exact attention without the dense score matrix (attention.py); eager: "
                             "transformers' dense path")
    parser.add_argument("--chunk-above", type=int, default=32768,
                        help="lengths above this run as a chunked prefill through the cache")
    parser.add_argument("--chunk", type=int, default=4096, help="largest prefill chunk (tokens)")
    parser.add_argument("--chunk-gib", type=float, default=1.0,
                        help="halve a chunk while its fp32 [chunk, heads, entries + window] scores exceed this")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop before starting a task after this wall time (finished rows are kept)")
    args = parser.parse_args(argv)
    t_start = time.time()
    try:
        n_by_length = {int(k): int(v) for k, v in (item.split("=") for item in args.n_at)}
    except ValueError:
        raise SystemExit(f"bad --n-at {args.n_at}: use LENGTH=N") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (args.model / "state.json").is_file():
        from .train import load_checkpoint

        model = load_checkpoint(args.model)[0]
    else:
        model = DeepseekV4ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(device).eval()
    if model.config.max_position_embeddings < max(args.lengths):
        model.config.max_position_embeddings = max(args.lengths) + 256  # plain RoPE: only the declared range
    set_attention(model, args.attention)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.topk:
        set_topk(model, args.topk)
    haystack = np.load(args.corpus)["eval"]
    previous = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    label = f"topk{_topk(model)}"

    def write(results):
        if not args.out:
            return
        merged = {**previous, label: {**previous.get(label, {}), **results}}
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        os.replace(tmp, args.out)

    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    evaluate(model, tokenizer, haystack, args.lengths, args.n, args.seed, args.batch_tokens, args.tasks,
             args.verify_generate, chunk_above=args.chunk_above, chunk=args.chunk,
             chunk_bytes=int(args.chunk_gib * 2**30), deadline=deadline, on_row=write, n_by_length=n_by_length)


if __name__ == "__main__":
    main()
