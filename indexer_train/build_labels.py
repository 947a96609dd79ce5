"""build-labels: run the frozen DeepSeek-V4 once over a corpus and write FlashMemory's training labels.

Per document: chunked prefill with hooks (:mod:`lsa_runtime.capture`), streaming labels
(:class:`~indexer_train.labels.WindowLabeler`: nucleus p -> vote >= min_votes over all CSA layers -> union over
the tau tokens after each trigger), the trigger hidden states h_t0 at the memory-indexer layers and the
layers' compressed indexer keys, written as one Arrow rows file and one keys file (:mod:`.shards`).

Documents are independent, so ``--shard I/N`` (or torchrun's RANK/WORLD_SIZE) takes the documents whose
corpus index is I mod N; N shard runs into one directory plus :func:`merge_shards` give exactly the
single-process dataset. ``--resume`` skips documents whose done marker exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lsa_runtime.backbone import (
    IndexerGeometry,
    config_hash,
    csa_index,
    csa_layers,
    load_backbone,
    load_config,
    parse_device,
    parse_dtype,
    validate_memory_layers,
)
from lsa_runtime.capture import ChunkInfo, IndexerCapture, IndexerObserver
from lsa_runtime.errors import FmIndexError
from lsa_runtime.key_digest import index_keys_digest
from lsa_runtime.outputs import OutputLock, check_output_dir, remove_stale_temps
from lsa_runtime.placement import parse_device_map

from .corpus import Corpus, Document, tokenize
from .labels import SOFTMAX_OVER, WindowLabeler, trigger_positions

SOURCES = ("document", "generate")
# --source generate: where the first trigger sits. "last_prompt_token" (the default since 2026-12-01): at the
# prompt's last token P-1, whose h_t is what lsa_runtime.Session scores at its first trigger (right after the
# prefill; window P-1 .. P+tau-2). "first_generated_token": at P (h of the first generated token; window P ..
# P+tau-1), as the release's dumps hold it; an indexer trained there fetched every entry when the Session scored
# h at P-1 (docs/RESULTS.md, section 7).
GENERATE_TRIGGERS = ("last_prompt_token", "first_generated_token")
# What a manifest written before a parameter existed was built with.
LEGACY_PARAMS = {"softmax_over": "visible", "source": "document", "new_tokens": None}
from .shards import (
    FORMAT,
    LabelRow,
    ShardError,
    ShardWriter,
    completed_documents,
    write_json,
)


@dataclass(frozen=True)
class LabelParams:
    """Everything that shapes the labels; a resumed or merged run must use the same values."""

    layers: tuple[int, ...]
    tau: int = 64
    nucleus: float = 0.6
    min_votes: int = 3
    max_tokens: int | None = None
    chunk_size: int = 512
    dtype: str = "float32"
    softmax_over: str = "topk"  # "topk": the release's definition; "visible": every visible entry
    source: str = "document"  # "document": label the corpus text; "generate": label a greedy continuation
    new_tokens: int | None = None  # source="generate": tokens generated after each document (the prompt)
    generate_trigger: str | None = None  # source="generate": GENERATE_TRIGGERS (None: the first of them)

    def __post_init__(self):
        if self.source == "generate" and self.generate_trigger is None:
            object.__setattr__(self, "generate_trigger", GENERATE_TRIGGERS[0])

    def check(self, config) -> "LabelParams":
        if self.tau < 1:
            raise FmIndexError(f"--tau must be >= 1, got {self.tau}")
        if self.softmax_over not in SOFTMAX_OVER:
            raise FmIndexError(f"--softmax-over must be topk or visible, got '{self.softmax_over}'")
        if self.source not in SOURCES:
            raise FmIndexError(f"--source must be document or generate, got '{self.source}'")
        if self.source == "generate" and (self.new_tokens is None or self.new_tokens < self.tau):
            raise FmIndexError(f"--source generate needs --new-tokens N with N >= --tau ({self.tau}): the "
                               f"generated tokens are what gets labelled, one trigger per tau of them")
        if self.source == "document" and self.new_tokens is not None:
            raise FmIndexError("--new-tokens is for --source generate")
        if self.source == "generate" and self.generate_trigger not in GENERATE_TRIGGERS:
            raise FmIndexError(f"the generate trigger must be one of {', '.join(GENERATE_TRIGGERS)}, got "
                               f"'{self.generate_trigger}'")
        if self.source == "document" and self.generate_trigger is not None:
            raise FmIndexError("the generate trigger is for --source generate")
        if not 0.0 < self.nucleus <= 1.0:
            raise FmIndexError(f"--nucleus must be in (0, 1], got {self.nucleus}")
        n_csa = len(csa_layers(config))
        if not 1 <= self.min_votes <= n_csa:
            raise FmIndexError(f"--min-votes must be between 1 and the number of CSA layers ({n_csa}), "
                               f"got {self.min_votes}")
        if self.chunk_size < 1:
            raise FmIndexError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise FmIndexError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        parse_dtype(self.dtype)
        validate_memory_layers(config, self.layers)
        return self


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise FmIndexError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise FmIndexError(f"--shard {text}: need 0 <= I < N")
    return index, count


def manifest_name(shard: tuple[int, int]) -> str:
    return "manifest.json" if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.json"


class _DocumentObserver(IndexerObserver):
    """Feeds one document's indexer internals into the WindowLabeler and keeps h_t0 at the triggers."""

    def __init__(self, labeler: WindowLabeler, memory_layers, triggers):
        self.labeler = labeler
        self.memory_layers = set(memory_layers)
        self.triggers = sorted(triggers)
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}  # (t0, layer) -> [d]
        self.closed = []
        self._t_len: dict[int, int] = {}

    def on_chunk_start(self, chunk: ChunkInfo):
        self.labeler.start_chunk(chunk.start, chunk.length)

    def on_logits(self, layer, chunk, logits):
        self._t_len[layer] = logits.shape[-1]
        self.labeler.add_logits(logits)

    def on_topk(self, layer, chunk, picks):
        self.labeler.add_topk(picks, self._t_len[layer])

    def on_hidden(self, layer, chunk, hidden):
        for t0 in self.triggers:
            if chunk.start <= t0 < chunk.start + chunk.length:
                self.hidden[(t0, layer)] = hidden[t0 - chunk.start].to(torch.float16).cpu()

    def on_chunk_end(self, chunk):
        self.closed.extend(self.labeler.end_chunk())


