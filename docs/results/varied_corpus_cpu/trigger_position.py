"""How many entries a memory indexer fetches at the end of a prompt, by the position whose h_t it scores.

    python docs/results/varied_corpus_cpu/trigger_position.py CORPUS.jsonl NAME=EXPORT [NAME=EXPORT ...] [--docs 12]

For ``--docs`` documents spread evenly over a `fm-index make-corpus` corpus: one teacher-forced pass of the `reference` backbone
over prompt + the first generated token, then each indexer's fetch (I >= its threshold at any memory layer, the
OR rule; the Session's first trigger) from h_t at P - 1 (the prompt's last token: what `lsa_runtime.Session`
scores right after the prefill) and at P (the first generated token: where `--source generate` labels made before
2026-12-01 put the trigger). Prints, per indexer and position, the mean entries fetched of the visible ones and
how often the needle's value entries are among them.
"""

from __future__ import annotations

import json
import sys

import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.memory_indexer import load_memory_indexer


def main(argv: list[str]) -> None:
    docs = 12
    if "--docs" in argv:
        i = argv.index("--docs")
        docs = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    corpus, exports = argv[0], dict(a.split("=", 1) for a in argv[1:])
    torch.set_num_threads(1)
    model, tok = load_backbone("reference", dtype=torch.float32)
    records = [json.loads(line) for line in open(corpus)]
    records = records[::max(1, len(records) // docs)][:docs]  # spread over formats and lengths
    indexers = {name: load_memory_indexer(path, model) for name, path in exports.items()}
    layers = sorted({L for mi in indexers.values() for L in mi.config.layers})
    rate = model.config.compress_rates["compressed_sparse_attention"]
    tally = {(name, where): [0, 0, 0] for name in indexers for where in ("P-1", "P")}  # fetched, visible, needle hit
    for record in records:
        ids = tok(record["text"])["input_ids"]
        with torch.no_grad():
            first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        hidden, keys = {}, {}
        hooks = [model.model.layers[L].self_attn.register_forward_pre_hook(
            lambda m, a, k, L=L: hidden.__setitem__(L, (a[0] if a else k["hidden_states"])[0].detach().clone()),
            with_kwargs=True) for L in layers]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids + [first]]), use_cache=True)
        for hook in hooks:
            hook.remove()
        cache = getattr(out, "cache", None) or out.past_key_values
        for L in layers:
            keys[L] = cache.layers[L].compressed_kv["indexer"][0].float()
        P = len(ids)
        value_at = record["needle"]["char_offset"] + record["needle"]["text"].index(record["needle"]["value"])
        value_token = len(tok(record["text"][:value_at])["input_ids"])  # the value's first token, about
        needle_entries = set(range(value_token // rate, (value_token + 6) // rate + 1))
        for name, mi in indexers.items():
            for where, t in (("P-1", P - 1), ("P", P)):
                n_visible = (t + 1) // rate
                got = set(mi.fetch({L: hidden[L][t] for L in mi.config.layers}, t, keys, n_visible=n_visible).tolist())
                row = tally[(name, where)]
                row[0] += len(got)
                row[1] += n_visible
                row[2] += bool(got & needle_entries)
    print(f"{len(records)} prompts of {corpus}")
    print("| indexer | h_t at | entries fetched / visible | share | needle value fetched |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (name, where), (fetched, visible, hits) in tally.items():
        n = len(records)
        print(f"| {name} | {where} | {fetched / n:.0f} / {visible / n:.0f} | {fetched / visible:.3f} | {hits}/{n} |")


if __name__ == "__main__":
    main(sys.argv[1:])
