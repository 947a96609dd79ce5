"""Write a training checkpoint as the bundled ``reference`` model: ``data/reference/`` in bf16.

Writes ``config.json``, ``generation_config.json`` and ``model.safetensors`` (``save_pretrained``, bf16: the
checkpoint's bf16 values load exactly into float32 for CPU use) and ``fm_index.json`` (name, trained, training
step, where the numbers are). The tokenizer is already there (``build_corpus``); the model card
``README.md`` is written by hand from the logs. Files are written to a temporary folder first, then moved.

Run: ``python -m reference.export --ckpt reference/work/run1/ckpt``. A warm-started piece restarts its step count
(``--reset-step``), so the bundled default is exported with ``--total-steps`` (its whole lineage) and
``--steps-note`` saying what that counts (data/reference/README.md, "Re-running").
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .build_corpus import REFERENCE_DIR
from .train import load_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="training checkpoint folder (state.json)")
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--note", default="", help="one line for fm_index.json")
    parser.add_argument("--default", action="store_true",
                        help="make it the default backbone of every command (only once it meets its retrieval targets)")
    parser.add_argument("--total-steps", type=int, default=None,
                        help="fm_index.json's step: the optimizer steps of the model's whole lineage, where the checkpoint "
                             "is a warm-started piece whose own step count restarted (--reset-step); default: its own")
    parser.add_argument("--steps-note", default="", help="what fm_index.json's step counts (one line)")
    parser.add_argument("--memory-layers", default="2,4,6",
                        help="the memory-indexer layers build-labels uses by default on this model (fm_index.json; "
                             "'' for the backbone-generic positions); 2,4,6 was measured for the current weights")
    args = parser.parse_args(argv)
    model, state = load_checkpoint(args.ckpt)
    tmp = args.out.with_name(args.out.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        if (tmp / name).exists():
            (tmp / name).replace(args.out / name)
    shutil.rmtree(tmp)
    step = state["step"] if args.total_steps is None else args.total_steps
    meta = {"name": "reference", "trained": True, "step": step, "parameters": state["parameters"],
            "card": "README.md", "training": "reference/", "note": args.note,
            "default": bool(args.default)}
    if args.steps_note:
        meta["steps_note"] = args.steps_note
    if args.memory_layers:
        meta["memory_layers"] = [int(x) for x in args.memory_layers.split(",")]
        meta["memory_layers_note"] = ("memory-indexer layers for this model, chosen by measurement: with the release's "
                                      "relative positions (6, 8, 10: the last three CSA layers) the trained indexer "
                                      "misses needle entries (docs/RESULTS.md, section 6)")
    (args.out / "fm_index.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} from {args.ckpt} (checkpoint step {state['step']}, fm_index.json step {step})")


if __name__ == "__main__":
    main()
