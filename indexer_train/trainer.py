"""`fm-index train`: the memory indexer trained as a dual encoder with ``SentenceTransformerTrainer``.

Backbone-free: everything comes from the label shards (trigger hidden states h_t0, golden entries, the frozen
compressed indexer keys K^IComp). Documents are split into train / held-out eval (never rows of one document on
both sides), deterministically from ``seed``. The HF/accelerate Trainer brings bf16, DDP under
``torchrun --nproc_per_node N``, checkpoints and resume; our parts are the batch sampler and collator
(:mod:`.collator`), the loss (:mod:`.loss`) and the evaluator (:mod:`.evaluator`).

Output directory::

    OUT/train_state.json    options, labels, split, status ("complete": false until the end), final metrics
    OUT/checkpoints/        Trainer checkpoints (``--resume`` continues from the last one)
    OUT/model/              the finished SentenceTransformer folder (written to a temp name, then renamed)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from lsa_runtime.errors import FmIndexError
from lsa_runtime.memory_indexer import MemoryIndexerConfig
from lsa_runtime.outputs import OutputLock, check_output_dir, remove_stale_temps, temp_path

from .collator import ROW_COLUMNS, DocumentBatchSampler, LabelRowCollator
from .dual_encoder import MODEL_SUBDIR, build_dual_encoder, key_side, query_tower
from .evaluator import MemoryIndexerEvaluator, evaluate_indexer
from .loss import MemoryIndexerLoss
from .shards import LabelShards, ShardError, write_json

STATE_NAME = "train_state.json"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainOptions:
    """Every option of ``fm-index train``; ``batch_size`` counts triggers (each brings one row per layer)."""

    layers: tuple[int, ...] | None = None
    rank: int = 2048
    heads: int | None = None  # query heads of the tower (default: the backbone's index heads; the release: 128)
    loss: str = "focal"
    gamma: float = 2.0
    alpha: float = 0.5
    epochs: float = 3.0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    bf16: bool = False
    eval_fraction: float = 0.1
    seed: int = 0
    threshold: float = 0.5
    chunk_size: int = 8192
    init: str = "random"  # or "native": start from the backbone's own indexer path (ablation; loads weights)
    model: str | None = None  # backbone to check the labels against (config only, unless init="native")
    save_steps: int | None = None  # default: once per epoch
    stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps, as if interrupted

    def check(self) -> "TrainOptions":
        if self.loss not in ("focal", "bce"):
            raise FmIndexError(f"--loss must be focal or bce, got '{self.loss}'")
        if self.init not in ("random", "native"):
            raise FmIndexError(f"--init must be random or native, got '{self.init}'")
        for name, value, ok, allowed in [
                ("--rank", self.rank, self.rank >= 1, ">= 1"), ("--epochs", self.epochs, self.epochs > 0, "> 0"),
                ("--heads", self.heads, self.heads is None or self.heads >= 1, ">= 1"),
                ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                ("--lr", self.lr, self.lr > 0, "> 0"), ("--gamma", self.gamma, self.gamma >= 0, ">= 0"),
                ("--alpha", self.alpha, self.alpha < 1, "< 1 (a negative value turns the weighting off)"),
                ("--eval-fraction", self.eval_fraction, 0 < self.eval_fraction < 1, "in (0, 1)"),
                ("--threshold", self.threshold, 0 < self.threshold < 1, "in (0, 1)"),
                ("--chunk-size", self.chunk_size, self.chunk_size >= 1, ">= 1")]:
            if not ok:
                raise FmIndexError(f"{name} must be {allowed}, got {value}")
        return self

    def identity(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        keep = ("layers", "rank", "heads", "loss", "gamma", "alpha", "epochs", "batch_size", "lr", "weight_decay", "bf16",
                "eval_fraction", "seed", "threshold", "init")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_shards(shards: LabelShards, layers) -> list[int]:
    """The requested layers (model layer ids, or ``"csa:I,J"`` CSA indices) must all be in the shards (rows and
    keys); every file must open. Returns the model layer ids."""
    have = [int(x) for x in shards.layers]
    if isinstance(layers, str):  # csa:... -> model layers, by the backbone's CSA list in the manifest
        csa = shards.manifest["backbone"]["csa_layers"]
        indices = [int(x) for x in layers[4:].split(",") if x.strip()]
        bad = [i for i in indices if not 0 <= i < len(csa)]
        if bad:
            raise ShardError(f"CSA index {bad[0]} does not exist: the labels' backbone has {len(csa)} CSA layers")
        layers = [csa[i] for i in indices]
    layers = sorted(int(x) for x in (layers or have))
    missing = [L for L in layers if L not in have]
    if missing:
        raise ShardError(f"layer(s) {missing} missing from the label shards in {shards.dir} (they hold layers {have}); "
                         "rebuild labels with those --layers or train on a subset of them")
    if not shards.documents:
        raise ShardError(f"no labelled documents in {shards.dir}")
    import pyarrow as pa

    for doc in shards.documents:
        path = shards.dir / "keys" / f"{doc:08d}.arrow"
        try:
            names = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.names
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"corrupt or missing keys file {path}: {exc}") from None
        absent = [L for L in layers if f"layer_{L}" not in names]
        if absent:
            raise ShardError(f"layer(s) {absent} missing from keys file {path}")
    rows = shards.rows()
    present = set(int(x) for x in set(rows["layer"]))
    absent = [L for L in layers if L not in present]
    if absent:
        raise ShardError(f"layer(s) {absent} have no label rows in {shards.dir}")
    return layers


def split_documents(documents: list[int], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out documents (never rows): a seeded permutation, round(fraction * n) documents (>= 1 if n >= 2)."""
    docs = sorted(documents)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(round(eval_fraction * len(docs)))
    if n_eval == 0 and len(docs) >= 2:
        n_eval = 1
    eval_docs = sorted(docs[i] for i in order[:n_eval])
    train_docs = sorted(docs[i] for i in order[n_eval:])
    if not eval_docs:
        raise FmIndexError(f"the eval split is empty ({len(docs)} labelled document(s), --eval-fraction "
                           f"{eval_fraction}); label more documents")
    if not train_docs:
        raise FmIndexError(f"the train split is empty ({len(docs)} labelled document(s), --eval-fraction "
                           f"{eval_fraction}); lower --eval-fraction or label more documents")
    return train_docs, eval_docs


