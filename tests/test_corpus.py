"""Corpus readers: JSONL, Parquet and saved HF datasets give the same documents; bad records name their place."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer_train.corpus import Corpus, CorpusError, tokenize

RECORDS = [{"id": "a", "text": "def f(x):\n    return x + 1\n"}, {"id": "b", "input_ids": [5, 6, 7]}]


def _docs(corpus):
    return [(d.index, d.id, d.text, d.input_ids) for d in corpus]


def test_formats_agree(tmp_path):
    from datasets import Dataset

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    table = pa.table({"id": ["a", "b"], "text": [RECORDS[0]["text"], None],
                      "input_ids": pa.array([None, [5, 6, 7]], pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "c.parquet")
    Dataset(table).save_to_disk(str(tmp_path / "hf"))
    expect = [(0, "a", RECORDS[0]["text"], None), (1, "b", None, [5, 6, 7])]
    assert _docs(Corpus(jsonl)) == expect
    assert _docs(Corpus(tmp_path / "c.parquet")) == expect
    assert _docs(Corpus(tmp_path / "hf")) == expect
    assert len(Corpus(jsonl)) == 2


def test_tokenize_text_and_ids(tmp_path, tiny_tokenizer):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    a, b = list(Corpus(jsonl))
    ids = tokenize(a, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == RECORDS[0]["text"]
    assert tokenize(b, None) == [5, 6, 7]
    with pytest.raises(CorpusError, match="no tokenizer"):
        tokenize(a, None)


@pytest.mark.parametrize("content,message", [
    ('{"id": 1, "input_ids": [1, -2]}\n', "line 1: 'input_ids' must be a list of non-negative integers"),
    ('{"id": 1, "text": 5}\n', "line 1: 'text' must be a string"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"id": 1, "text": "ok"}\n\n{"id": 2, "text": "x"\n', "line 3: invalid JSON"),
])
def test_bad_records(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        Corpus(path)


def test_unknown_format_and_plain_directory(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        Corpus(tmp_path / "c.csv")
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="not a saved Hugging Face dataset"):
        Corpus(tmp_path / "d")