def label_document(model, doc: Document, input_ids: list[int], params: LabelParams, progress=None,
                   first_trigger: int | None = None, new_tokens: int = 0):
    """Labels of one document: (rows, keys by layer, stats). Triggers at ``first_trigger`` (default tau) + k *
    tau whose window fits. With ``new_tokens`` > 0 the document is a prompt: the backbone's greedy continuation
    of that many tokens is decoded under the same hooks and labelled with it (``label_generated``)."""
    rate = model.config.compress_rates["compressed_sparse_attention"]
    n = len(input_ids) + new_tokens
    triggers = trigger_positions(n, params.tau, first_trigger)
    labeler = WindowLabeler(n_tokens=n, tau=params.tau, rate=rate, nucleus=params.nucleus,
                            min_votes=params.min_votes, softmax_over=params.softmax_over,
                            first_trigger=first_trigger)
    observer = _DocumentObserver(labeler, params.layers, triggers)
    capture = IndexerCapture(model, memory_layers=params.layers, chunk_size=params.chunk_size)
    generated: list[int] = []
    if new_tokens:
        cache, generated = capture.generate(torch.tensor(input_ids, dtype=torch.long), new_tokens, observer,
                                            progress=progress)
    else:
        cache = capture.prefill(torch.tensor(input_ids, dtype=torch.long), observer, progress=progress)
    keys = {layer: capture.indexer_keys(cache, layer).to(torch.float16).cpu() for layer in params.layers}
    del cache
    by_position = {trig.position: trig for trig in observer.closed}
    if sorted(by_position) != triggers:
        raise RuntimeError(f"internal error: triggers {sorted(by_position)} != expected {triggers}")
    rows = []
    for t0 in triggers:
        trig = by_position[t0]
        for layer in params.layers:
            rows.append(LabelRow(doc_id=doc.id, doc_index=doc.index, layer=layer, position=t0,
                                 n_visible=trig.n_visible, hidden=observer.hidden[(t0, layer)],
                                 positives=trig.positives, native_topk_union=trig.native_topk_union,
                                 n_candidates=trig.n_candidates))
    stats = {
        "doc_id": doc.id,
        "tokens": n,
        "triggers": len(triggers),
        "rows": len(rows),
        "entries": int(keys[params.layers[0]].shape[0]),
        "positives_sum": int(sum(by_position[t].positives.numel() for t in triggers)),
        "candidates_sum": int(sum(by_position[t].n_candidates for t in triggers)),
        "native_topk_sum": int(sum(by_position[t].native_topk_union.numel() for t in triggers)),
        "visible_sum": int(sum(by_position[t].n_visible for t in triggers)),
    }
    if new_tokens:
        stats.update(prompt_tokens=len(input_ids), generated_tokens=len(generated))
    return rows, keys, stats


