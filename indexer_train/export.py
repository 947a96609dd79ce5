"""`fm-index export`: a trained memory indexer -> ``model.safetensors`` + ``lsa_config.json`` for ``lsa_runtime``.

The export holds every layer's W_DQ, latent RMSNorm weight, W_IUQ and W_w under the names of docs/DESIGN.md
("Export"), the rope settings, threshold, tau, the backbone config hash the indexer was trained for and the
held-out metrics. ``lsa_runtime.memory_indexer.MemoryIndexer.from_export`` loads it with torch + safetensors
only (no sentence-transformers, no trust_remote_code) and scores exactly as the trained dual encoder does.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsa_runtime.errors import FmIndexError
from lsa_runtime.memory_indexer import CONFIG_NAME, MemoryIndexer

from .dual_encoder import MODEL_SUBDIR, load_query_tower
from .trainer import STATE_NAME, read_state


def load_trained_indexer(directory: str | Path, backbone: str | None = None,
                         files_need: str | None = None) -> tuple[MemoryIndexer, dict | None]:
    """(indexer, train_state or None) from an ``fm-index train --out`` directory, a SentenceTransformer folder
    holding the dual encoder, an existing export, or the authors' joint checkpoint (a file; ``backbone`` names
    the model it serves; ``files_need``: how the caller's user names it, e.g. "--model"; None where a file cannot
    be read). An unfinished training run is an error."""
    directory = Path(directory)
    if directory.is_file():
        from lsa_runtime.backbone import load_config
        from lsa_runtime.release_format import load_release_checkpoint

        if backbone is None and files_need is None:
            raise FmIndexError(f"{directory} is a file, not a training run or export directory")
        if backbone is None:
            raise FmIndexError(f"{directory} is a file (the authors' checkpoint format?): give {files_need}, the "
                               "backbone it serves")
        return load_release_checkpoint(directory, load_config(backbone)), None
    if not directory.is_dir():
        raise FmIndexError(f"{directory} does not exist")
    if (directory / CONFIG_NAME).is_file():
        indexer = MemoryIndexer.from_export(directory)
        return indexer, indexer.config.metrics.get("training")
    state = read_state(directory)
    if state is not None and not state.get("complete"):
        raise FmIndexError(f"the training run in {directory} is unfinished (no final model); "
                           f"continue it with fm-index train --resume --out {directory}")
    if state is None and (directory / "checkpoints").is_dir() and not (directory / MODEL_SUBDIR).is_dir():
        raise FmIndexError(f"{directory} holds only checkpoints of an unfinished training run")
    return load_query_tower(directory).indexer, state


def export_indexer(model_dir: str | Path, out: str | Path, expected_config_hash: str | None = None,
                   resident: dict | None = None, target_recall: float | None = None, progress=None) -> Path:
    """Write the export of the trained indexer in ``model_dir`` to ``out`` (atomically; ``out`` must not exist).
    ``resident``: ``keep_recent`` / ``keep_first`` / ``ensemble`` / ``fetch_top`` / ``fetch_neighbours`` to store
    instead of the trained config's (None values keep it). ``target_recall``: store the threshold that keeps this
    share of the golden entries on the training run's held-out documents (:mod:`indexer_train.threshold`) instead
    of the trained one."""
    from dataclasses import replace

    out = check_export_inputs(model_dir, out, target_recall)
    indexer, state = load_trained_indexer(model_dir)
    changes = {k: v for k, v in (resident or {}).items() if v is not None}
    if changes:
        indexer.config = replace(indexer.config, **changes)
    choice = None
    if target_recall is not None:
        choice = _threshold_for(indexer, state, model_dir, target_recall, progress)
        indexer.config = replace(indexer.config, threshold=choice.threshold)
    if expected_config_hash is not None and indexer.config.backbone_config_hash != expected_config_hash:
        raise FmIndexError(f"the indexer in {model_dir} was trained for backbone config "
                           f"{indexer.config.backbone_config_hash}, not {expected_config_hash}")
    metrics = dict(indexer.config.metrics)
    if state is not None and (Path(model_dir) / STATE_NAME).is_file():
        metrics = {"heldout": state.get("metrics", {}),
                   "training": {k: state.get(k) for k in ("labels", "labels_config_hash", "labels_definition",
                                                          "options", "steps", "eval_documents")}}
    if choice is not None:
        metrics["threshold_choice"] = choice.as_dict()
    json.dumps(metrics)  # must be serialisable before anything is written
    return indexer.save_export(out, metrics=metrics)


def check_export_inputs(model_dir, out, target_recall: float | None) -> Path:
    """Everything an export can refuse before it scores or writes anything: an occupied ``out``, a target recall
    out of range, a run whose held-out labels are not there to choose the threshold on. Returns ``out``."""
    from .threshold import check_target_recall

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FmIndexError(f"export directory {out} exists and is not empty; choose another --out")
    if target_recall is not None:
        check_target_recall(target_recall)
        _held_out_labels(model_dir)
    return out


def _held_out_labels(model_dir) -> tuple[str, list[int]]:
    """(labels directory, held-out document indices) recorded by the training run in ``model_dir``."""
    state = read_state(Path(model_dir)) or {}
    documents, labels = state.get("eval_documents"), state.get("labels")
    if not documents or not labels:
        raise FmIndexError(f"--target-recall needs the held-out documents of a training run; {model_dir} records "
                           "none (give a train --out directory trained with held-out documents, the default)")
    if not Path(labels).is_dir():
        raise FmIndexError(f"--target-recall reads the run's held-out labels, and {labels} is gone")
    return labels, sorted(documents)


def _threshold_for(indexer, state, model_dir, target_recall: float, progress):
    """T* on the held-out documents of the training run in ``model_dir`` (their labels must still exist)."""
    from .shards import LabelShards
    from .threshold import choose_threshold

    labels, documents = _held_out_labels(model_dir)
    shards = LabelShards(labels)
    if shards.config_hash != indexer.config.backbone_config_hash:
        raise FmIndexError(f"the labels in {labels} are for another backbone than the indexer")
    return choose_threshold(indexer, shards, documents, target_recall, progress=progress)


def export_release_checkpoint(model_dir: str | Path, out: str | Path) -> Path:
    """The trained indexer in ``model_dir`` as the authors' joint checkpoint (``torch.save`` of
    ``retrievers.l{csa index}.*``, :mod:`lsa_runtime.release_format`) at ``out``, a file that must not exist."""
    from lsa_runtime.release_format import write_release_checkpoint

    indexer, _ = load_trained_indexer(model_dir)
    return write_release_checkpoint(indexer, out)
