"""Memory-indexer layers: the authors' release numbers them as indices into the list of CSA layers (V4-Flash:
csa 10, 12, 20 = model layers 22, 26, 42); defaults, the csa: notation, and both numberings in outputs."""

import json

import pytest

from lsa_runtime.backbone import (DATA_DIR, csa_index, csa_layers, default_memory_layers, describe_layers,
                                  load_config, model_memory_layers, parse_layers)
from lsa_runtime.errors import FmIndexError


def flash():
    from bench.flash_model import flash_config

    return flash_config()


def test_v4_flash_defaults_are_csa_indices_10_12_20():
    config = flash()
    assert csa_layers(config) == list(range(2, 43, 2))  # 21 CSA layers
    assert default_memory_layers(config) == [22, 26, 42]
    assert [csa_index(config, L) for L in (22, 26, 42)] == [10, 12, 20]
    assert parse_layers("csa:10,12,20", config) == [22, 26, 42] == parse_layers("42,22,26", config)
    assert describe_layers(config, [22, 26, 42]) == "22, 26, 42 (CSA indices 10, 12, 20)"


def test_smaller_backbones_take_the_same_positions_in_their_csa_list():
    config = load_config("tiny")  # CSA layers 2, 4, 6, 8, 10: positions 10/21, 12/21, 20/21 of five -> 2, 3, 4
    assert default_memory_layers(config) == [6, 8, 10]
    assert parse_layers(None, config) == [6, 8, 10] and parse_layers("csa:0,4", config) == [2, 10]


@pytest.mark.parametrize("n_csa, positions", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [1, 2, 3]), (5, [2, 3, 4])])
def test_few_csa_layers_still_give_distinct_layers(monkeypatch, n_csa, positions):
    # hand-checked: 10/21, 12/21, 20/21 of n rounded; a taken position moves to the nearest free one
    import lsa_runtime.backbone as backbone

    monkeypatch.setattr(backbone, "csa_layers", lambda config: [2 * p + 2 for p in range(n_csa)])
    assert default_memory_layers(None) == [2 * p + 2 for p in positions]


def test_a_model_folder_may_name_its_own_memory_layers(tmp_path):
    """fm_index.json's memory_layers is the default of that model (validated); without it, the positions."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(DATA_DIR / "tiny" / "config.json", folder / "config.json")
    config = load_config(folder)
    assert model_memory_layers(folder, config) == [6, 8, 10] == parse_layers(None, config, folder)
    (folder / "fm_index.json").write_text(json.dumps({"memory_layers": [4, 2, 6]}))
    assert model_memory_layers(folder, config) == [2, 4, 6] == parse_layers(None, config, folder)
    assert parse_layers("csa:4", config, folder) == [10]  # an explicit --layers wins
    (folder / "fm_index.json").write_text(json.dumps({"memory_layers": [3]}))
    with pytest.raises(FmIndexError, match="not CSA"):
        model_memory_layers(folder, config)
    assert model_memory_layers("reference", load_config("reference")) == [2, 4, 6]


@pytest.mark.parametrize("text, message", [("csa:5", "CSA index 5 does not exist: the model has 5 CSA layers"),
                                           ("3", "layer 3 is a heavily_compressed_attention layer, not CSA"),
                                           ("csa:", "names no layer"), ("a,b", "comma-separated integers")])
def test_bad_layers(text, message):
    with pytest.raises(FmIndexError, match=message):
        parse_layers(text, load_config("tiny"))


def test_manifest_and_export_name_both_numberings(small_corpus, tmp_path):
    from indexer_train.build_labels import LabelParams, build_labels
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    config = load_config("tiny")
    layers = parse_layers("csa:1,3", config)
    build_labels("tiny", small_corpus, tmp_path / "labels", LabelParams(layers=tuple(layers), tau=16, chunk_size=64))
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["memory_layers"] == {"layers": [4, 8], "csa_indices": [1, 3]}
    mi = MemoryIndexerConfig.from_label_manifest(manifest, layers, rank=8)
    assert mi.csa_indices == (1, 3)
    MemoryIndexer(mi).save_export(tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "lsa_config.json").read_text())
    assert exported["layers"] == [4, 8] and exported["csa_indices"] == [1, 3]