def label_generated(model, doc: Document, prompt_ids: list[int], params: LabelParams, progress=None):
    """``--source generate``: labels of the tokens the backbone generates after the document, as the authors'
    release labels its dumps. One pass: the prompt is prefilled and the continuation decoded greedily with the
    capture hooks on (:meth:`IndexerCapture.generate`), so the decode steps' own indexer logits and hidden states
    are labelled. Triggers start at the prompt's last token (``generate_trigger="last_prompt_token"``: the
    position whose h_t a Session scores at its first trigger) or at the first generated token; every window
    covers the generated tokens."""
    first = len(prompt_ids) - 1 if params.generate_trigger == "last_prompt_token" else len(prompt_ids)
    return label_document(model, doc, prompt_ids, params, progress=progress, first_trigger=first,
                          new_tokens=params.new_tokens)


def _backbone_block(name: str, config) -> dict:
    geo = IndexerGeometry.from_config(config)
    return {
        "name": str(name),
        "config_hash": config_hash(config),
        "num_hidden_layers": config.num_hidden_layers,
        "csa_layers": csa_layers(config),
        "hidden_size": geo.hidden_size,
        "index_n_heads": geo.index_n_heads,
        "index_head_dim": geo.index_head_dim,
        "rope_dim": geo.rope_dim,
        "compress_rate": geo.compress_rate,
        "index_topk": geo.index_topk,
        "rope": config.rope_parameters["compress"],
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "index_keys_sha256": "",  # lsa_runtime.key_digest: set once the weights are loaded
    }


def _versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        fm = version("fm-index")
    except Exception:
        fm = "dev"
    return {"fm_index": fm, "torch": torch.__version__, "transformers": transformers.__version__}


def _summarise(done: dict[int, dict]) -> dict:
    labelled = [s for s in done.values() if not s.get("skipped")]
    triggers = sum(s["triggers"] for s in labelled)
    return {
        "documents": len(labelled),
        "skipped": len(done) - len(labelled),
        "tokens": sum(s["tokens"] for s in labelled),
        "triggers": triggers,
        "rows": sum(s["rows"] for s in labelled),
        "positives_mean": sum(s["positives_sum"] for s in labelled) / max(triggers, 1),
        "candidates_mean": sum(s["candidates_sum"] for s in labelled) / max(triggers, 1),
        "native_topk_mean": sum(s["native_topk_sum"] for s in labelled) / max(triggers, 1),
        "visible_mean": sum(s["visible_sum"] for s in labelled) / max(triggers, 1),
    }


class Reporter:
    """Progress callbacks (the CLI draws them with rich); the default does nothing."""

    def start(self, n_documents: int) -> None: ...

    def document(self, doc: Document, n_tokens: int) -> None: ...

    def tokens(self, n_done: int) -> None: ...

    def document_done(self, doc: Document, skipped: bool) -> None: ...


PARAM_FLAGS = {"layers": "--layers", "tau": "--tau", "nucleus": "--nucleus", "min_votes": "--min-votes",
               "max_tokens": "--max-tokens", "chunk_size": "--chunk-size", "dtype": "--dtype",
               "softmax_over": "--softmax-over", "source": "--source", "new_tokens": "--new-tokens",
               "generate_trigger": "the generate trigger"}


