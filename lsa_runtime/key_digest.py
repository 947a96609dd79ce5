"""A fingerprint of the weights that make a backbone's Lightning Indexer keys K^IComp at the memory layers.

A memory indexer is a dual encoder whose document side is the backbone's frozen indexer keys: its towers (W_DQ,
W_IUQ, W_w) were trained to score *those* keys. The backbone's config hash (:func:`.backbone.config_hash`) names
its shapes, not its weights, so a fine-tuned backbone of the same config, or the bundled ``reference`` after its
Lightning Indexers were retrained, would pass that check and be served by towers trained for other keys. The
labels record this digest (``fm-index build-labels``: the manifest's ``backbone.index_keys_sha256``), the training
run and the export carry it (``MemoryIndexerConfig.backbone_keys_sha256``), and loading an export for a model
(:func:`.memory_indexer.load_memory_indexer`) refuses one whose keys differ.

What is hashed: per memory layer in order, the key side of its Lightning Indexer's compressor (every parameter of
``compressor.indexer`` but the query projection ``q_b_proj`` and the scorer's head weights: the key projection,
its gate, norm and position bias), each as its name and its values in bf16 (so a model loaded in fp32 or bf16
gives one digest). The layers below also shape the keys; a fine-tune that leaves every indexer untouched is not
seen. A layer whose key weights are not plain tensors on a real device (offloaded to ``meta``) gives no digest
(``""``), and an empty digest on either side checks nothing.
"""

from __future__ import annotations

import hashlib

import torch

QUERY_SIDE = ("q_b_proj.", "scorer.")


def index_keys_digest(model, layers) -> str:
    """sha256 (hex) of the key-side indexer weights of ``layers`` (model layer indices), or "" (see the module doc)."""
    decoder = model.model if hasattr(model, "model") else model
    digest = hashlib.sha256()
    for index in sorted(int(L) for L in layers):
        compressor = getattr(decoder.layers[index].self_attn, "compressor", None)
        indexer = getattr(compressor, "indexer", None)
        if indexer is None:
            return ""
        for name, param in sorted(indexer.named_parameters()):
            if name.startswith(QUERY_SIDE):
                continue
            if type(param.data) is not torch.Tensor or param.device.type == "meta" or not param.is_floating_point():
                return ""
            digest.update(f"{index}.{name}".encode())
            digest.update(param.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()
