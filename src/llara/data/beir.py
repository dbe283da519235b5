"""Load BEIR-format retrieval collections into plain dicts, with precise error messages.

A BEIR collection is a directory holding::

    corpus.jsonl        one {"_id", "title", "text"} object per line ("title" optional)
    queries.jsonl       one {"_id", "text"} object per line
    qrels/<split>.tsv   "query-id<TAB>corpus-id<TAB>score" rows (the header line is optional)

Interchange format used across llara:

* corpus  ``{doc_id: {"title": str, "text": str}}``
* queries ``{query_id: text}``
* qrels   ``{query_id: {doc_id: int}}``

Blank lines are skipped everywhere.  Every problem with a file raises :class:`llara.io.DataError`, whose
message names the file, the 1-based line (when there is one) and the reason.

Relevance scores ``<= 0`` are kept in the qrels as they are: ``pytrec_eval`` (and trec_eval) count a
document as relevant only when its score is ``>= 1``, and give it a gain of ``max(score, 0)`` in
nDCG, so such rows are judged non-relevant rather than dropped.  A query whose judgments are all
``<= 0`` is still a judged query (it scores 0 on every metric).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import DataError, iter_jsonl, iter_lines

logger = logging.getLogger(__name__)

__all__ = [
    "BeirDataset",
    "load_corpus",
    "load_queries",
    "load_qrels",
    "load_beir",
]

_QRELS_HEADER_FIRST = {"query-id", "query_id", "queryid", "qid", "query"}
_QRELS_HEADER_LAST = {"score", "relevance", "rel", "label", "grade"}


@dataclass
class BeirDataset:
    """One split of a BEIR collection.

    ``queries`` holds only the queries that have at least one judgment in ``qrels`` for the split.
    """

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    path: Path | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"BeirDataset(name={self.name!r}, split={self.split!r}, docs={len(self.corpus)}, "
            f"queries={len(self.queries)}, judged_pairs={sum(len(v) for v in self.qrels.values())})"
        )


# --------------------------------------------------------------------------- helpers


def get_str_field(path: Path, line_no: int, obj: dict, key: str, *, required: bool) -> str:
    if key not in obj or (not required and obj[key] is None):
        if required:
            raise DataError(path, line_no, f"missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, line_no, f"field '{key}' must be a string, got {type(value).__name__} ({value!r})")
    return value


def get_doc_id(path: Path, line_no: int, obj: dict, seen: dict[str, int]) -> str:
    """The non-empty, unique ``_id`` of a record (``seen`` maps ids to their first line)."""
    doc_id = get_str_field(path, line_no, obj, "_id", required=True)
    if not doc_id.strip():
        raise DataError(path, line_no, "field '_id' is empty")
    if doc_id in seen:
        raise DataError(path, line_no, f"duplicate _id '{doc_id}' (first seen on line {seen[doc_id]})")
    seen[doc_id] = line_no
    return doc_id


# --------------------------------------------------------------------------- loaders


def load_corpus(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read ``corpus.jsonl`` into ``{doc_id: {"title": str, "text": str}}``.

    ``_id`` and ``text`` must be strings (``text`` may be empty); ``title`` is optional and
    defaults to ``""``.  Other fields are ignored.
    """
    path = Path(path)
    corpus: dict[str, dict[str, str]] = {}
    seen: dict[str, int] = {}
    for line_no, obj in iter_jsonl(path):
        doc_id = get_doc_id(path, line_no, obj, seen)
        text = get_str_field(path, line_no, obj, "text", required=True)
        title = get_str_field(path, line_no, obj, "title", required=False)
        corpus[doc_id] = {"title": title, "text": text}
    logger.debug("loaded %d documents from %s", len(corpus), path)
    return corpus


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    """Read ``queries.jsonl`` into ``{query_id: text}``.  Other fields (metadata) are ignored."""
    path = Path(path)
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line_no, obj in iter_jsonl(path):
        qid = get_doc_id(path, line_no, obj, seen)
        queries[qid] = get_str_field(path, line_no, obj, "text", required=True)
    logger.debug("loaded %d queries from %s", len(queries), path)
    return queries