def resume_mismatch(old: dict, new: dict, out: Path) -> str | None:
    """The first difference between a stored run's header and this run's, said in the user's terms."""
    if old.get("backbone", {}).get("config_hash") != new["backbone"]["config_hash"]:
        return (f"{out} was built from another backbone (config hash {old.get('backbone', {}).get('config_hash')}, "
                f"this run's model has {new['backbone']['config_hash']})")
    for key, flag in PARAM_FLAGS.items():
        legacy = LEGACY_PARAMS.get(key)
        if key == "generate_trigger" and old.get("params", {}).get("source") == "generate":
            legacy = "first_generated_token"  # generate labels from before the option: triggers at P
        was = old.get("params", {}).get(key, legacy)
        now = json.loads(json.dumps(new["params"][key]))
        if was != now:
            return f"{out} was built with {flag} {_show(was)}, this run asks for {flag} {_show(now)}"
    if old.get("shard") != new["shard"]:
        was, now = old.get("shard", {}), new["shard"]
        return f"{out} was built as --shard {was.get('index')}/{was.get('count')}, this run is {now['index']}/{now['count']}"
    was, now = old.get("corpus", {}), new["corpus"]
    if "fingerprint" in was and was["fingerprint"] != now["fingerprint"]:
        a, b = was["fingerprint"], now["fingerprint"]
        what = (f"{a['documents']} documents, this corpus has {b['documents']}" if a["documents"] != b["documents"]
                else "documents with other ids or contents")
        return f"{out} was built from another corpus ({was.get('path')}: {what})"
    return None


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def build_labels(model: str, corpus: str | Path, out: str | Path, params: LabelParams, device: str = "cpu",
                 shard: tuple[int, int] = (0, 1), resume: bool = False, reporter: Reporter | None = None,
                 device_map: str | dict | None = None) -> dict:
    """Build (or resume) the label shards of ``corpus`` in ``out``; returns the run summary.

    ``device_map`` (instead of ``device``) spreads the backbone's layers over devices (see
    :func:`lsa_runtime.placement.parse_device_map`); the labels do not depend on where the layers run, so a resumed
    run may use another placement. Every option and the corpus are checked before anything is written; ``out`` is
    locked for the run (per shard when ``shard`` splits the corpus), so a second writer is refused."""
    reporter = reporter or Reporter()
    config = load_config(model)
    params.check(config)
    device = parse_device(device)
    if device_map is not None:
        parse_device_map(device_map, config)
    out = Path(out)
    check_output_dir(out)
    docs = Corpus(corpus)
    backbone = _backbone_block(model, config)
    manifest_path = out / manifest_name(shard)
    header = {"format": FORMAT, "backbone": backbone, "params": asdict(params),
              "memory_layers": {"layers": list(params.layers),
                                "csa_indices": [csa_index(config, L) for L in params.layers]},
              "shard": {"index": shard[0], "count": shard[1]},
              "corpus": {"path": str(corpus), "documents": len(docs), "fingerprint": docs.fingerprint}}
    if not manifest_path.exists() and out.exists() and shard[1] == 1 and \
            any(p for p in out.iterdir() if not p.name.startswith(("manifest.shard", ".fm-index"))):
        raise FmIndexError(f"output directory {out} exists and is not an fm-index label directory")
    lock = OutputLock(out, "build-labels", part=None if shard[1] == 1 else f"shard-{shard[0]}-of-{shard[1]}")
    with lock:
        old = None
        if manifest_path.exists():
            if not resume:
                raise FmIndexError(f"{out} already holds labels ({manifest_path.name}); pass --resume to continue "
                                   "or choose another --out")
            try:
                old = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as exc:
                raise ShardError(f"corrupt manifest {manifest_path} (line {exc.lineno}, column {exc.colno}: "
                                 f"{exc.msg})") from None
            mismatch = resume_mismatch(old, header, out)
            if mismatch:
                raise FmIndexError(f"--resume: {mismatch}; use the same options and corpus, or another --out")
            # the weights' digest is known once they are loaded (_label_documents); keep the first run's till then
            header["backbone"]["index_keys_sha256"] = old.get("backbone", {}).get("index_keys_sha256", "")
        remove_stale_temps(out)
        write_json(manifest_path, {**header, "complete": False, "versions": _versions()})
        return _label_documents(model, docs, out, params, device, shard, header, manifest_path, config, reporter,
                                device_map, previous=old)


