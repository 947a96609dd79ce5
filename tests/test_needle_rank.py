"""reference.needle_rank: the needle's tokens are found where they were planted, and the rank reported per CSA layer
equals a brute-force rank over the full indexer logits (lsa_runtime.capture.collect_logits)."""

import numpy as np
import pytest
import torch

from lsa_runtime.backbone import csa_layers
from lsa_runtime.capture import collect_logits
from reference.needle_rank import needle_positions, rank_sample, ranks_of
from reference.tasks import Sample


def test_needle_positions_find_the_planted_value_not_the_answer_itself():
    ids = np.array([5, 6, 7, 101, 102, 103, 8, 9, 1, 2, 55, 101, 102, 103])
    # answer " 101 102 103" at 10..13 (its first token may differ in the needle: here 55 vs 7)
    assert needle_positions(ids, answer_start=10, answer_len=4) == [3, 4, 5]
    assert ranks_of(torch.tensor([0.5, 2.0, 1.0, 3.0]), [2]) == 3
    assert ranks_of(torch.tensor([0.5, 2.0, 1.0, 3.0]), [0, 3]) == 1


def test_rank_sample_equals_a_brute_force_rank(tiny_model, sample_ids):
    ids = sample_ids[:400].numpy().copy()
    value = [900, 901, 902]
    ids[123:126] = value  # the needle: tokens 123-125, entries 30 and 31
    ids[380], ids[381:384] = 7, value  # the answer, first answer token at 380
    sample = Sample(input_ids=ids, answer_start=380, answer_len=4, task="niah_single", depths=[0.3])
    got = rank_sample(tiny_model, sample, chunk=64)
    assert got["needle_tokens"] == [123, 124, 125] and got["needle_entries"] == [30, 31]
    query = 379
    full = collect_logits(tiny_model, torch.as_tensor(ids[:query + 1]), chunk_size=400)
    for layer in csa_layers(tiny_model.config):
        row = full[layer][query, : (query + 1) // 4]
        best = max(row[30].item(), row[31].item())
        assert got["ranks"][str(layer)] == 1 + sum(1 for v in row.tolist() if v > best)


def test_attention_rank_equals_the_eager_attention_with_every_entry(tiny_model, sample_ids):
    """attention_ranks (window attention, chunked prefill, every compressed entry readable) ranks the needle as
    transformers' eager attention does over the same query row: its probabilities on the compressed entries summed
    over heads, with index_topk covering every entry; its dense_ranks are those of transformers' own indexer scores
    in that forward; and it leaves the model's attention and top-k as they were."""
    from reference.needle_rank import attention_ranks

    ids = sample_ids[:400].numpy().copy()
    value = [900, 901, 902]
    ids[123:126] = value
    ids[380], ids[381:384] = 7, value
    sample = Sample(input_ids=ids, answer_start=380, answer_len=4, task="niah_single", depths=[0.3])
    attn, topk = tiny_model.config._attn_implementation, tiny_model.config.index_topk
    got = attention_ranks(tiny_model, sample, chunk=96)
    assert tiny_model.config._attn_implementation == attn
    layers = csa_layers(tiny_model.config)
    indexers = [tiny_model.model.layers[i].self_attn.compressor.indexer for i in layers]
    assert all(ix.index_topk == topk and type(ix).__name__ == "DeepseekV4Indexer" for ix in indexers)
    # brute force: one eager forward, every entry readable, the attention weights of each CSA layer at the query
    query, T = 379, 380 // 4
    weights, scores = {}, {}
    hooks = [tiny_model.model.layers[i].self_attn.register_forward_hook(
        lambda m, a, o, i=i: weights.__setitem__(i, o[1].detach())) for i in layers]
    hooks += [ix.scorer.register_forward_hook(lambda m, a, o, i=i: scores.__setitem__(i, o.detach()[0]))
              for i, ix in zip(layers, indexers)]  # transformers' I[t, s] over every entry, in that same forward
    for ix in indexers:
        ix.index_topk = 10_000
    try:
        tiny_model.config._attn_implementation = "eager"
        with torch.no_grad():
            tiny_model(input_ids=torch.as_tensor(ids[:query + 1])[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for ix in indexers:
            ix.index_topk = topk
        tiny_model.config._attn_implementation = attn
    for layer in layers:
        row = weights[layer][0, :, query, -T:].float().sum(0)  # [T] (every entry visible to the last query)
        best = max(row[30].item(), row[31].item())
        assert got["attn_ranks"][str(layer)] == 1 + sum(1 for v in row.tolist() if v > best)
        assert got["attn_share"][str(layer)] == pytest.approx(float(row[[30, 31]].sum() / row.sum()), rel=1e-4)
        index_row = scores[layer][query, :T]
        best = max(index_row[30].item(), index_row[31].item())
        assert got["dense_ranks"][str(layer)] == 1 + sum(1 for v in index_row.tolist() if v > best)


def test_main_reads_an_indexer_checkpoint_as_its_backbone_with_those_indexers(tmp_path):
    """``--model`` given a train_indexer checkpoint (data/reference plus indexers, here its own): the same ranks as
    ``--model reference`` on the same prompt (the checkpoint's loader, not load_backbone, must read it)."""
    import json

    from safetensors.torch import save_file

    from reference.build_corpus import REFERENCE_DIR
    from reference.train import load_checkpoint
    from reference.train_indexer import INDEXER_FILE, weights_digest

    model = load_checkpoint(REFERENCE_DIR)[0]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if ".compressor.indexer." in n},
              ckpt / INDEXER_FILE)
    (ckpt / "state.json").write_text(json.dumps({"step": 0, "init": str(REFERENCE_DIR),
                                                 "init_sha256": weights_digest(REFERENCE_DIR),
                                                 "config": model.config.to_dict(), "log": []}))
    tokens = np.random.default_rng(0).integers(3, 4000, 60_000).astype(np.uint16)
    np.savez(tmp_path / "corpus.npz", train=tokens, eval=tokens)
    from reference.needle_rank import main

    rows = []
    for source in (str(ckpt), "reference"):
        out = tmp_path / f"{len(rows)}.json"
        main(["--model", source, "--corpus", str(tmp_path / "corpus.npz"), "--lengths", "2048", "--n", "1",
              "--out", str(out)])
        samples = json.loads(out.read_text())["samples"]
        rows.append({k: {f: v for f, v in row.items() if f != "seconds"} for k, row in samples.items()})
    assert rows[0] == rows[1] and rows[0]["2048/0"]["ranks"]
