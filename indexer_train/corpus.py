"""Corpus readers for build-labels: JSONL, Parquet, or a saved Hugging Face dataset.

Every record has an ``id`` and either ``text`` (tokenised with the backbone's tokenizer) or ``input_ids``.
The corpus is validated in full before any label is written, so a bad line 10,000 fails at once with its
line number instead of after hours of work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lsa_runtime.errors import FmIndexError


class CorpusError(FmIndexError):
    """The corpus is missing, unreadable, empty or has a malformed record."""


@dataclass(frozen=True)
class Document:
    index: int  # 0-based position in the corpus: stable across --shard runs
    id: str
    text: str | None
    input_ids: list[int] | None


def _check_record(record, where: str, index: int) -> Document:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object with 'id' and 'text' or 'input_ids'")
    doc_id = record.get("id", index)
    text, ids = record.get("text"), record.get("input_ids")
    if text is None and ids is None:
        raise CorpusError(f"{where}: record has neither 'text' nor 'input_ids'")
    if text is not None and not isinstance(text, str):
        raise CorpusError(f"{where}: 'text' must be a string")
    if ids is not None:
        ids = list(ids)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
            raise CorpusError(f"{where}: 'input_ids' must be a list of non-negative integers")
    return Document(index=index, id=str(doc_id), text=text, input_ids=ids)


class Corpus:
    """A validated, re-iterable corpus. ``len(corpus)`` is the number of documents; ``fingerprint`` their count
    and a hash of every document's id and content (a resumed run must see the same corpus)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CorpusError(f"corpus not found: {self.path}")
        self.kind = self._detect()
        self._count = self._validate()
        if self._count == 0:
            raise CorpusError(f"corpus {self.path} is empty")

    def _detect(self) -> str:
        if self.path.is_dir():
            if (self.path / "dataset_info.json").exists() or (self.path / "state.json").exists() or \
                    (self.path / "dataset_dict.json").exists():
                return "hf"
            raise CorpusError(f"{self.path} is a directory but not a saved Hugging Face dataset")
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        raise CorpusError(f"unknown corpus format '{suffix}' for {self.path} (use .jsonl, .parquet or a dataset dir)")

    def _validate(self) -> int:
        """Read every record once: count them and fingerprint their ids and contents."""
        digest = hashlib.sha256()
        count = 0
        for doc in self._records():
            content = doc.text if doc.text is not None else json.dumps(doc.input_ids)
            digest.update(f"{doc.id}\0{len(content)}\0".encode())
            digest.update(hashlib.sha256(content.encode()).digest())
            count += 1
        self.fingerprint = {"documents": count, "sha256": digest.hexdigest()[:16]}
        return count

    def _records(self) -> Iterator[Document]:
        if self.kind == "jsonl":
            try:
                handle = self.path.open(encoding="utf-8")
            except OSError as exc:
                raise CorpusError(f"cannot read corpus {self.path}: {exc.strerror}") from None
            with handle:
                index = 0
                for lineno, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{self.path} line {lineno}: invalid JSON ({exc.msg} at column "
                                          f"{exc.colno})") from None
                    yield _check_record(record, f"{self.path} line {lineno}", index)
                    index += 1
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(self.path)
            except Exception as exc:  # pyarrow raises several types for corrupt files
                raise CorpusError(f"cannot read Parquet corpus {self.path}: {exc}") from None
            yield from self._from_columns(table.to_pylist(), "row")
        else:
            from datasets import DatasetDict, load_from_disk

            try:
                ds = load_from_disk(str(self.path))
            except Exception as exc:
                raise CorpusError(f"cannot load dataset {self.path}: {exc}") from None
            if isinstance(ds, DatasetDict):
                if "train" not in ds:
                    raise CorpusError(f"{self.path} is a DatasetDict without a 'train' split")
                ds = ds["train"]
            yield from self._from_columns(ds, "row")

    def _from_columns(self, rows, label: str) -> Iterator[Document]:
        for index, record in enumerate(rows):
            yield _check_record(record, f"{self.path} {label} {index}", index)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Document]:
        return self._records()


def tokenize(doc: Document, tokenizer) -> list[int]:
    """Token ids of a document: ``input_ids`` as given, or ``text`` through the backbone's tokenizer with its
    special tokens (a BOS where the tokenizer adds one), exactly as ``lsa_runtime.Session`` encodes a prompt."""
    if doc.input_ids is not None:
        return doc.input_ids
    if tokenizer is None:
        raise CorpusError(f"document '{doc.id}' has text but the model has no tokenizer; give input_ids")
    return tokenizer(doc.text)["input_ids"]
