"""Seeded needle-in-a-haystack evaluation of a DeepSeek-V4 checkpoint (greedy decoding, exact match).

For each context length and task, ``n`` samples are drawn with a fixed seed from the held-out stdlib packages
(haystack ``code``) or noise sentences (``noise``). A sample counts as correct when greedy decoding reproduces
the whole answer. This is computed by teacher forcing in one forward pass: the greedy continuation equals the
answer exactly when every answer token is the argmax given the answer's own prefix (``--verify-generate N``
checks that against ``model.generate`` on N samples per task). Attention is the model's native sparse
attention: each CSA query reads its ``index_topk`` best compressed entries plus the sliding window.

Chance levels: single needle ~0 (a 7-digit number or a 32-hex uuid); multi-key 25% (copying one of the 4
needles at random); multi-value ~0 (all 4 values in order); variable tracking ~0 (every variable of the chain).

Run: ``python -m reference.evaluate_needles --model data/reference --lengths 4096 8192 16384``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .tasks import TaskBuilder

# name -> (task, value kind, haystack source)
SUITE = {
    "single_number_code": ("niah_single", "number", "code"),
    "single_number_noise": ("niah_single", "number", "noise"),
    "single_uuid_code": ("niah_single", "uuid", "code"),
    "multikey_number_code": ("niah_multikey", "number", "code"),
    "multivalue_number_code": ("niah_multivalue", "number", "code"),
    "vt_noise": ("vt", "number", "noise"),
}
CHANCE = {"single_number_code": 0.0, "single_number_noise": 0.0, "single_uuid_code": 0.0,
          "multikey_number_code": 0.25, "multivalue_number_code": 0.0, "vt_noise": 0.0}


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
             batch_tokens: int = 32768, names=None, verify_generate: int = 0, log=print) -> dict:
    device = next(model.parameters()).device
    builder = TaskBuilder(tokenizer, haystack, tokenizer.bos_token_id)
    results = {}
    for length in lengths:
        for name in names or SUITE:
            t0 = time.time()
            samples = eval_samples(builder, name, length, n, seed)
            hits = exact_match(model, samples, max(1, batch_tokens // length), device)
            row = {"length": length, "task": name, "n": n, "accuracy": float(np.mean(hits)),
                   "chance": CHANCE[name], "index_topk": _topk(model), "seconds": round(time.time() - t0, 1)}
            if verify_generate and length == lengths[0]:
                try:
                    agree = [generate_match(model, s, device) == h for s, h in zip(samples[:verify_generate], hits)]
                    row["generate_agrees"] = f"{sum(agree)}/{len(agree)}"
                except Exception as exc:  # report, do not lose the accuracy numbers
                    row["generate_agrees"] = f"error: {type(exc).__name__}: {exc}"[:200]
            results[f"{name}@{length}"] = row
            log(json.dumps(row))
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
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--topk", type=int, default=None, help="override index_topk (default: the config's)")
    parser.add_argument("--verify-generate", type=int, default=0)
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward pass")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(SUITE), help="subset of the suite")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (args.model / "state.json").is_file():
        from .train import load_checkpoint

        model = load_checkpoint(args.model)[0]
    else:
        model = DeepseekV4ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.topk:
        set_topk(model, args.topk)
    haystack = np.load(args.corpus)["eval"]
    results = evaluate(model, tokenizer, haystack, args.lengths, args.n, args.seed, args.batch_tokens,
                       args.tasks, args.verify_generate)
    if args.out:
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        label = f"topk{_topk(model)}"
        previous[label] = {**previous.get(label, {}), **results}
        args.out.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
