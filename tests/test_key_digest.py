"""lsa_runtime/key_digest.py: the fingerprint of a backbone's Lightning Indexer keys, recorded by build-labels,
carried by the export, and checked when an export is loaded for a model (same config, other weights: refused)."""

import copy
import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch

from indexer_train.build_labels import LabelParams, Reporter, build_labels
from lsa_runtime.backbone import DATA_DIR, load_backbone
from lsa_runtime.errors import FmIndexError
from lsa_runtime.key_digest import index_keys_digest
from lsa_runtime.memory_indexer import ExportError, MemoryIndexer, MemoryIndexerConfig, load_memory_indexer

PARAMS = LabelParams(layers=(2, 4), tau=16, nucleus=0.6, min_votes=3, chunk_size=64)


def _by_hand(model, layers) -> str:
    """The digest written out: per layer, the four key-side tensors of the indexer's compressor, in name order."""
    digest = hashlib.sha256()
    for L in sorted(layers):
        indexer = model.model.layers[L].self_attn.compressor.indexer
        for name in ("gate_proj.weight", "kv_norm.weight", "kv_proj.weight", "position_bias"):
            digest.update(f"{L}.{name}".encode())
            value = indexer.get_parameter(name).detach().to(torch.bfloat16)
            digest.update(bytes(value.view(torch.uint8).flatten().tolist()))
    return digest.hexdigest()


def _changed(model, path: str):
    """A copy of ``model`` with one parameter of layer 2's indexer nudged."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[2].self_attn.compressor.indexer.get_parameter(path).view(-1)[0] += 0.5
    return other


def test_the_digest_is_the_key_side_of_the_memory_layers(tiny_model):
    digest = index_keys_digest(tiny_model, (2, 4))
    assert digest == _by_hand(tiny_model, (2, 4)) and len(digest) == 64
    assert index_keys_digest(tiny_model, (4, 2)) == digest != index_keys_digest(tiny_model, (2, 4, 6))
    assert index_keys_digest(load_backbone("tiny", dtype=torch.bfloat16)[0], (2, 4)) == digest  # any load dtype
    for query_side in ("q_b_proj.weight", "scorer.weights_proj.weight"):
        assert index_keys_digest(_changed(tiny_model, query_side), (2, 4)) == digest
    for key_side in ("kv_proj.weight", "gate_proj.weight", "kv_norm.weight", "position_bias"):
        assert index_keys_digest(_changed(tiny_model, key_side), (2, 4)) != digest
    assert index_keys_digest(tiny_model, (0,)) == ""  # a sliding layer has no indexer
    with torch.device("meta"):
        offloaded = type(tiny_model)(tiny_model.config)
    assert index_keys_digest(offloaded, (2, 4)) == ""


def _other_tiny(tmp_path):
    """data/tiny with layer 2's indexer key projection changed: same config (and config hash), other keys."""
    model = _changed(load_backbone("tiny", dtype=torch.float32)[0], "kv_proj.weight")
    folder = tmp_path / "other-tiny"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DATA_DIR / "tiny" / name, folder / name)
    return folder, model


def test_labels_record_the_digest_and_a_resume_with_other_weights_is_refused(small_corpus, tmp_path, tiny_model):
    out = tmp_path / "labels"

    class Crash(Reporter):
        def document_done(self, doc, skipped):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_labels("tiny", small_corpus, out, PARAMS, reporter=Crash())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["index_keys_sha256"] == index_keys_digest(tiny_model, PARAMS.layers)
    folder, _ = _other_tiny(tmp_path)
    with pytest.raises(FmIndexError, match="other weights of this backbone"):
        build_labels(folder, small_corpus, out, PARAMS, resume=True)
    assert json.loads((out / "manifest.json").read_text()) == manifest  # restored as it was
    build_labels("tiny", small_corpus, out, PARAMS, resume=True)  # the same weights finish it


def test_an_export_for_other_keys_is_refused_where_it_is_loaded(tmp_path, tiny_model):
    config = MemoryIndexerConfig.from_backbone_config(tiny_model.config, (2, 4), rank=16)
    assert config.backbone_keys_sha256 == ""  # no weights seen: unknown, unchecked
    plain = MemoryIndexer(config).save_export(tmp_path / "plain")
    load_memory_indexer(plain, tiny_model)
    keyed = MemoryIndexer(replace(config, backbone_keys_sha256=index_keys_digest(tiny_model, (2, 4))))
    export = keyed.save_export(tmp_path / "keyed")
    assert MemoryIndexer.from_export(export).config.backbone_keys_sha256 == keyed.config.backbone_keys_sha256
    assert load_memory_indexer(export, tiny_model) is not None
    _, other = _other_tiny(tmp_path)
    with pytest.raises(ExportError, match="trained against other weights of this backbone"):
        load_memory_indexer(export, other)
    with pytest.raises(ExportError, match="trained against other weights"):
        load_memory_indexer(keyed, other)
    load_memory_indexer(plain, other)  # an export without a digest: not checked
