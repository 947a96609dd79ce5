"""How well the trained Lightning Indexers track the main attention, and the held-out language-model loss.

On ``--windows`` windows of held-out stdlib code (``eval`` tokens of ``corpus.npz``), with dense attention
(``index_topk`` = every entry, so the main attention's mass over compressed entries is not cut by the indexer):
per CSA layer, the share of the main attention's compressed-entry mass (summed over heads) that falls on the
indexer's top-k entries, against the best possible share (the attention's own top-k) and a recency baseline
(the k most recent visible entries); and the KL of the distillation loss. Also the mean next-token loss.

Run: ``python -m reference.evaluate_indexer --model data/reference --length 2048 --windows 2``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .build_corpus import REFERENCE_DIR, WORK
from .distillation import IndexerDistillation, indexer_kl
from .evaluate_needles import set_topk
from .model_config import csa_layer_indices


@torch.no_grad()
def indexer_agreement(model, ids: torch.Tensor, topk: int) -> dict:
    config = model.config
    layers = csa_layer_indices(config)
    captured: dict[int, dict] = {}
    distill = IndexerDistillation(model, layers, detach_inputs=False)
    distill.enabled = False
    logits_by_layer, weights_by_layer = {}, {}
    hooks = []
    for i in layers:
        attn = model.model.layers[i].self_attn
        hooks.append(attn.compressor.indexer.scorer.register_forward_hook(
            lambda m, a, o, i=i: logits_by_layer.__setitem__(i, o.float())))
        hooks.append(attn.register_forward_hook(lambda m, a, o, i=i: weights_by_layer.__setitem__(i, o[1])))
    set_topk(model, ids.shape[1] // 4)
    out = model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    distill.remove()
    lm = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    S = ids.shape[1]
    for i in layers:
        logits = logits_by_layer[i]  # [B, S, T]
        T = logits.shape[-1]
        mass = weights_by_layer[i][..., -T:].float().sum(1)  # [B, S, T]
        visible = torch.arange(T)[None, :] < ((torch.arange(S) + 1) // 4)[:, None]  # [S, T]
        rows = visible.sum(-1) > topk  # only queries with more than k visible entries: a real choice
        masked = logits.masked_fill(~visible, float("-inf"))
        pick = masked.topk(topk, -1).indices
        got = mass.gather(-1, pick).sum(-1)
        best = mass.masked_fill(~visible, 0).topk(topk, -1).values.sum(-1)
        n_vis = visible.sum(-1)
        recent = ((torch.arange(T)[None, :] >= (n_vis - topk)[:, None]) & visible).float()
        rec = (mass * recent).sum(-1)
        total = (mass * visible).sum(-1).clamp_min(1e-30)
        picks = torch.where(visible.expand_as(logits), torch.arange(T).expand_as(logits), -1)
        kl = indexer_kl(logits, picks[..., :T], weights_by_layer[i])
        captured[i] = {"indexer_topk_share": round(float((got / total)[:, rows].mean()), 4),
                       "oracle_topk_share": round(float((best / total)[:, rows].mean()), 4),
                       "recency_topk_share": round(float((rec / total)[:, rows].mean()), 4),
                       "kl": round(float(kl), 4)}
    return {"lm_loss": round(float(lm), 4), "layers": captured}


def main(argv=None):
    from .train import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--corpus", type=Path, default=WORK / "corpus.npz")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.model / "state.json").is_file():
        model = load_checkpoint(args.model)[0]
    else:
        from transformers import DeepseekV4ForCausalLM

        model = DeepseekV4ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokens = np.load(args.corpus)["eval"]
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(tokens) - args.length, args.windows)
    ids = torch.as_tensor(np.stack([tokens[s:s + args.length] for s in starts]).astype(np.int64))
    ids[:, 0] = model.config.bos_token_id
    print(json.dumps(indexer_agreement(model, ids, args.topk), indent=1))


if __name__ == "__main__":
    main()