def _parse_score(raw: str) -> int | None:
    s = raw.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return None
    if f.is_integer():  # accept "2.0"
        return int(f)
    return None


def _is_qrels_header(cols: list[str]) -> bool:
    if len(cols) != 3 or _parse_score(cols[2]) is not None:
        return False
    return cols[0].strip().lower() in _QRELS_HEADER_FIRST or cols[2].strip().lower() in _QRELS_HEADER_LAST


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """Parse a qrels TSV; also return the line of each ``(query_id, doc_id)`` pair."""
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    first = True
    for line_no, line in iter_lines(path):
        cols = line.split("\t")
        if first:
            first = False
            if _is_qrels_header(cols):
                continue
        if len(cols) != 3:
            raise DataError(
                path,
                line_no,
                f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}",
            )
        qid, doc_id, raw_score = (c.strip() for c in cols)
        if not qid:
            raise DataError(path, line_no, "empty query-id")
        if not doc_id:
            raise DataError(path, line_no, "empty corpus-id")
        score = _parse_score(raw_score)
        if score is None:
            raise DataError(path, line_no, f"score {raw_score!r} is not an integer")
        key = (qid, doc_id)
        if key in lines:
            raise DataError(
                path, line_no, f"duplicate judgment for query '{qid}', doc '{doc_id}' (first on line {lines[key]})"
            )
        lines[key] = line_no
        qrels.setdefault(qid, {})[doc_id] = score
    if not lines:
        raise DataError(path, None, "file is empty" if first else "file has a header but no judgments")
    return qrels, lines


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Read a qrels TSV into ``{query_id: {doc_id: score}}``.

    The header line (``query-id\\tcorpus-id\\tscore``) is optional and detected.  Scores must be
    integers; scores ``<= 0`` are kept (pytrec_eval treats them as non-relevant).  Ids are not
    checked against a corpus here: :func:`load_beir` does that.
    """
    path = Path(path)
    qrels, _ = _read_qrels(path)
    logger.debug("loaded %d judgments for %d queries from %s", sum(map(len, qrels.values())), len(qrels), path)
    return qrels


def _available_splits(qrels_dir: Path) -> list[str]:
    if not qrels_dir.is_dir():
        return []
    return sorted(p.stem for p in qrels_dir.glob("*.tsv") if p.is_file())


def load_beir(dataset_dir: str | os.PathLike, split: str = "test") -> BeirDataset:
    """Load one split of a BEIR collection.

    Checks that every judged query id exists in ``queries.jsonl`` and every judged doc id in
    ``corpus.jsonl`` (the error names the qrels file, line and id), and keeps only the queries
    that have judgments for ``split``.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(root, None, "dataset directory not found")
    qrels_dir = root / "qrels"
    qrels_path = qrels_dir / f"{split}.tsv"
    if not qrels_path.is_file():
        available = _available_splits(qrels_dir)
        listing = ", ".join(available) if available else "none"
        raise DataError(qrels_path, None, f"no qrels for split '{split}'; available splits: {listing}")

    corpus = load_corpus(root / "corpus.jsonl")
    all_queries = load_queries(root / "queries.jsonl")
    qrels, lines = _read_qrels(qrels_path)

    for (qid, doc_id), line_no in lines.items():  # insertion order = file order
        if qid not in all_queries:
            raise DataError(qrels_path, line_no, f"unknown query id '{qid}' (not in queries.jsonl)")
        if doc_id not in corpus:
            raise DataError(qrels_path, line_no, f"unknown doc id '{doc_id}' (not in corpus.jsonl)")

    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    ds = BeirDataset(name=root.name, corpus=corpus, queries=queries, qrels=qrels, split=split, path=root)
    logger.info(
        "loaded %s/%s: %d docs, %d judged queries (of %d), %d judgments",
        ds.name,
        split,
        len(corpus),
        len(queries),
        len(all_queries),
        len(lines),
    )
    return ds
