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


# ---- train / eval / export (train/export issue) -----------------------------------------------------


# ---- generate (Session issue) -----------------------------------------------------------------------


# ---- evaluate (reference-backbone issue) ------------------------------------------------------------


if __name__ == "__main__":
    app()