def select_rows(shards: LabelShards, documents, layers):
    """The rows of ``documents`` at ``layers`` as a torch-formatted Dataset (no cache file in the labels dir)."""
    rows = shards.rows(documents)
    layer_col = rows["layer"]
    if set(int(x) for x in set(layer_col)) - set(layers):
        keep = [i for i, L in enumerate(layer_col) if int(L) in layers]
        rows = rows.select(keep, keep_in_memory=True)
    return rows.select_columns(ROW_COLUMNS).with_format("torch")


def training_distance(rows) -> int:
    """The longest trigger-to-entry distance in tokens that training on ``rows`` (:func:`select_rows`) shows the
    tower: the largest trigger position t0 among them (the first entry lies t0 tokens before it). Exported as
    ``trained_distance``, the distance cap ``"trained"`` of lsa_runtime."""
    positions = rows.with_format(None)["position"]
    return int(max(positions)) if len(positions) else 0


def read_state(out: Path) -> dict | None:
    path = out / STATE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FmIndexError(f"corrupt {path}") from None


def last_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in (out / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


class FmIndexTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` with our batch sampler and no auto model card (float rows cannot be
    rendered as text examples; sentence-transformers-fit.md, trap 4)."""

    def add_model_card_callback(self, *args, **kwargs) -> None:
        return None

    def create_model_card(self, *args, **kwargs) -> None:
        return None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, create_model_card=False)

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        # every batch is trained on: sentence-transformers asks for drop_last under DDP, which dropped the last
        # batches of each epoch there (12 batches on 2 ranks gave 5 steps, not the 6 steps_per_epoch counts);
        # accelerate's even_batches already pads the last step across ranks
        return DocumentBatchSampler(dataset, batch_size=batch_size, drop_last=False, seed=seed)


class _StopAfter(TrainerCallback):
    """Save a checkpoint and stop after ``steps`` optimizer steps (used to test --resume)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True
        return control


class _Reporter(TrainerCallback):
    """Forwards Trainer progress to a reporter with ``start(total)``, ``step(n, loss)``, ``evaluated(metrics)``."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.last_loss = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.reporter.start(state.max_steps, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.reporter.step(state.global_step, self.last_loss)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics:
            self.reporter.evaluated(state.epoch, metrics)


class TrainReporter:
    """Progress callbacks (the CLI draws them with rich); the default does nothing."""

    def start(self, total_steps: int, done: int) -> None: ...

    def step(self, step: int, loss: float | None) -> None: ...

    def evaluated(self, epoch: float, metrics: dict) -> None: ...


def train_memory_indexer(labels: str | Path, out: str | Path, options: TrainOptions, resume: bool = False,
                         reporter: TrainReporter | None = None) -> dict:
    """Train (or resume) a memory indexer on the label shards in ``labels``; returns the run summary: ``model``
    (path), ``complete``, ``steps``, and when complete ``metrics``, ``eval_table``, ``eval_documents``, plus
    ``report`` (the EvalReport) for a run finished now or ``already_complete`` for a finished run resumed."""
    options.check()
    reporter = reporter or TrainReporter()
    shards = LabelShards(labels)
    layers = check_shards(shards, options.layers)
    options.layers = tuple(layers)
    labels_hash = shards.config_hash
    if options.model is not None:
        from lsa_runtime.backbone import config_hash, load_config

        want = config_hash(load_config(options.model))
        if want != labels_hash:
            raise ShardError(f"the label shards in {labels} were built for another backbone (config {labels_hash}) "
                             f"than --model {options.model} ({want})")
    train_docs, eval_docs = split_documents(shards.documents, options.eval_fraction, options.seed)

    out = Path(out)
    check_output_dir(out)
    header = {"labels": str(Path(labels).resolve()), "labels_config_hash": labels_hash,
              "labels_definition": label_definition(shards.manifest),
              "options": options.identity(), "train_documents": train_docs, "eval_documents": eval_docs}
    if resume and read_state(out) is None:  # checked again under the lock; this keeps a wrong --out untouched
        raise FmIndexError(f"--resume: {out} holds no interrupted fm-index training run ({STATE_NAME} missing)")
    with OutputLock(out, "train") if is_main_process() else contextlib.nullcontext():
        state = _check_run_dir(out, header, resume)
        if is_main_process():
            remove_stale_temps(out)  # a model folder of an interrupted finish
        if state is not None and state.get("complete"):  # --resume of a finished run with the same options
            return {"model": str(out / MODEL_SUBDIR), "complete": True, "steps": state.get("steps"),
                    "metrics": state.get("metrics"), "eval_table": state.get("eval_table"),
                    "eval_documents": len(eval_docs), "already_complete": True}
        return _train(shards, labels, layers, options, out, header, train_docs, eval_docs, resume, reporter)


_DEFINITION = ("softmax_over", "source", "nucleus", "min_votes", "tau",  # the build-labels options that set the target
               "generate_trigger")


def label_definition(manifest: dict) -> dict:
    """How a label set was made, as far as training and evaluation must not mix them: the softmax's support
    (``topk`` or ``visible``), the labelled tokens (``document`` or ``generate``), the nucleus mass, the votes
    and tau, and for generated labels where the first trigger sits (``generate_trigger``). Manifests without the
    first two were made before those options existed: ``visible`` / ``document``; generated labels without the last
    were made with their first trigger at the first generated token."""
    params = manifest.get("params", {})
    source = params.get("source", "document")
    trigger = params.get("generate_trigger", "first_generated_token") if source == "generate" else None
    return {"softmax_over": params.get("softmax_over", "visible"), "source": source,
            "nucleus": params.get("nucleus"), "min_votes": params.get("min_votes"), "tau": params.get("tau"),
            "generate_trigger": trigger}


def check_same_definition(trained: dict | None, manifest: dict, what: str) -> None:
    """Refuse to evaluate (or continue training) an indexer on labels made another way than its training labels
    (any of the build-labels options in ``_DEFINITION`` that both records name)."""
    if not trained:
        return  # an indexer without a training record (e.g. imported): nothing to compare
    now = label_definition(manifest)
    for key in _DEFINITION:
        if trained.get(key) is not None and now[key] is not None and trained[key] != now[key]:
            flag = "--" + key.replace("_", "-") if key != "generate_trigger" else "the first trigger at the"
            raise FmIndexError(f"{what} was trained on labels built with {flag} {trained[key]}; these labels use "
                               f"{flag} {now[key]}: use labels built the same way")


def run_status(out: str | Path) -> str:
    """``"absent"`` (nothing there), ``"partial"`` (an interrupted run: ``--resume`` continues it) or
    ``"complete"`` (the model is written) for a train directory."""
    state = read_state(Path(out))
    if state is None:
        return "absent"
    return "complete" if state.get("complete") and (Path(out) / MODEL_SUBDIR).is_dir() else "partial"


def _check_run_dir(out: Path, header: dict, resume: bool) -> dict | None:
    """Refuse an output directory this run cannot write; returns the stored state of a run it continues."""
    state = read_state(out)
    if resume:
        if state is None:
            raise FmIndexError(f"--resume: {out} holds no interrupted fm-index training run ({STATE_NAME} missing)")
        if state.get("complete") and not (out / MODEL_SUBDIR).is_dir():
            raise FmIndexError(f"--resume: {out} says its run is complete but has no {MODEL_SUBDIR}/ folder; "
                               "train again into another --out")
        check_same_definition(state.get("labels_definition"), {"params": header["labels_definition"]},
                              f"--resume: the run in {out}")
        if state.get("labels_config_hash") != header["labels_config_hash"]:
            raise FmIndexError(f"--resume: {out} was trained on labels of another backbone (config hash "
                               f"{state.get('labels_config_hash')}, these labels: {header['labels_config_hash']})")
        for key, now in header["options"].items():
            was = state.get("options", {}).get(key)
            if was != json.loads(json.dumps(now)):
                raise FmIndexError(f"--resume: {out} was trained with --{key.replace('_', '-')} {was}, this run asks "
                                   f"for {now}; use the same options, or another --out")
        for key in ("train_documents", "eval_documents"):
            if state.get(key) != header[key]:
                raise FmIndexError(f"--resume: {out} was trained with another split of the labelled documents "
                                   f"(--labels {header['labels']} changed?); use the same --labels, or another --out")
    elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".fm-index")):
        raise FmIndexError(f"output directory {out} exists and is not empty; pass --resume to continue a run there "
                           "or choose another --out")
    return state


def _train(shards, labels, layers, options, out, header, train_docs, eval_docs, resume, reporter) -> dict:

    train_ds = select_rows(shards, train_docs, layers)
    cfg = MemoryIndexerConfig.from_label_manifest(shards.manifest, layers, rank=options.rank, heads=options.heads,
                                                  threshold=options.threshold)
    cfg = replace(cfg, trained_distance=training_distance(train_ds))
    torch.manual_seed(options.seed)
    indexer = None
    if options.init == "native":
        from lsa_runtime.memory_indexer import MemoryIndexer

        if options.model is None:
            raise FmIndexError("--init native needs --model (the backbone whose indexer weights to copy)")
        indexer = MemoryIndexer.init_from_checkpoint(options.model, cfg)  # its files only: no backbone loaded
    model = build_dual_encoder(cfg, indexer=indexer)
    key_side(model).attach(shards.keys)

    evaluator = MemoryIndexerEvaluator(shards, eval_docs, options.threshold, options.chunk_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sampler_batches = len(DocumentBatchSampler(train_ds, batch_size=options.batch_size))
    steps_per_epoch = max(1, -(-sampler_batches // world))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / CHECKPOINTS), num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
        learning_rate=options.lr, weight_decay=options.weight_decay, bf16=options.bf16, seed=options.seed,
        data_seed=options.seed, save_strategy="steps", save_steps=options.save_steps or steps_per_epoch,
        save_total_limit=2, eval_strategy="epoch", logging_steps=max(1, steps_per_epoch // 4),
        logging_first_step=True, report_to="none", remove_unused_columns=False, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False, dataloader_drop_last=False,
        prediction_loss_only=True,
    )
    _ = args.device  # under torchrun this sets up the process group: every rank has validated its inputs above
    _barrier()
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / STATE_NAME, {**header, "complete": False})
    _barrier()
    loss = MemoryIndexerLoss(model, loss=options.loss, gamma=options.gamma, alpha=options.alpha,
                             chunk_size=options.chunk_size)
    callbacks = [_Reporter(reporter)]
    if options.stop_after_steps:
        callbacks.append(_StopAfter(options.stop_after_steps))
    trainer = FmIndexTrainer(model=model, args=args, train_dataset=train_ds, loss=loss, evaluator=evaluator,
                             data_collator=LabelRowCollator(), callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress and metrics go through the reporter (rich in the CLI)
    checkpoint = last_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    tower = query_tower(trainer.model)
    summary = {"model": str(out / MODEL_SUBDIR), "complete": False, "steps": trainer.state.global_step}
    if options.stop_after_steps and trainer.state.global_step < trainer.state.max_steps:
        return summary  # interrupted on purpose: the checkpoint is on disk, the run stays unfinished
    if not is_main_process():
        return summary
    report = evaluate_indexer(tower.indexer, shards, eval_docs, options.threshold, options.chunk_size)
    metrics = report.flat()
    final = out / MODEL_SUBDIR
    tmp = temp_path(out / f".{MODEL_SUBDIR}")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp), create_model_card=False)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    history = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
    write_json(out / STATE_NAME, {**header, "complete": True, "steps": trainer.state.global_step,
                                  "metrics": metrics, "eval_table": report.table(), "eval_history": history})
    summary.update(complete=True, metrics=metrics, report=report, eval_table=report.table(),
                   eval_documents=report.documents)
    return summary