def _label_documents(model, docs, out, params, device, shard, header, manifest_path, config, reporter,
                     device_map=None, previous: dict | None = None) -> dict:
    """Label the documents of ``docs`` not yet done. ``previous``: a resumed run's manifest as it was, restored if
    this run's weights turn out to be others than those it was built from."""
    done = completed_documents(out)
    mine = [d for d in docs if d.index % shard[1] == shard[0]]
    todo = [d for d in mine if d.index not in done]
    reporter.start(len(todo))
    writer = ShardWriter(out, config.hidden_size, list(params.layers), config.index_head_dim)
    backbone_model = tokenizer = None
    tokens_this_run, started = 0, time.perf_counter()
    if todo:
        backbone_model, tokenizer = load_backbone(model, device=device, dtype=params.dtype, device_map=device_map)
        keys = index_keys_digest(backbone_model, params.layers)
        earlier = header["backbone"].get("index_keys_sha256", "")
        if earlier and keys and earlier != keys:  # a resumed run, nothing labelled with these weights yet
            write_json(manifest_path, previous)
            raise FmIndexError(f"--resume: {out} was built from other weights of this backbone (the Lightning "
                               f"Indexer keys of layers {list(params.layers)} differ); use the same model, or "
                               "another --out")
        header["backbone"]["index_keys_sha256"] = keys or earlier
        write_json(manifest_path, {**header, "complete": False, "versions": _versions()})
    for doc in todo:
        ids = tokenize(doc, tokenizer)
        if ids and max(ids) >= config.vocab_size:
            raise FmIndexError(f"document '{doc.id}' has token id {max(ids)} >= vocab size {config.vocab_size}")
        if params.max_tokens is not None:
            ids = ids[: params.max_tokens]
        generate = params.source == "generate"
        reporter.document(doc, len(ids) + (params.new_tokens if generate else 0))
        too_short = len(ids) < 1 if generate else len(ids) < 2 * params.tau
        if too_short:
            reason = ("an empty prompt" if generate else
                      f"{len(ids)} tokens < 2 * tau = {2 * params.tau}: no full trigger window")
            write_json(out / "done" / f"{doc.index:08d}.json",
                       {"doc_id": doc.id, "tokens": len(ids), "skipped": True, "reason": reason})
            reporter.document_done(doc, skipped=True)
            continue
        label = label_generated if generate else label_document
        rows, keys, stats = label(backbone_model, doc, ids, params, progress=reporter.tokens)
        writer.write_document(doc.index, rows, keys, stats)
        tokens_this_run += len(ids)
        reporter.document_done(doc, skipped=False)
    elapsed = time.perf_counter() - started
    done = completed_documents(out)
    mine_done = {i: s for i, s in done.items() if i % shard[1] == shard[0]}
    missing = [d.index for d in mine if d.index not in mine_done]
    if missing:
        raise RuntimeError(f"internal error: documents {missing[:5]} not written")
    summary = _summarise(mine_done)
    if summary["documents"] == 0 and shard[1] == 1:  # shards: merge_shards judges the whole corpus
        longest = max(s["tokens"] for s in mine_done.values())
        if params.source == "generate":
            raise FmIndexError(f"no document was labelled: all {len(mine_done)} are empty (--source generate "
                               "continues each document). The labels stay incomplete")
        raise FmIndexError(f"no document was labelled: all {len(mine_done)} are shorter than 2 * tau = "
                           f"{2 * params.tau} tokens (the longest has {longest}"
                           + (f" after --max-tokens {params.max_tokens}" if params.max_tokens else "")
                           + "); lower --tau or give longer documents. The labels stay incomplete")
    summary["tokens_per_second"] = tokens_this_run / elapsed if elapsed > 0 and tokens_this_run else None
    write_json(manifest_path, {**header, "complete": True, "counts": summary, "versions": _versions()})
    return summary


def merge_shards(out: str | Path) -> dict:
    """Verify that the N ``--shard I/N`` runs in ``out`` are complete and consistent, then write manifest.json.

    Checks: every shard manifest is present and complete, all use the same backbone and parameters, every
    corpus document is finished exactly once. The merged directory then equals a single-process run.
    """
    out = Path(out)
    shard_files = sorted(out.glob("manifest.shard-*-of-*.json"))
    if not shard_files:
        raise ShardError(f"{out} holds no shard manifests (manifest.shard-I-of-N.json) to merge")
    manifests = [json.loads(p.read_text()) for p in shard_files]
    count = manifests[0]["shard"]["count"]
    seen = sorted(m["shard"]["index"] for m in manifests)
    if seen != list(range(count)) or any(m["shard"]["count"] != count for m in manifests):
        raise ShardError(f"shards present {seen} of {count}: run the missing --shard I/{count} first")
    for m, path in zip(manifests, shard_files):
        if not m.get("complete"):
            raise ShardError(f"{path.name} is unfinished: rerun that shard with --resume")
        for key in ("backbone", "params"):
            if m[key] != manifests[0][key]:
                raise ShardError(f"{path.name} was built with other {key} than {shard_files[0].name}")
    done = completed_documents(out)
    n_docs = manifests[0]["corpus"]["documents"]
    if sorted(done) != list(range(n_docs)):
        missing = sorted(set(range(n_docs)) - set(done))
        raise ShardError(f"documents missing after merge: {missing[:10]}")
    summary = _summarise(done)
    if summary["documents"] == 0:
        params = manifests[0]["params"]
        raise ShardError(f"no document was labelled in any shard: all {len(done)} are "
                         + ("empty" if params.get("source") == "generate" else
                            f"shorter than 2 * tau = {2 * params['tau']} tokens"))
    header = {k: manifests[0][k] for k in ("format", "backbone", "params", "memory_layers", "corpus")
              if k in manifests[0]}
    write_json(out / "manifest.json", {**header, "shard": {"index": 0, "count": 1}, "merged_from": count,
                                       "complete": True, "counts": summary, "versions": _versions()})
    return summary
