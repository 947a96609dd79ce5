"""`fm-index`: build labels, train and export the FlashMemory memory indexer, and decode with LSA.

The pipeline, in the order a user runs it:

    fm-index build-labels  -> label shards (Arrow) from the frozen DeepSeek-V4 backbone
    fm-index train         -> the memory indexer (a sentence-transformers dual encoder)
    fm-index eval          -> precision / recall / retrieval ratio / coverage of a trained indexer
    fm-index export        -> model.safetensors + lsa_config.json for lsa_runtime
    fm-index generate      -> decode with lsa_runtime.Session (full or LSA) and print the footprint
    fm-index evaluate      -> RULER-style long-context accuracy vs KV footprint (full, LSA, controls)

This file only parses options, shows progress and turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import functools
import sys

import typer
import typer.core
from rich.console import Console

from lsa_runtime.errors import FmIndexError

# typer 0.29's rich help gives boolean flags a type column ("--resume <bool>"), as if they took a value
_display_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _display_type is not None:
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

app = typer.Typer(
    name="fm-index",
    help=__doc__.split("\n\n")[0] + "\n\nRun `fm-index COMMAND --help` for each command's options.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings are paragraphs: their line breaks are not kept
)
console = Console(stderr=True)
DEVICE_MAP_OPTION_HELP = ("Spread the backbone's layers over devices instead of --device (for a model larger than one "
                   "GPU): auto or balanced (over the GPUs), or DEVICE:FIRST-LAST,... with DEVICE a CUDA index, "
                   "cuda:N or cpu, e.g. 0:0-21,1:22-42 (two GPUs) or 0:0-33,cpu:34-42 (CPU offload: layers 34-42 "
                   "keep their weights in host memory and run on GPU 0, streamed at every step: slow, a last "
                   "resort). Run `fm-index plan` first to see what fits.")
POOL_STORAGE_HELP = ("How the CPU cold pool holds every CSA entry: model (the model's dtype, exact) or fp8 (e4m3 "
                     "with a scale per 64 values: about half the host memory of bf16; fetched entries carry e4m3 "
                     "rounding, docs/RESULTS.md measures the effect).")
KEEP_RECENT_HELP = ("lsa: the recency tail, the newest entries kept resident at every trigger (default: the "
                    "export's; exports made by fm-index set 4 x the backbone's top-k, the release's 2,048 on "
                    "V4-Flash).")
KEEP_FIRST_HELP = "lsa: the sink, the first entries kept resident at every trigger (default: the export's, 0)."
FETCH_TOP_HELP = ("lsa: a floor under the threshold, each memory layer's N best-scored entries fetched whatever "
                  "their score (default: the export's, 0 = the threshold alone, as the authors' release).")
FETCH_NEIGHBOURS_HELP = ("lsa: every entry the threshold or the floor selects brings the N entries on either side of "
                         "it (4N tokens each way), so a needle's value comes with its neighbours (default: the "
                         "export's, 0 = off as the authors' release; --page-size brings whole pages instead).")
PAGE_SIZE_HELP = ("lsa: page recall, as the release deploys it: fetch whole pages of N entries, the --max-pages "
                  "that hold the recency tail, the sink or the most selected entries (0, the default: single "
                  "entries). The release: 64 entries a page on V4-Flash.")
DISTANCE_CAP_HELP = ("lsa: score entries farther than N tokens from the trigger as if N away (the rotary part of "
                     "q . k at a distance the memory indexer was trained at), for contexts longer than its training "
                     "documents: give their length, or 'trained' for the longest distance in the export's training "
                     "labels (exports from fm-index train record it; default: off, as the authors' release).")
MAX_PAGES_HELP = ("lsa, with --page-size: how many pages stay resident at each trigger, tail and sink pages "
                  "included (the release: 96 at 256K on V4-Flash).")
PAGE_TIES_HELP = ("lsa, with --page-size: which of the pages holding equally many selected entries stay "
                  "resident: recent (the newer, the release's rule, the default) or score (the one whose best "
                  "entry has the higher memory-indexer score, then the newer).")
ENSEMBLE_HELP = ("lsa: how the memory layers' scores combine before the threshold: max (the OR rule) or mean "
                 "(default: the export's, max).")
_IN_PIPELINE = False  # set by `fm-index pipeline` while it runs its steps: the steps then print no next-step hints


@app.callback()
def _quiet_libraries():
    """Progress and warnings come from fm-index itself: the libraries' own bars ("Loading weights") and
    notices (e.g. the Trainer's checkpoint-ordering warning) are turned off for the command line."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def user_errors_exit_2(fn):
    """Print an FmIndexError (or a bad-parameter error) as one line on stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FmIndexError as exc:
            message = " ".join(str(exc).split())
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: completed work is kept; rerun with --resume to continue")
            sys.exit(130)

    return wrapper


# ---- build-labels -------------------------------------------------------------------------------------


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command("build-labels")
@user_errors_exit_2
def build_labels_command(
    corpus: str = typer.Option(..., "--corpus", help="JSONL ({'id','text'} or {'id','input_ids'}), Parquet, "
                               "or a saved Hugging Face dataset directory."),
    out: str = typer.Option(..., "--out", help="Output directory for the label shards."),
    model: str = typer.Option(None, "--model", help="Bundled model name (tiny, reference) or a DeepSeek-V4 "
                              "checkpoint directory. Default: reference (the bundled trained model; tiny is the "
                              "random one for fast tests)."),
    layers: str = typer.Option(None, "--layers", help="Memory-indexer layers: model layer ids (22,26,42) or CSA "
                               "indices as the authors' release numbers them (csa:10,12,20). Default: the model's own "
                               "choice where its folder names one (fm_index.json; the bundled reference: 2,4,6), "
                               "else CSA indices 10, 12, 20 of V4-Flash's 21 (model layers 22, 26, 42) and on other "
                               "backbones the CSA layers at the same positions in their CSA list."),
    tau: int = typer.Option(64, "--tau", help="Trigger period tau in tokens: one label row per tau tokens."),
    nucleus: float = typer.Option(0.6, "--nucleus", help="Nucleus mass p kept per token and CSA layer."),
    min_votes: int = typer.Option(3, "--min-votes", help="An entry is golden if in the nucleus at >= this "
                                  "many CSA layers."),
    softmax_over: str = typer.Option("topk", "--softmax-over", help="topk (the authors' release): the nucleus is "
                                     "taken over each layer's native top-k picks, softmax of their logits; visible: "
                                     "softmax over every visible entry (broader labels)."),
    source: str = typer.Option("document", "--source", help="document: label the corpus text itself (teacher "
                               "forcing); generate: label the backbone's own greedy continuation of each document, "
                               "as the authors' release labels its dumps (needs --new-tokens)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="With --source generate: tokens to generate and "
                                   "label after each document (at least --tau)."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Prefill chunk (tokens); bounds memory."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Optional crop of each document (default: none)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                               "cuda:LOCAL_RANK under torchrun)."),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_OPTION_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="Backbone dtype: float32, bfloat16 or float16."),
    shard: str = typer.Option(None, "--shard", help="I/N: label only documents with index % N == I "
                              "(default: torchrun's RANK/WORLD_SIZE if set). Then run merge-labels."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
):
    """Run the frozen backbone over a corpus and write FlashMemory training labels (Arrow shards).

    Per trigger (every tau tokens) and memory-indexer layer: the hidden state h_t0, the golden entries
    (nucleus p of each CSA layer's native top-k, voted over all CSA layers, united over the tau tokens after
    the trigger) and the native top-k union; per document, the compressed indexer keys.
    """
    import os

    from indexer_train.build_labels import LabelParams, Reporter, build_labels, parse_shard
    from lsa_runtime.backbone import default_model_name, load_config, parse_layers

    model = model or default_model_name()
    config = load_config(model)
    params = LabelParams(layers=tuple(parse_layers(layers, config, model)), tau=tau, nucleus=nucleus,
                         min_votes=min_votes, max_tokens=max_tokens, chunk_size=chunk_size, dtype=dtype,
                         softmax_over=softmax_over, source=source, new_tokens=new_tokens)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard_pair = parse_shard(shard) if shard or world == 1 else (int(os.environ.get("RANK", "0")), world)
    if device is not None and device_map is not None:
        raise FmIndexError("give --device or --device-map, not both")
    if device is None:
        device = _default_device()
        if device == "cuda" and world > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"

    progress = _progress()

    class RichReporter(Reporter):
        def start(self, n_documents):
            self.docs = progress.add_task("documents", total=n_documents, info="")
            self.toks = progress.add_task("tokens", total=1, info="")
            self.t0, self.n_tokens, self.base = __import__("time").perf_counter(), 0, 0

        def document(self, doc, n_tokens):
            progress.update(self.toks, total=max(n_tokens, 1), completed=0, info=doc.id[-40:])

        def tokens(self, n_done):
            progress.update(self.toks, completed=n_done)
            rate = (self.base + n_done) / max(__import__("time").perf_counter() - self.t0, 1e-9)
            progress.update(self.docs, info=f"{rate:,.0f} tok/s")

        def document_done(self, doc, skipped):
            task = progress.tasks[self.toks]
            if not skipped:
                self.base += int(task.total)
            progress.advance(self.docs)

    with progress:
        summary = build_labels(model, corpus, out, params, device=device, shard=shard_pair, resume=resume,
                               reporter=RichReporter(), device_map=device_map)
    _print_label_summary(summary, out)
    if shard_pair[1] > 1:
        console.print(f"shard {shard_pair[0]}/{shard_pair[1]} done; when all shards are done run "
                      f"[bold]fm-index merge-labels --out {out}[/]")


def _print_label_summary(summary: dict, out: str):
    from rich.table import Table

    table = Table(title=f"labels in {out}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    tps = summary.get("tokens_per_second")
    for what, value in [
        ("documents labelled", f"{summary['documents']:,}"),
        ("documents skipped (too short to label)", f"{summary['skipped']:,}"),
        ("tokens", f"{summary['tokens']:,}"),
        ("triggers", f"{summary['triggers']:,}"),
        ("label rows (triggers x memory layers)", f"{summary['rows']:,}"),
        ("visible entries per trigger", f"{summary['visible_mean']:.1f}"),
        ("positives per trigger before the vote", f"{summary['candidates_mean']:.1f}"),
        ("positives per trigger after the vote (golden)", f"{summary['positives_mean']:.1f}"),
        ("native top-k union per trigger", f"{summary['native_topk_mean']:.1f}"),
        ("tokens/s (this run)", f"{tps:,.0f}" if tps else "-"),
    ]:
        table.add_row(what, value)
    Console().print(table)


@app.command("merge-labels")
@user_errors_exit_2
def merge_labels_command(
    out: str = typer.Option(..., "--out", help="Directory that the --shard I/N runs wrote into."),
):
    """Verify the N `build-labels --shard I/N` runs in one directory and mark it complete (manifest.json)."""
    from indexer_train.build_labels import merge_shards

    summary = merge_shards(out)
    _print_label_summary(summary, out)
    console.print("verified: every document labelled exactly once, same backbone and parameters in all shards")



# ---- train / eval / export ------------------------------------------------------------------------------


def _print_eval_table(report_rows, title: str):
    """The held-out table: per layer, the OR-union, the recency / chance baselines at the union's ratio, and
    the union / recency / chance at the golden set's size (top-|G|)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("fetched set")
    for name in ("precision", "recall", "F1", "retrieval ratio", "native top-k coverage", "ranking AUC"):
        table.add_column(name, justify="right")
    for name, m in report_rows:
        table.add_row(name, *(f"{m[k]:.3f}" if m[k] is not None else "-"
                              for k in ("precision", "recall", "f1", "retrieval_ratio", "native_coverage", "auc")))
    Console().print(table)


@app.command("train")
@user_errors_exit_2
def train_command(
    labels: str = typer.Option(..., "--labels", help="Label shards written by fm-index build-labels."),
    out: str = typer.Option(..., "--out", help="Run directory: checkpoints, train_state.json, and the final "
                            "SentenceTransformer folder in OUT/model."),
    layers: str = typer.Option(None, "--layers", help="Memory-indexer layers to train: model layer ids or csa:I,J "
                               "(default: every layer in the labels)."),
    rank: int = typer.Option(2048, "--rank", help="Inner rank r of W_DQ (d -> r) and W_IUQ (r -> heads x head_dim)."),
    heads: int = typer.Option(None, "--heads", help="Query heads of the memory indexer (default: the backbone's "
                              "index heads, 64 on V4-Flash; the authors' release uses 128 with rank 2048)."),
    loss: str = typer.Option("focal", "--loss", help="focal (default, as the method found best) or bce."),
    gamma: float = typer.Option(2.0, "--gamma", help="Focal loss focusing parameter gamma."),
    alpha: float = typer.Option(0.5, "--alpha", help="Focal loss positive-class weight alpha (< 0: none). 0.5 "
                                "weighs golden and other entries alike; RetinaNet's 0.25 down-weights the golden "
                                "ones, which makes a weak indexer fetch almost nothing at threshold 0.5."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the training triggers."),
    batch_size: int = typer.Option(16, "--batch-size", help="Triggers per batch and device (each brings one "
                                   "row per memory layer); a document's triggers stay together."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (linear decay)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (GPU)."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Share of DOCUMENTS held out for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the initialisation and the batch order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last "
                                "checkpoint."),
    model: str = typer.Option(None, "--model", help="Optional backbone (bundled name or directory) the labels "
                              "must have been built from; only its config is read (and with --init native the "
                              "four native indexer tensors of each memory layer, straight from its files)."),
    init: str = typer.Option("random", "--init", help="random (default, the paper's text) or native: copy the "
                             "backbone's own q_a_proj / q_a_norm / indexer q_b_proj / weights_proj into the leading "
                             "rank and heads, the rest random, as the release initialises its retriever (needs "
                             "--model; --rank >= q_lora_rank, --heads >= the index heads)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Fetch threshold on I[t,s] used in evaluation."),
    chunk_size: int = typer.Option(8192, "--chunk-size", help="Entries scored at once (bounds memory)."),
):
    """Train the FlashMemory memory indexer (W_DQ, W_IUQ, W_w per layer) on label shards, backbone-free.

    A sentence-transformers dual encoder (query route: the gated query tower; document route: the frozen
    compressed indexer keys) trained with focal/BCE loss over every visible entry. Works under
    `torchrun --nproc_per_node N` unchanged. Prints the held-out table at the end.
    """
    from indexer_train.trainer import TrainOptions, TrainReporter, is_main_process, train_memory_indexer

    from lsa_runtime.backbone import parse_layer_list

    options = TrainOptions(layers=parse_layer_list(layers), rank=rank, heads=heads, loss=loss, gamma=gamma, alpha=alpha, epochs=epochs,
                           batch_size=batch_size, lr=lr, bf16=bf16, eval_fraction=eval_fraction, seed=seed,
                           threshold=threshold, chunk_size=chunk_size, init=init, model=model)
    progress = _progress()

    class RichReporter(TrainReporter):
        def start(self, total_steps, done):
            self.task = progress.add_task("training steps", total=total_steps, completed=done, info="")

        def step(self, step, loss_value):
            progress.update(self.task, completed=step, info=f"loss {loss_value:.4f}" if loss_value else "")

        def evaluated(self, epoch, metrics):
            get = lambda k: metrics.get(f"eval_{k}", float("nan"))  # noqa: E731
            progress.console.print(
                f"epoch {epoch:.2f} held-out: union F1 {get('union_f1'):.3f}  recall {get('union_recall'):.3f}  "
                f"precision {get('union_precision'):.3f}  ratio {get('union_retrieval_ratio'):.3f}  "
                f"native coverage {get('union_native_coverage'):.3f}  (recency F1 {get('recency_f1'):.3f})")

    with progress:
        summary = train_memory_indexer(labels, out, options, resume=resume,
                                       reporter=RichReporter() if is_main_process() else None)
    if summary.get("already_complete"):
        console.print(f"{out} already holds this finished run (same labels and options): nothing to train")
    if summary.get("complete"):
        _print_eval_table(summary["eval_table"], f"held-out documents ({summary['eval_documents']}), "
                          f"threshold {threshold}")
        console.print(f"model: [bold]{summary['model']}[/]" + ("" if _IN_PIPELINE else
                      f"; next: fm-index export --train-dir {out} --out EXPORT_DIR"))


@app.command("eval")
@user_errors_exit_2
def eval_command(
    indexer: str = typer.Option(..., "--indexer", help="A train --out directory, its model/ folder, an export, or "
                                "the authors' joint checkpoint (.pt; needs --model)."),
    labels: str = typer.Option(..., "--labels", help="Label shards to evaluate on (same backbone)."),
    model: str = typer.Option(None, "--model", help="The backbone, for an --indexer in the authors' .pt format."),
    documents: str = typer.Option("auto", "--documents", help="auto: the run's held-out documents when --labels "
                                  "are the ones it was trained on, else all; heldout; or all."),
    threshold: float = typer.Option(None, "--threshold", help="Fetch threshold (default: the indexer's, 0.5)."),
    chunk_size: int = typer.Option(8192, "--chunk-size", help="Entries scored at once (bounds memory)."),
):
    """Precision / recall / F1 against the golden labels, retrieval ratio and native top-k coverage, per layer
    and for the OR-union, next to recency and chance baselines at the same retrieval ratio."""
    from rich.progress import Progress

    from indexer_train.evaluator import choose_documents, evaluate_indexer
    from indexer_train.export import load_trained_indexer
    from indexer_train.shards import LabelShards, ShardError
    from indexer_train.trainer import check_same_definition, check_shards

    memory_indexer, state = load_trained_indexer(indexer, backbone=model, files_need="--model")
    shards = LabelShards(labels)
    if shards.config_hash != memory_indexer.config.backbone_config_hash:
        raise ShardError(f"the label shards in {labels} were built for another backbone (config "
                         f"{shards.config_hash}) than the indexer ({memory_indexer.config.backbone_config_hash})")
    check_same_definition((state or {}).get("labels_definition"), shards.manifest, f"the indexer {indexer}")
    check_shards(shards, memory_indexer.config.layers)
    docs, use_heldout = choose_documents(documents, state, shards)
    with Progress(console=console) as progress:
        task = progress.add_task("scoring documents", total=len(docs))
        report = evaluate_indexer(memory_indexer, shards, docs, threshold, chunk_size,
                                  progress=lambda n: progress.advance(task, n))
    which = "held-out" if use_heldout else "all"
    _print_eval_table(report.table(), f"{which} documents ({report.documents}), threshold "
                      f"{threshold if threshold is not None else memory_indexer.config.threshold}")


@app.command("import-dump")
@user_errors_exit_2
def import_dump_command(
    dump_dir: str = typer.Argument(..., help="Directory of the authors' doc_*.pkl label dumps (their SGLang fork, "
                                   "dump mode)."),
    out: str = typer.Option(..., "--out", help="Output directory for the label shards (as build-labels writes)."),
    model: str = typer.Option(..., "--model", help="The backbone the dumps came from (a DeepSeek-V4 checkpoint "
                              "directory; only its config is read)."),
    tau: int = typer.Option(64, "--tau", help="Trigger period tau in decode tokens (the release's label_interval)."),
    layers: str = typer.Option(None, "--layers", help="Layers to import: model layer ids or csa:I,J (default: every "
                               "layer in the dumps)."),
    nucleus: float = typer.Option(0.6, "--nucleus", help="The nucleus mass the dumps were made with (recorded)."),
    min_votes: int = typer.Option(3, "--min-votes", help="The vote the dumps were made with (recorded)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted import in --out."),
):
    """Convert the authors' label dumps into label shards for `fm-index train`.

    Each doc_*.pkl (read by a restricted unpickler: tensors only, anything else is refused) gives a row per
    trigger (every tau decode tokens) and layer: the hidden state, the union of the window's golden entries,
    and the document's index keys, dequantised from FP8 and rotated back from the Hadamard basis.
    """
    from indexer_train.release_dump import import_dumps

    progress = _progress()
    with progress:
        bar = progress.add_task("dumps", total=None, info="")
        summary = import_dumps(dump_dir, model, out, tau=tau, layers=layers, nucleus=nucleus, min_votes=min_votes,
                               resume=resume, progress=lambda done, total: progress.update(bar, completed=done,
                                                                                           total=total))
    _print_label_summary(summary, out)


@app.command("export")
@user_errors_exit_2
def export_command(
    train_dir: str = typer.Option(None, "--train-dir", help="Required: a finished `fm-index train --out` directory "
                                  "(or its model/ folder)."),
    out: str = typer.Option(..., "--out", help="Where to write: a new (or empty) directory for --format fm-index "
                            "(model.safetensors + lsa_config.json); a new .pt file for --format flashmemory."),
    model: str = typer.Option(None, "--model", hidden=True, help="Old name of --train-dir."),
    keep_recent: int = typer.Option(None, "--keep-recent", help="The resident set's recency tail written into the "
                                    "export (default: 4 x the backbone's native top-k, the release's 2,048 on "
                                    "V4-Flash)."),
    keep_first: int = typer.Option(None, "--keep-first", help="The resident set's sink (default 0)."),
    ensemble: str = typer.Option(None, "--ensemble", help="max (OR over layers, default) or mean."),
    fetch_top: int = typer.Option(None, "--fetch-top", help="Fetch each memory layer's N best-scored entries "
                                  "whatever their score, a floor under the threshold (default 0: the threshold "
                                  "alone, as the authors' release)."),
    fetch_neighbours: int = typer.Option(None, "--fetch-neighbours", help="Every entry the threshold or the floor "
                                         "selects brings the N entries on either side of it (default 0: off, as "
                                         "the authors' release; docs/RESULTS.md sections 11s-11u measure N = 1)."),
    target_recall: float = typer.Option(None, "--target-recall", help="Store the fetch threshold that keeps this "
                                        "share (0-1] of the golden entries on the training run's held-out "
                                        "documents, instead of the trained 0.5 (a focal-loss indexer often fetches "
                                        "too few entries at 0.5). Needs the run's labels."),
    fmt: str = typer.Option("fm-index", "--format", help="fm-index (a directory: model.safetensors + "
                               "lsa_config.json) or flashmemory (one .pt file: the authors' joint checkpoint, "
                               "retrievers.l{csa index}.*, loadable by their SGLang fork)."),
):
    """Write the trained memory indexer for lsa_runtime: model.safetensors (W_DQ, W_IUQ, W_w per layer) and
    lsa_config.json (layers, rank, heads, head_dim, rope, threshold, tau, backbone config hash, metrics); or, with
    --format flashmemory, the authors' joint checkpoint."""
    from indexer_train.export import check_export_inputs, export_indexer, export_release_checkpoint

    if fmt not in ("fm-index", "flashmemory"):
        raise FmIndexError(f"--format must be fm-index or flashmemory, got '{fmt}'")
    if fmt == "flashmemory":
        if (train_dir is None) == (model is None):
            raise FmIndexError("give --train-dir DIR (the output of fm-index train)")
        given = [flag for flag, value in (("--keep-recent", keep_recent), ("--keep-first", keep_first),
                                          ("--ensemble", ensemble), ("--fetch-top", fetch_top),
                                          ("--fetch-neighbours", fetch_neighbours), ("--target-recall", target_recall))
                 if value is not None]
        if given:
            raise FmIndexError(f"{given[0]} has no place in the authors' checkpoint (weights only); their server "
                               "sets the resident set's options itself")
        path = export_release_checkpoint(train_dir or model, out)
        console.print(f"exported to [bold]{path}[/] (the authors' joint-checkpoint format)")
        return

    if model is not None:
        console.print("[yellow]note:[/] `export --model` is now `export --train-dir` (everywhere else --model names "
                      "a backbone); the old name still works")
    if (train_dir is None) == (model is None):
        raise FmIndexError("give --train-dir DIR (the output of fm-index train)")
    resident = {"keep_recent": keep_recent, "keep_first": keep_first, "ensemble": ensemble, "fetch_top": fetch_top,
                "fetch_neighbours": fetch_neighbours}
    check_export_inputs(train_dir or model, out, target_recall)  # before the progress bar
    import json
    from pathlib import Path

    if target_recall is None:
        path = export_indexer(train_dir or model, out, resident=resident)
    else:
        from rich.progress import Progress

        with Progress(console=console) as progress:
            task = progress.add_task("scoring the held-out documents", total=None)
            path = export_indexer(train_dir or model, out, resident=resident, target_recall=target_recall,
                                  progress=lambda n: progress.advance(task, n))
        choice = json.loads((Path(path) / "lsa_config.json").read_text())["metrics"]["threshold_choice"]
        console.print(f"threshold {choice['threshold']:.4g}: recall {choice['recall']:.3f}, precision "
                      f"{choice['precision']:.3f}, retrieval ratio {choice['retrieval_ratio']:.4f} on "
                      f"{choice['triggers']} held-out triggers")
    distance = json.loads((Path(path) / "lsa_config.json").read_text()).get("trained_distance")
    if distance:  # what --distance-cap trained will use: contexts longer than this reach distances never trained at
        console.print(f"trained at distances up to {distance:,} tokens (--distance-cap trained caps there)")
    console.print(f"exported to [bold]{path}[/]; load with lsa_runtime.memory_indexer.MemoryIndexer.from_export")


# ---- generate -----------------------------------------------------------------------------------------


@app.command("generate")
@user_errors_exit_2
def generate_command(
    prompt: str = typer.Option(None, "--prompt", help="The prompt text."),
    prompt_file: str = typer.Option(None, "--prompt-file", help="Read the prompt from this UTF-8 text file."),
    model: str = typer.Option(None, "--model", help="Bundled model name (tiny, reference) or a DeepSeek-V4 "
                              "checkpoint directory. Default: reference (the bundled trained model; tiny is the "
                              "random one for fast tests)."),
    indexer: str = typer.Option(None, "--indexer", help="Memory indexer: an `fm-index export` directory or the "
                                "authors' checkpoint (.pt); needed by --mode lsa."),
    mode: str = typer.Option(None, "--mode", help="lsa (FlashMemory: memory indexer + cold pool), full (plain "
                             "DeepSeek-V4, the baseline), all (every entry resident), recent or random (--budget "
                             "entries), oracle (replays a full run's native picks: decodes twice), hisparse "
                             "(per-step top-k, --budget buffer entries per layer). Default: lsa with --indexer, "
                             "else full."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    tau: int = typer.Option(None, "--tau", help="Decode steps between triggers (default: the export's, else 64)."),
    prefetch_steps: int = typer.Option(0, "--prefetch-steps", help="Prepare each trigger after the first this many "
                                       "decode steps before its window, on a helper thread (the static step: on a side "
                                       "CUDA stream while the next step runs; Session(prefetch_steps=); 0: at the "
                                       "window boundary)."),
    threshold: float = typer.Option(None, "--threshold", help="Memory-indexer score an entry needs to be fetched, "
                                    "in (0, 1) (default: the export's, else 0.5)."),
    budget: int = typer.Option(None, "--budget", "--max-resident", help="Resident CSA entries per trigger (lsa: "
                               "a cap keeping the highest-scoring; recent/random: the set's size) or buffer entries "
                               "per CSA layer (hisparse)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (and the random policy's)."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Prefill chunk in tokens; bounds prefill memory."),
    memory_keys: str = typer.Option("device", "--memory-keys", help="Where the memory layers' indexer keys of "
                                    "every entry live between triggers: device (resident, fastest trigger) or pool "
                                    "(CPU cold pool, streamed to the device at each trigger: less device memory)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_OPTION_HELP),
    dtype: str = typer.Option(None, "--dtype", help="Backbone dtype: float32, bfloat16 or float16 (default: "
                              "float32 on CPU, the checkpoint's on a GPU)."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Generate from the start token alone (no "
                                       "--prompt); an empty prompt is refused otherwise."),
    keep_recent: int = typer.Option(None, "--keep-recent", help=KEEP_RECENT_HELP),
    keep_first: int = typer.Option(None, "--keep-first", help=KEEP_FIRST_HELP),
    ensemble: str = typer.Option(None, "--ensemble", help=ENSEMBLE_HELP),
    fetch_top: int = typer.Option(None, "--fetch-top", help=FETCH_TOP_HELP),
    fetch_neighbours: int = typer.Option(None, "--fetch-neighbours", help=FETCH_NEIGHBOURS_HELP),
    page_size: int = typer.Option(0, "--page-size", help=PAGE_SIZE_HELP),
    max_pages: int = typer.Option(0, "--max-pages", help=MAX_PAGES_HELP),
    page_ties: str = typer.Option("recent", "--page-ties", help=PAGE_TIES_HELP),
    distance_cap: str = typer.Option(None, "--distance-cap", metavar="N|trained", help=DISTANCE_CAP_HELP),
    pool_storage: str = typer.Option("model", "--pool-storage", help=POOL_STORAGE_HELP),
    static_decode: bool = typer.Option(None, "--static-decode/--stock-decode", help="Decode through the "
                                       "static-shape step (fixed-size stores; on a GPU the whole step replays as "
                                       "one CUDA graph; in the trigger modes budget + tau/4 + 2 resident slots per "
                                       "sequence) or the per-sequence path (transformers' own decode, the "
                                       "numerical reference). Default: static on one GPU in mode full and in "
                                       "the trigger modes given a --budget (it bounds the slots)."),
    static_compile: bool = typer.Option(False, "--static-compile", help="With the static step: compile its "
                                        "decoder layers (about 3x faster steps on an H200; the first call of each "
                                        "batch size and capacity bucket compiles for 25-99 s)."),
):
    """Generate text with DeepSeek-V4, full or with Lookahead Sparse Attention, and print the KV footprint.

    The text goes to stdout, then a table: device bytes held by kind (sliding windows, HCA entries, resident
    CSA entries, memory-indexer keys) against what full decoding holds for the same tokens, the footprint
    ratio, triggers, entries fetched from the CPU cold pool and tokens/s.
    """
    from pathlib import Path

    from lsa_runtime.backbone import default_model_name
    from lsa_runtime.session import Session, SessionConfig

    if unconditional and (prompt is not None or prompt_file is not None):
        raise FmIndexError("--unconditional generates without a prompt: give it or --prompt / --prompt-file, not "
                           "both")
    if unconditional:
        prompt = ""
    if (prompt is None) == (prompt_file is None):
        raise FmIndexError("give exactly one of --prompt TEXT or --prompt-file FILE (or --unconditional)")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FmIndexError(f"cannot read --prompt-file {prompt_file}: {exc}") from None
    config = SessionConfig(mode=mode or ("lsa" if indexer else "full"), tau=tau, threshold=threshold, budget=budget,
                           chunk_size=chunk_size, seed=seed, memory_keys=memory_keys, prefetch_steps=prefetch_steps,
                           keep_recent=keep_recent, keep_first=keep_first, ensemble=ensemble, fetch_top=fetch_top,
                           fetch_neighbours=fetch_neighbours, page_size=page_size, max_pages=max_pages,
                           distance_cap=distance_cap, page_ties=page_ties, pool_storage=pool_storage,
                           static_decode=static_decode, static_compile=static_compile)
    if device is not None and device_map is not None:
        raise FmIndexError("give --device or --device-map, not both")
    session = Session.from_pretrained(model or default_model_name(), indexer=indexer, config=config,
                                      device=None if device_map else device or _default_device(), dtype=dtype,
                                      device_map=device_map)
    out = Console()
    for piece in session.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, unconditional=unconditional):
        out.print(piece.text, end="", highlight=False, markup=False, soft_wrap=True)
    out.print()
    out.print(session.stats.table())



# ---- evaluate -----------------------------------------------------------------------------------------


@app.command("evaluate")
@user_errors_exit_2
def evaluate_command(
    model: str = typer.Option(None, "--model", help="Bundled model name (tiny, reference) or a DeepSeek-V4 "
                              "checkpoint directory. Default: reference (the bundled trained model; tiny is the "
                              "random one for fast tests)."),
    indexer: str = typer.Option(None, "--indexer", help="Memory indexer: an `fm-index export` directory or the "
                                "authors' checkpoint (.pt); needed by mode lsa."),
    modes: str = typer.Option(None, "--modes",
                              help="Comma-separated modes: full, lsa, recent, random, oracle, hisparse. In each "
                              "task and length, lsa runs first and its mean resident entries per trigger become "
                              "the budget of recent/random/oracle (and hisparse's buffer). Default: all six with "
                              "--indexer, else full."),
    tasks: str = typer.Option("all", "--tasks", help="Comma-separated RULER-style tasks, or 'all': "
                              "niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, "
                              "fwe, context_independent; or varied (the varied_* needle formats of `fm-index make-corpus`, seen and held "
                              "out, reported apart; not part of 'all')."),
    lengths: str = typer.Option("2048,4096", "--lengths", help="Prompt lengths in tokens of the model's "
                                "tokenizer, comma-separated (2048,4096 or 2k,4k)."),
    samples: int = typer.Option(4, "--samples", help="Prompts per task and length (needle depths spread evenly)."),
    prompts: str = typer.Option(None, "--prompts", help="Decode only these of each cell's --samples prompts, by "
                                "index from 0: 11-19 or 0,3,7-9 (the prompts are the same as in a run of all: "
                                "with --resume, completes an evaluation in pieces). Default: all."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Tokens to generate per prompt (default: "
                                       "each task's own, as RULER: 32-120)."),
    out: str = typer.Option("evaluation", "--out", help="Results directory: results.json, results.md, plots."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts (and of the random mode)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_OPTION_HELP),
    dtype: str = typer.Option(None, "--dtype", help="Backbone dtype: float32, bfloat16 or float16 (default: "
                              "float32 on CPU, the checkpoint's dtype on a GPU)."),
    budget: int = typer.Option(None, "--budget", help="Resident entries for recent/random/oracle when lsa is not "
                               "among --modes."),
    tau: int = typer.Option(None, "--tau", help="Decode steps between triggers (default: the export's, else 64)."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Prefill chunk in tokens (chunks shrink as the "
                                   "context grows, to bound memory); larger chunks launch fewer kernels."),
    prefetch_steps: int = typer.Option(0, "--prefetch-steps", help="Prepare each trigger after the first this many "
                                       "decode steps before its window, on a helper thread (the static step: on a side "
                                       "CUDA stream while the next step runs; Session(prefetch_steps=); 0: at the "
                                       "window boundary)."),
    threshold: float = typer.Option(None, "--threshold", help="Memory-indexer score threshold (default: the "
                                    "export's, else 0.5)."),
    haystack: str = typer.Option(None, "--haystack-packages", help="Held-out stdlib packages whose code fills "
                                 "the haystacks (default: email,json,http,wsgiref,xmlrpc)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted evaluation in --out."),
    workers: int = typer.Option(1, "--workers", help="Decode in this many processes on the same device (cells of "
                                "task x length are shared out; with fewer cells than workers, each cell's prompts). "
                                "A small model decodes bound by host time, so 2-8 workers speed it up on a GPU or a "
                                "many-core CPU."),
    batch: int = typer.Option(1, "--batch", help="Decode up to this many prompts of a task, length and mode "
                              "together, one backbone forward per step (each keeps its own cache, cold pool and "
                              "resident set; greedy tokens as decoded alone). Pays off on a GPU, where a step "
                              "reads all weights whatever the batch."),
    keep_recent: int = typer.Option(None, "--keep-recent", help=KEEP_RECENT_HELP),
    keep_first: int = typer.Option(None, "--keep-first", help=KEEP_FIRST_HELP),
    ensemble: str = typer.Option(None, "--ensemble", help=ENSEMBLE_HELP),
    fetch_top: int = typer.Option(None, "--fetch-top", help=FETCH_TOP_HELP),
    fetch_neighbours: int = typer.Option(None, "--fetch-neighbours", help=FETCH_NEIGHBOURS_HELP),
    page_size: int = typer.Option(0, "--page-size", help=PAGE_SIZE_HELP),
    max_pages: int = typer.Option(0, "--max-pages", help=MAX_PAGES_HELP),
    page_ties: str = typer.Option("recent", "--page-ties", help=PAGE_TIES_HELP),
    distance_cap: str = typer.Option(None, "--distance-cap", metavar="N|trained", help=DISTANCE_CAP_HELP),
    pool_storage: str = typer.Option("model", "--pool-storage", help=POOL_STORAGE_HELP),
    attention: str = typer.Option("eager", "--attention", help="The backbone's attention in every forward: eager "
                                  "(transformers' own, the reference) or window (the same attention computed "
                                  "without the dense query x key matrix: the sliding window in blocks, the CSA "
                                  "picks gathered; equal to eager up to float round-off, prefill 4.5x faster at "
                                  "16K on a CPU). window needs --batch 1."),
    static_decode: bool = typer.Option(None, "--static-decode/--stock-decode", help="Decode through the "
                                       "static-shape step (fixed-size stores; on a GPU one CUDA graph per batch; "
                                       "every mode but hisparse) or the per-sequence path. Default: static on one "
                                       "GPU in mode full and the budgeted modes (recent, random, oracle; lsa has "
                                       "no budget). The oracle's recording runs always decode stock."),
    static_compile: bool = typer.Option(False, "--static-compile", help="Decode the runs of mode full and of "
                                        "the budgeted modes (recent, random, oracle; not hisparse, not the "
                                        "oracle's recording runs, not lsa without a budget) through the static "
                                        "step with its decoder layers compiled (about 3x faster steps on an H200; "
                                        "each new batch size and capacity bucket compiles first, 25-99 s)."),
):
    """Long-context evaluation (RULER-style, offline): accuracy vs KV footprint of full, LSA and control modes.

    Generates seeded needle-in-a-haystack, variable-tracking, word-extraction and context-independent prompts
    at each length, decodes them greedily with lsa_runtime.Session in every mode, scores them with RULER's
    string match and writes every run (results.json), a markdown table (results.md) and plots to --out.
    """
    from fm_eval.runner import EvalConfig, Reporter, evaluate
    from fm_eval.tasks import DEFAULT_HAYSTACK_PACKAGES
    from lsa_runtime.backbone import default_model_name

    packages = tuple(p.strip() for p in haystack.split(",") if p.strip()) if haystack else DEFAULT_HAYSTACK_PACKAGES
    if device is not None and device_map is not None:
        raise FmIndexError("give --device or --device-map, not both")
    config = EvalConfig(
        model=model or default_model_name(), modes=modes or ("full,lsa,hisparse,recent,random,oracle" if indexer
                                                             else "full"),
        tasks=tasks, lengths=lengths, samples=samples, prompts=prompts, indexer=indexer,
        max_new_tokens=max_new_tokens, seed=seed, device=device or _default_device(), device_map=device_map,
        dtype=dtype, haystack_packages=packages, tau=tau, threshold=threshold,
        budget=budget, chunk_size=chunk_size, prefetch_steps=prefetch_steps, keep_recent=keep_recent,
        keep_first=keep_first, ensemble=ensemble, fetch_top=fetch_top, fetch_neighbours=fetch_neighbours,
        page_size=page_size, max_pages=max_pages, distance_cap=distance_cap, page_ties=page_ties,
        pool_storage=pool_storage, attention=attention).check()
    for flag, value in (("--workers", workers), ("--batch", batch)):  # before the progress bar
        if value < 1:
            raise FmIndexError(f"{flag} must be an integer >= 1, got {value}")
    if static_compile and static_decode is False:
        raise FmIndexError("--static-compile compiles the static step: it cannot go with --stock-decode")
    progress = _progress()

    class RichReporter(Reporter):
        def start(self, total_runs, done=0):  # runs finished before a --resume: not part of the speed estimate
            self.bar = progress.add_task("runs", total=total_runs, completed=done, info="")

        def phase(self, text):
            progress.update(self.bar, info=text)

        def run_done(self, record):
            progress.advance(self.bar)

    with progress:
        results = evaluate(config, out, resume=resume, reporter=RichReporter(), workers=workers, batch=batch,
                           static_decode=static_decode, static_compile=static_compile)
    _print_evaluation(results, out)


def _print_evaluation(results: dict, out: str):
    from rich.table import Table

    from fm_eval.intervals import format_interval

    table = Table(title=f"evaluation in {out} (accuracy % averaged over tasks)")
    for column in ("mode", "length", "accuracy % [95%]", "vs full [95%]", "CSA-KV ratio", "total KV ratio",
                   "MiB moved / sample", "decode tok/s"):
        table.add_column(column, justify="left" if column == "mode" else "right")

    def interval(iv):  # the 95% interval of fm_eval.intervals, after the value it bounds
        return f" {format_interval(iv)}" if iv else ""

    for row in results["summary"]["modes"]:
        moved = row["bytes_moved"]
        tps = row["decode_tokens_per_second"]
        vs = row.get("vs_full") or {}
        table.add_row(row["mode"], f"{row['length']:,}",
                      f"{row['accuracy']:.1f}{interval(row.get('accuracy_interval'))}",
                      f"{vs['difference']:+.1f}{interval(vs.get('interval'))}" if vs.get("difference") is not None
                      else "-",
                      f"{row['csa_kv_ratio']:.3f}" if row.get("csa_kv_ratio") is not None else "-",
                      f"{row['footprint_ratio']:.3f}" if row["footprint_ratio"] is not None else "-",
                      f"{moved / 1024 / 1024:,.2f}" if moved is not None else "-",
                      f"{tps:,.1f}" if tps else "-")
    Console().print(table)
    console.print(f"wrote {out}/results.json, {out}/results.md, {out}/accuracy_vs_footprint.png, "
                  f"{out}/footprint_vs_length.png")


# ---- plan: memory from the config alone ----------------------------------------------------------------


@app.command("plan")
@user_errors_exit_2
def plan_command(
    model: str = typer.Option("deepseek-v4-flash", "--model", help="A DeepSeek-V4 checkpoint directory (only its "
                              "config.json is read), a bundled model (tiny, reference), or deepseek-v4-flash: the "
                              "published V4-Flash config, built in (the default)."),
    context: str = typer.Option("128K,512K,1M", "--context", help="Context lengths to plan for, comma-separated "
                                "tokens (K = 1,024, M = 1,048,576): 128K,512K,1M. Every sequence is counted at this "
                                "length (prompt + generated)."),
    gpus: int = typer.Option(None, "--gpus", help="Number of GPUs (default 1; needs --gpu-memory). The weights are "
                             "assumed split evenly over them (expert parallel / device_map)."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="Memory of each GPU, e.g. 96GiB or 141GB (GB = 10^9 "
                                   "bytes, GiB = 2^30). Gives the concurrency table; without it the plan stops at "
                                   "bytes per sequence."),
    host_memory: str = typer.Option(None, "--host-memory", help="Host memory the LSA cold pools may pin, e.g. "
                                    "2TiB: caps LSA's concurrency (default: not checked)."),
    reserve: str = typer.Option("10%", "--reserve", help="Kept free on each GPU for activations, the CUDA context "
                                "and prefill workspace: a share of its memory (10%) or a size (8GiB)."),
    kv_placement: str = typer.Option("split", "--kv-placement", help="split: each GPU holds the KV of its own "
                                     "layers (transformers' device_map), so KV room adds up over the GPUs; "
                                     "replicated: every GPU holds all of it (tensor parallel with V4's single KV "
                                     "head, as the authors' SGLang TP8)."),
    kv_dtype: str = typer.Option("bfloat16", "--kv-dtype", help="dtype the backbone runs in, hence of its KV state: "
                                 "bfloat16, float16 or float32."),
    resident_fraction: float = typer.Option(0.135, "--resident-fraction", help="LSA: share of the entries older "
                                            "than the recency tail that stay resident on the GPU (default 0.135, "
                                            "the paper's 13.5% CSA-KV ratio)."),
    keep_recent: int = typer.Option(None, "--keep-recent", help="LSA: the recency tail in CSA entries, always "
                                    "resident (default 4 x the model's index top-k: the release's 2,048 on "
                                    "V4-Flash)."),
    memory_layers: int = typer.Option(None, "--memory-layers", help="LSA: number of memory-indexer layers (default "
                                      "the method's 3)."),
    memory_keys: str = typer.Option("device", "--memory-keys", help="LSA: where the memory layers' indexer keys of "
                                    "every entry live: device (counted per sequence) or pool (streamed at each "
                                    "trigger)."),
    tau: int = typer.Option(64, "--tau", help="LSA: decode steps between triggers (room for the entries born "
                            "meanwhile is kept resident)."),
    pool_storage: str = typer.Option("model", "--pool-storage", help="LSA: how the cold pool holds entries on the "
                                     "host: model (the KV dtype) or fp8 (e4m3 + a scale per 64 values, Session("
                                     "pool_storage='fp8'))."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout instead of tables."),
):
    """Plan GPU and host memory for full and LSA decoding from the model's config alone (no weights are read).

    Prints the weights by tensor group (FP8/FP4 storage as the checkpoint's quantization_config says), the state
    one sequence holds at each --context (sliding windows, open compression windows, HCA entries, CSA compressed
    KV, indexer keys, memory-indexer keys) in full decoding and in LSA with the given resident fraction, the
    pinned host pool LSA needs per sequence, and with --gpu-memory how many sequences each mode fits and what
    limits them. Example: fm-index plan --context 256K --gpus 8 --gpu-memory 96GB --kv-placement replicated.
    """
    import json

    from lsa_runtime.memory_plan import (
        Hardware,
        LSASettings,
        PlanError,
        load_plan_config,
        parse_contexts,
        parse_reserve,
        parse_size,
        plan_memory,
    )

    hardware = None
    if gpu_memory is None:
        given = [flag for flag, value in (("--gpus", gpus), ("--host-memory", host_memory)) if value is not None]
        if given:
            raise PlanError(f"{given[0]} needs --gpu-memory (the memory of each GPU, e.g. 96GiB)")
    else:
        fraction, reserve_bytes = parse_reserve(reserve)
        hardware = Hardware(gpus=1 if gpus is None else gpus, gpu_memory=parse_size(gpu_memory, "--gpu-memory"),
                            reserve_fraction=fraction, reserve_bytes=reserve_bytes, kv_placement=kv_placement,
                            host_memory=parse_size(host_memory, "--host-memory") if host_memory else None)
    settings = LSASettings(resident_fraction=resident_fraction, keep_recent=keep_recent,
                           memory_layers=memory_layers, memory_keys=memory_keys, tau=tau,
                           pool_storage=pool_storage)
    contexts = parse_contexts(context)
    plan = plan_memory(load_plan_config(model), contexts, hardware, settings, kv_dtype, model=model)
    if as_json:
        print(json.dumps(plan.as_dict(), indent=2))
        return
    out = Console()
    for table in plan.tables():
        out.print(table)


# ---- pipeline: the whole method in one command (the main job) -------------------------------------


@app.command("pipeline")
@user_errors_exit_2
def pipeline_command(
    out: str = typer.Option("runs/demo", "--out", help="Run directory: labels/, train/, export/, evaluation/."),
    model: str = typer.Option(None, "--model", help="Bundled model name (tiny, reference) or a DeepSeek-V4 "
                              "checkpoint directory. Default: reference."),
    corpus: str = typer.Option(None, "--corpus", help="Training corpus (default: the bundled sample, 12 stdlib "
                               "modules)."),
    tau: int = typer.Option(64, "--tau", help="Trigger period tau (labels and decoding)."),
    nucleus: float = typer.Option(0.6, "--nucleus", help="Nucleus mass p of the labels (the method's 0.6, over "
                                  "each CSA layer's native top-k as the authors' release takes it)."),
    epochs: float = typer.Option(6.0, "--epochs", help="Training epochs."),
    eval_fraction: float = typer.Option(0.25, "--eval-fraction", help="Share of documents held out for the "
                                        "indexer's evaluation (the sample corpus has 12)."),
    rank: int = typer.Option(256, "--rank", help="Inner rank r of the memory indexer (2048 at Flash scale)."),
    lengths: str = typer.Option("1024,2048", "--lengths", help="Evaluation prompt lengths in tokens."),
    tasks: str = typer.Option("niah_single_1,niah_multikey_1,vt", "--tasks", help="Evaluation tasks."),
    samples: int = typer.Option(2, "--samples", help="Evaluation prompts per task and length."),
    keep_recent: int = typer.Option(32, "--keep-recent", help="The resident set's recency tail in entries, written "
                                    "into the export. The release keeps 4 x its native top-k (2,048 entries = 8,192 "
                                    "tokens on V4-Flash). Scaled the same way, the reference model's tail would be "
                                    "256 entries (1,024 tokens) and would hold every entry at this demo's 1K-2K "
                                    "tokens; the demo keeps 32 (128 tokens, one sliding window)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda ... (default: cuda if available)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted pipeline run in --out."),
):
    """Run the whole method on a bundled backbone: build-labels -> train -> export -> a short evaluate.

    Each step is the command of the same name. With --resume each step continues where it stopped: a finished
    step is checked (same options) and skipped, an interrupted one is resumed, a missing one is started. Ends
    with the footprint / accuracy table of full, LSA and recency decoding at the same resident budget.
    """
    from pathlib import Path

    from indexer_train.trainer import run_status
    from lsa_runtime.backbone import DATA_DIR, default_model_name
    from lsa_runtime.outputs import OutputLock, check_output_dir

    global _IN_PIPELINE
    model = model or default_model_name()
    corpus = corpus or str(DATA_DIR / "sample" / "corpus.jsonl")
    run = Path(out)
    check_output_dir(run)
    device = device or _default_device()
    again = ["--resume"] if resume else []
    steps = [
        ("1/4 build-labels", ["build-labels", "--model", model, "--corpus", corpus, "--out", str(run / "labels"),
                              "--tau", str(tau), "--nucleus", str(nucleus), "--device", device, *again]),
        ("2/4 train", ["train", "--labels", str(run / "labels"), "--out", str(run / "train"), "--rank", str(rank),
                       "--epochs", str(epochs), "--eval-fraction", str(eval_fraction), "--model", model]),
        ("3/4 export", ["export", "--train-dir", str(run / "train"), "--out", str(run / "export"),
                        "--keep-recent", str(keep_recent)]),
        ("4/4 evaluate", ["evaluate", "--model", model, "--indexer", str(run / "export"), "--modes",
                          "full,lsa,recent", "--tasks", tasks, "--lengths", lengths, "--samples", str(samples),
                          "--tau", str(tau), "--device", device, "--out", str(run / "evaluation"), *again]),
    ]
    command = typer.main.get_command(app)
    with OutputLock(run, "pipeline"):
        if not resume and any(p for p in run.iterdir() if not p.name.startswith(".fm-index")):
            raise FmIndexError(f"{run} already holds a pipeline run; pass --resume to continue (or re-check) it, "
                               "or choose another --out")
        _IN_PIPELINE = True
        try:
            for title, argv in steps:
                if title.endswith("export") and (run / "export" / "lsa_config.json").is_file():
                    _check_pipeline_export(run / "export", keep_recent)
                    console.rule(f"[bold]{title}[/]: already done ({run / 'export'})")
                    continue
                if title.endswith("train") and resume and run_status(run / "train") != "absent":
                    argv = [*argv, "--resume"]  # train --resume needs a run to continue; the others start if absent
                console.rule(f"[bold]{title}[/]: fm-index {' '.join(argv)}")
                try:
                    command.main(argv, prog_name="fm-index", standalone_mode=False)
                except SystemExit as exc:
                    if exc.code:
                        raise
        finally:
            _IN_PIPELINE = False
    console.print(f"done: {run}/evaluation/results.md holds the table; plots beside it")


def _check_pipeline_export(export, keep_recent: int) -> None:
    """A finished export step of a resumed pipeline must have the options asked for now."""
    import json

    written = json.loads((export / "lsa_config.json").read_text()).get("keep_recent")
    if written != keep_recent:
        raise FmIndexError(f"--resume: {export} was exported with --keep-recent {written}, this run asks for "
                           f"{keep_recent}; use the same value, or another --out")


# ---- make-corpus: varied needle prompts for training (fm_eval.varied) ------------------------------------


@app.command("make-corpus")
@user_errors_exit_2
def make_corpus_command(
    out: str = typer.Option(..., "--out", help="The corpus to write (.jsonl); a card (.json: options, split, "
                            "counts) is written beside it."),
    model: str = typer.Option(None, "--model", help="Backbone whose tokenizer sizes the prompts (bundled name or "
                              "directory). Default: reference."),
    lengths: str = typer.Option("2048,3072,4096", "--lengths", help="Prompt lengths in tokens, comma-separated "
                                "(2048,4096 or 2k,4k)."),
    per_format: int = typer.Option(16, "--per-format", help="Prompts per task kind, seen needle format and length "
                                   "(haystack and question cycle over the seen combinations)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts (keys, values, depths, haystacks)."),
    haystack: str = typer.Option(None, "--haystack-packages", help="Stdlib packages whose code fills the code "
                                 "haystacks (default: email,json,http,wsgiref,xmlrpc)."),
    kinds: str = typer.Option("single", "--kinds", help="Task kinds, comma-separated: single (one needle), multikey "
                              "(4 keys, 1 asked), multivalue (1 key, 4 values asked), vt (variable tracking). "
                              "multiquery is held out of training (evaluate it with --tasks varied_multiquery)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Write a training corpus of varied needle prompts (JSONL) for `build-labels --source generate`.

    Prompts over the SEEN values of fm_eval.varied's split only: needle formats kv_sentence, note, table_row,
    log_line; haystacks code, wordlist, logs, chat; questions direct, indirect, follow_up; task kinds as --kinds
    (default: single needles only, as corpora written before --kinds). The held-out format (chat_turn), haystack
    (prose), question (what_was) and kind (multiquery) never appear; `fm-index evaluate --tasks varied` measures
    seen and held-out combinations separately. Offline and seeded: every text is generated or read from this
    Python's standard library.
    """
    from fm_eval.runner import parse_lengths
    from fm_eval.tasks import DEFAULT_HAYSTACK_PACKAGES
    from fm_eval.varied import (
        check_corpus_options,
        check_corpus_out,
        check_kinds,
        corpus_plan,
        load_tokenizer,
        write_corpus,
    )
    from lsa_runtime.backbone import default_model_name

    packages = tuple(p.strip() for p in haystack.split(",") if p.strip()) if haystack else DEFAULT_HAYSTACK_PACKAGES
    check_corpus_out(out, overwrite)
    sizes = check_corpus_options(parse_lengths(lengths), per_format, packages)
    kind_list = check_kinds([k.strip() for k in kinds.split(",") if k.strip()])
    tokenizer = load_tokenizer(model or default_model_name())
    progress = _progress()
    with progress:
        bar = progress.add_task("prompts", total=len(corpus_plan(sizes, per_format, kinds=kind_list)), info=out)
        card = write_corpus(out, tokenizer, sizes, per_format, seed=seed, haystack_packages=packages,
                            progress=lambda: progress.advance(bar), overwrite=overwrite, kinds=kind_list)
    console.print(f"wrote {card['documents']} prompts to {out} (card: {out.rsplit('.', 1)[0]}.json); "
                  f"kinds {card['counts']['kind']}; formats {card['counts']['format']}; next: fm-index build-labels --corpus {out} --source generate "
                  f"--new-tokens 64 --out LABELS")


if __name__ == "__main__":
    app()
