"""Build the reference model's corpus and tokenizer from the running interpreter's standard library.

Documents: every top-level package of the stdlib (``asyncio``, ``email``, ``test``, ...) is one document, its
``.py`` files concatenated in sorted order under ``# file: <path>`` headers; the top-level modules form documents
of consecutive files (sorted) of at least 64 KB. Left out: ``site-packages``, ``encodings`` (codec tables),
``__pycache__``, ``lib-dynload``, ``config-*``, and files that are not UTF-8. Whole packages listed in
``HELD_OUT`` are kept out of training and of the tokenizer: they are the evaluation haystacks.

Outputs (deterministic for a given stdlib):
  ``data/reference/tokenizer.json`` (+ ``tokenizer_config.json``): byte-level BPE, 4,096 ids, trained on the
  training documents plus synthetic task lines;
  ``reference/work/corpus.npz``: ``train``/``eval`` uint16 token arrays (documents separated by
  ``<eos>``); ``corpus.json`` beside it: Python version, documents, counts, SHA-256 of the arrays.

Run ``python -m reference.build_corpus``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np

from .tasks import sample_texts

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
REFERENCE_DIR = HERE.parent / "data" / "reference"
HELD_OUT = ("email", "json", "http", "wsgiref", "xmlrpc")
SKIPPED = ("site-packages", "encodings", "__pycache__", "lib-dynload", "__phello__")
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]
MIN_TOPLEVEL_DOC = 64 * 1024


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_documents(stdlib: Path) -> list[tuple[str, str]]:
    """``(name, text)`` per document, in a fixed order (packages sorted, then top-level module groups)."""
    docs = []
    for pkg in sorted(p for p in stdlib.iterdir() if p.is_dir()):
        if pkg.name in SKIPPED or pkg.name.startswith("config-"):
            continue
        parts = []
        for f in sorted(pkg.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            text = read_source(f)
            if text:
                parts.append(f"# file: {f.relative_to(stdlib).as_posix()}\n{text}")
        if parts:
            docs.append((pkg.name, "\n".join(parts)))
    group, size, first = [], 0, None
    for f in sorted(stdlib.glob("*.py")):
        text = read_source(f)
        if not text:
            continue
        first = first or f.stem
        group.append(f"# file: {f.name}\n{text}")
        size += len(text)
        if size >= MIN_TOPLEVEL_DOC:
            docs.append((f"modules:{first}..{f.stem}", "\n".join(group)))
            group, size, first = [], 0, None
    if group:
        docs.append((f"modules:{first}..end", "\n".join(group)))
    return docs


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # every training sequence starts with <bos>: encoding with the tokenizer's special tokens (as build-labels
    # and the Session do) must give the same first token
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tokenize_documents(tokenizer, docs: list[tuple[str, str]]) -> tuple[np.ndarray, list[dict]]:
    eos = tokenizer.eos_token_id
    arrays, index, offset = [], [], 0
    for name, text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        arrays.append(np.asarray(ids, dtype=np.uint16))
        index.append({"name": name, "start": offset, "tokens": len(ids), "chars": len(text)})
        offset += len(ids)
    return np.concatenate(arrays), index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="standard-library folder to read (default: the running interpreter's)")
    parser.add_argument("--work", type=Path, default=WORK, help="where corpus.npz and corpus.json go")
    parser.add_argument("--tokenizer-dir", type=Path, default=REFERENCE_DIR, help="where tokenizer.json goes")
    args = parser.parse_args(argv)

    docs = stdlib_documents(args.stdlib)
    train_docs = [d for d in docs if d[0] not in HELD_OUT]
    eval_docs = [d for d in docs if d[0] in HELD_OUT]
    print(f"{len(train_docs)} training documents, {len(eval_docs)} held out ({', '.join(HELD_OUT)})")
    tokenizer = train_tokenizer([t for _, t in train_docs] + sample_texts(4000, seed=0))
    args.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.tokenizer_dir)
    train, train_index = tokenize_documents(tokenizer, train_docs)
    evals, eval_index = tokenize_documents(tokenizer, eval_docs)
    args.work.mkdir(parents=True, exist_ok=True)
    tmp = args.work / "corpus.tmp.npz"
    np.savez_compressed(tmp, train=train, eval=evals)
    tmp.rename(args.work / "corpus.npz")
    manifest = {
        "python": platform.python_version(), "stdlib": str(args.stdlib), "held_out": list(HELD_OUT),
        "vocab_size": len(tokenizer), "train_tokens": int(len(train)), "eval_tokens": int(len(evals)),
        "train_sha256": hashlib.sha256(train.tobytes()).hexdigest(),
        "eval_sha256": hashlib.sha256(evals.tobytes()).hexdigest(),
        "train_documents": train_index, "eval_documents": eval_index,
    }
    (args.work / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"train {len(train):,} tokens, eval {len(evals):,} tokens, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
