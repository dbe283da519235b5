"""BEIR loader: precise errors on bad files, and the real (tiny) adi collection."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from llara.data.beir import BeirDataset, load_beir, load_corpus, load_qrels, load_queries
from llara.io import DataError, passage_text

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ADI = SHARED_DATA / "adi"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _make_dataset(root: Path, qrels_lines: list[str] | None = None, split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
            {"_id": "d2", "text": "Fish live in water."},
            {"_id": "d3", "title": "", "text": "The heart pumps blood."},
        ],
    )
    _jsonl(
        root / "queries.jsonl",
        [{"_id": "q1", "text": "capital of france"}, {"_id": "q2", "text": "where do fish live"}, {"_id": "q3", "text": "x"}],
    )
    (root / "qrels").mkdir(exist_ok=True)
    if qrels_lines is None:
        qrels_lines = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t2", "q2\td3\t0"]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(qrels_lines) + "\n", encoding="utf-8")
    return root


def _err(excinfo) -> DataError:
    err = excinfo.value
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    return err


# --------------------------------------------------------------------------- happy paths


def test_small_dataset_loads(tmp_path):
    root = _make_dataset(tmp_path / "toy")
    ds = load_beir(root)
    assert isinstance(ds, BeirDataset)
    assert ds.name == "toy" and ds.split == "test"
    assert ds.corpus["d2"] == {"title": "", "text": "Fish live in water."}
    assert ds.queries == {"q1": "capital of france", "q2": "where do fish live"}  # q3 unjudged
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}  # score 0 kept


def test_qrels_header_optional_and_blank_lines_skipped(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("\nq1\td1\t1\n\n  \nq1\td2\t-1\r\n", encoding="utf-8")
    assert load_qrels(p) == {"q1": {"d1": 1, "d2": -1}}
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    assert load_qrels(p) == {"q1": {"d1": 1}}


def test_passage_text():
    assert passage_text({"title": "Paris", "text": "Capital."}) == "Paris Capital."
    assert passage_text({"title": "", "text": "Capital."}) == "Capital."
    assert passage_text({"text": "Capital."}) == "Capital."
    assert passage_text({"title": "  ", "text": "Capital."}) == "Capital."


# --------------------------------------------------------------------------- errors


def test_malformed_json(tmp_path):
    p = _jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}, "", '{"_id": "b", "text": '])
    with pytest.raises(DataError) as ei:
        load_corpus(p)
    err = _err(ei)
    assert err.path == p and err.line == 3
    assert str(err).startswith(f"{p}:3: malformed JSON")


def test_missing_id(tmp_path):
    p = _jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}, {"title": "t", "text": "y"}])
    with pytest.raises(DataError) as ei:
        load_corpus(p)
    assert str(_err(ei)) == f"{p}:2: missing field '_id'"


def test_non_string_id_and_missing_text(tmp_path):
    p = _jsonl(tmp_path / "queries.jsonl", [{"_id": 7, "text": "x"}])
    with pytest.raises(DataError, match=r"queries\.jsonl:1: field '_id' must be a string, got int"):
        load_queries(p)
    p = _jsonl(tmp_path / "queries.jsonl", [{"_id": "q", "text": "x"}, {"_id": "r"}])
    with pytest.raises(DataError, match=r"queries\.jsonl:2: missing field 'text'"):
        load_queries(p)


def test_duplicate_id(tmp_path):
    p = _jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}, {"_id": "q1", "text": "c"}])
    with pytest.raises(DataError) as ei:
        load_queries(p)
    err = _err(ei)
    assert err.line == 3
    assert str(err) == f"{p}:3: duplicate _id 'q1' (first seen on line 1)"


def test_empty_files(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_corpus(p)
    assert str(_err(ei)) == f"{p}: file is empty"
    q = tmp_path / "test.tsv"
    q.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty"):
        load_qrels(q)
    q.write_text("query-id\tcorpus-id\tscore\n", encoding="utf-8")
    with pytest.raises(DataError, match="header but no judgments"):
        load_qrels(q)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_corpus(tmp_path / "nope.jsonl")


def test_qrels_bad_score_and_columns(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0.5\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_qrels(p)
    assert str(_err(ei)) == f"{p}:3: score '0.5' is not an integer"

    p.write_text("q1\td1\t1\nq1 d2 1\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_qrels(p)
    err = _err(ei)
    assert err.line == 2 and "expected 3 tab-separated columns" in err.reason and "got 1" in err.reason

    p.write_text("q1\td1\t1\nq1\td1\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.tsv:2: duplicate judgment"):
        load_qrels(p)


def test_qrels_unknown_doc_id(tmp_path):
    root = _make_dataset(tmp_path / "toy", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\tzzz\t1"])
    with pytest.raises(DataError) as ei:
        load_beir(root)
    err = _err(ei)
    assert err.path == root / "qrels" / "test.tsv" and err.line == 3
    assert "unknown doc id 'zzz'" in str(err)
    assert str(err).startswith(f"{root / 'qrels' / 'test.tsv'}:3:")


def test_qrels_unknown_query_id(tmp_path):
    root = _make_dataset(tmp_path / "toy", ["q1\td1\t1", "q9\td1\t1"])
    with pytest.raises(DataError, match=r"test\.tsv:2: unknown query id 'q9'"):
        load_beir(root)


def test_missing_split_lists_available(tmp_path):
    root = _make_dataset(tmp_path / "toy")
    (root / "qrels" / "train.tsv").write_text("q1\td1\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_beir(root, split="dev")
    err = _err(ei)
    assert err.line is None and err.path == root / "qrels" / "dev.tsv"
    assert "no qrels for split 'dev'" in str(err)
    assert "available splits: test, train" in str(err)
    assert load_beir(root, split="train").queries == {"q1": "capital of france"}


def test_data_error_pickles():
    err = DataError("/x/corpus.jsonl", 12, "missing field '_id'")
    assert str(err) == "/x/corpus.jsonl:12: missing field '_id'"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 12


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not ADI.is_dir(), reason=f"shared data not found at {ADI}")
def test_load_adi():
    ds = load_beir(ADI)
    assert len(ds.corpus) == 82
    assert len(ds.queries) == 35
    assert sum(len(v) for v in ds.qrels.values()) == 170
    assert all(set(docs) <= set(ds.corpus) for docs in ds.qrels.values())
    assert ds.corpus["1"]["title"].startswith("the ibm dsd technical information center")
