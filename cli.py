"""`fm-index`: build labels, train and export the FlashMemory memory indexer, and decode with LSA.

The pipeline, in the order a user runs it:

    fm-index build-labels  -> label shards (Arrow) from the frozen DeepSeek-V4 backbone
    fm-index train         -> the memory indexer (a sentence-transformers dual encoder)
    fm-index eval          -> precision / recall / retrieval ratio / coverage of a trained indexer
    fm-index export        -> model.safetensors + lsa_config.json for lsa_runtime
    fm-index generate      -> decode with lsa_runtime.Session (full or LSA) and print the footprint

This file only parses options, shows progress and turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from lsa_runtime.errors import FmIndexError

app = typer.Typer(
    name="fm-index",
    help=__doc__.split("\n\n")[0] + "\n\nRun `fm-index COMMAND --help` for each command's options.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


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


# ---- build-labels (foundation issue) ----------------------------------------------------------------


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
                              "checkpoint directory. Default: the bundled reference model if present, else tiny."),
    layers: str = typer.Option(None, "--layers", help="Memory-indexer layers, comma-separated CSA layers. "
                               "Default 10,12,20 on V4-Flash, the same relative depths on other models."),
    tau: int = typer.Option(64, "--tau", help="Trigger period tau in tokens: one label row per tau tokens."),
    nucleus: float = typer.Option(0.6, "--nucleus", help="Nucleus mass p kept per token and CSA layer."),
    min_votes: int = typer.Option(3, "--min-votes", help="An entry is golden if in the nucleus at >= this "
                                  "many CSA layers."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Prefill chunk (tokens); bounds memory."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Optional crop of each document (default: none)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                               "cuda:LOCAL_RANK under torchrun)."),
    dtype: str = typer.Option("float32", "--dtype", help="Backbone dtype: float32, bfloat16 or float16."),
    shard: str = typer.Option(None, "--shard", help="I/N: label only documents with index % N == I "
                              "(default: torchrun's RANK/WORLD_SIZE if set). Then run merge-labels."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
):
    """Run the frozen backbone over a corpus and write FlashMemory training labels (Arrow shards).

    Per trigger (every tau tokens) and memory-indexer layer: the hidden state h_t0, the golden entries
    (nucleus p at each CSA layer, voted over all CSA layers, united over the tau tokens after the trigger)
    and the native top-k union; per document, the compressed indexer keys.
    """
    import os

    from indexer_train.build_labels import LabelParams, Reporter, build_labels, parse_shard
    from lsa_runtime.backbone import default_model_name, load_config, parse_layers

    model = model or default_model_name()
    config = load_config(model)
    params = LabelParams(layers=tuple(parse_layers(layers, config)), tau=tau, nucleus=nucleus,
                         min_votes=min_votes, max_tokens=max_tokens, chunk_size=chunk_size, dtype=dtype)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard_pair = parse_shard(shard) if shard or world == 1 else (int(os.environ.get("RANK", "0")), world)
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
                               reporter=RichReporter())
    _print_label_summary(summary, out, params)
    if shard_pair[1] > 1:
        console.print(f"shard {shard_pair[0]}/{shard_pair[1]} done; when all shards are done run "
                      f"[bold]fm-index merge-labels --out {out}[/]")


def _print_label_summary(summary: dict, out: str, params=None):
    from rich.table import Table

    table = Table(title=f"labels in {out}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    tps = summary.get("tokens_per_second")
    for what, value in [
        ("documents labelled", f"{summary['documents']:,}"),
        ("documents skipped (shorter than 2 * tau)", f"{summary['skipped']:,}"),
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



# ---- train / eval / export (train/export issue) -----------------------------------------------------


# ---- generate (Session issue) -----------------------------------------------------------------------


# ---- evaluate (reference-backbone issue) ------------------------------------------------------------


if __name__ == "__main__":
    app()
