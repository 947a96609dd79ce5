"""The memory indexer as a dense-retrieval dual encoder: a SentenceTransformer built from ``Router.for_query_document``.

    query route    -> GatedQueryTower   (trainable: W_DQ, latent RMSNorm, W_IUQ, W_w; RoPE at t0)
    document route -> FrozenKeySide     (parameter-free: the backbone's frozen K^IComp from the label shards)

Saved with ``save_pretrained`` as a normal sentence-transformers folder (``modules.json``, ``router_config.json``,
one sub-folder per route). :func:`load_query_tower` reads the trained tower back from such a folder (or a
``fm-index train`` output directory) without sentence-transformers' remote-code loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router

from lsa_runtime.errors import FmIndexError
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

from .key_side import FrozenKeySide
from .query_tower import GatedQueryTower

MODEL_SUBDIR = "model"  # inside an `fm-index train --out DIR`: the finished SentenceTransformer folder


def build_dual_encoder(config: MemoryIndexerConfig, indexer: MemoryIndexer | None = None,
                       device: str | torch.device = "cpu") -> SentenceTransformer:
    """A fresh dual encoder; ``indexer`` (e.g. ``MemoryIndexer.init_from_native``) replaces the random init."""
    tower = GatedQueryTower(config, indexer=indexer)
    keys = FrozenKeySide(list(config.layers), config.index_head_dim)
    router = Router.for_query_document(query_modules=[tower], document_modules=[keys], default_route="query")
    # trust_remote_code: the Trainer reloads checkpoints through modules.json, whose module types are ours.
    return SentenceTransformer(modules=[router], device=str(device), trust_remote_code=True)


def router_of(model: SentenceTransformer) -> Router:
    for module in model.modules():
        if isinstance(module, Router):
            return module
    raise FmIndexError("not an fm-index dual encoder: no Router module")


def query_tower(model) -> GatedQueryTower:
    """The GatedQueryTower of a dual encoder (also through DDP / accelerate wrappers)."""
    model = getattr(model, "module", model)
    for module in model.modules():
        if isinstance(module, GatedQueryTower):
            return module
    raise FmIndexError("not an fm-index dual encoder: no GatedQueryTower")


def key_side(model) -> FrozenKeySide:
    model = getattr(model, "module", model)
    for module in model.modules():
        if isinstance(module, FrozenKeySide):
            return module
    raise FmIndexError("not an fm-index dual encoder: no FrozenKeySide")


def find_model_folder(directory: str | Path) -> Path:
    """The SentenceTransformer folder of ``directory``: itself, or ``directory/model`` for a train output."""
    directory = Path(directory)
    for candidate in (directory, directory / MODEL_SUBDIR):
        if (candidate / "modules.json").is_file():
            return candidate
    raise FmIndexError(f"{directory} holds no trained memory indexer (no modules.json); "
                       "run fm-index train, or pass an export with lsa_config.json")


def load_query_tower(directory: str | Path) -> GatedQueryTower:
    """Read the trained GatedQueryTower from a SentenceTransformer folder (its ``router_config.json`` says where)."""
    folder = find_model_folder(directory)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        router_dir = folder / modules[0]["path"]
        router_cfg = json.loads((router_dir / "router_config.json").read_text())
        tower_id = next(mid for mid, typ in router_cfg["types"].items() if typ.endswith(".GatedQueryTower"))
        return GatedQueryTower.from_folder(router_dir / tower_id)
    except (OSError, KeyError, StopIteration, json.JSONDecodeError, RuntimeError) as exc:
        raise FmIndexError(f"corrupt memory-indexer model in {folder}: {exc}") from None
