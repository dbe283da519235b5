"""Retrieval metrics (via pytrec_eval) and TREC run files.

Conventions (those of trec_eval, which pytrec_eval wraps):

* **Ranking.** A run ``{qid: {doc_id: score}}`` is ranked by score descending; ties are broken by
  doc id *descending* (byte-wise string order).  :func:`llara.retrieval.ranking.rank_docs`, the MRR truncation and
  :func:`write_trec_run` all use this same rule, so ranks agree everywhere.
* **Relevance.** A document is relevant when its qrels score is ``>= 1``.  nDCG uses the linear
  gain ``max(score, 0)`` and the ``1 / log2(rank + 1)`` discount; its ideal ranking is built from
  every judged document.
* **Averaging.** Means are taken over all *judged* queries, i.e. every query id in ``qrels``.  A
  judged query that is missing from the run (or has no results) scores 0 on every metric; run
  queries without judgments are ignored.

Metric names: ``ndcg@k`` (``ndcg_cut.k``), ``recall@k`` (``recall.k``), ``map@k`` (``map_cut.k``)
and ``mrr@k`` (``recip_rank`` on the run truncated to each query's top ``k``).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import pytrec_eval

from ..io import DataError, open_atomic
from ..retrieval.ranking import rank_docs

logger = logging.getLogger(__name__)

__all__ = ["evaluate_run", "write_trec_run", "read_trec_run"]


def _as_ks(value: int | Iterable[int] | None, name: str) -> list[int]:
    if value is None:
        return []
    ks = [value] if isinstance(value, int) else list(value)
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"{name} cutoffs must be positive integers, got {k!r}")
    return sorted(set(ks))


def _clean_run(run: Mapping[str, Mapping[str, float]], judged: set[str]) -> dict[str, dict[str, float]]:
    """Judged queries only, every judged query present, str ids, finite float scores."""
    clean: dict[str, dict[str, float]] = {}
    dropped = 0
    for qid in judged:
        docs = run.get(qid)
        out: dict[str, float] = {}
        if docs:
            for doc_id, score in docs.items():
                s = float(score)
                if math.isnan(s):
                    dropped += 1
                    continue
                out[str(doc_id)] = s
        clean[qid] = out
    if dropped:
        logger.warning("ignored %d NaN scores in the run", dropped)
    return clean


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    *,
    ndcg_at: int | Iterable[int] = (10,),
    recall_at: int | Iterable[int] = (100,),
    mrr_at: int | Iterable[int] = (10,),
    map_at: int | Iterable[int] = (100,),
) -> dict:
    """Score a run against qrels with pytrec_eval.

    Returns ``{"ndcg@10": mean, "recall@100": mean, "mrr@10": mean, "map@100": mean,
    "num_queries": n, "per_query": {qid: {"ndcg@10": ..., ...}}}`` (one key per requested cutoff),
    with means over all ``n`` judged queries (see the module docstring for the conventions).
    """
    ndcg_ks = _as_ks(ndcg_at, "ndcg_at")
    recall_ks = _as_ks(recall_at, "recall_at")
    mrr_ks = _as_ks(mrr_at, "mrr_at")
    map_ks = _as_ks(map_at, "map_at")

    qrels_clean = {
        str(qid): {str(d): int(s) for d, s in docs.items()} for qid, docs in qrels.items() if docs
    }
    if not qrels_clean:
        raise ValueError("qrels contain no judged queries")
    judged = set(qrels_clean)
    run_clean = _clean_run(run, judged)
    missing = sum(1 for q in judged if not run_clean[q])
    if missing:
        logger.info("%d of %d judged queries have no results in the run (scored 0)", missing, len(judged))

    per_query: dict[str, dict[str, float]] = {qid: {} for qid in sorted(judged)}

    measures: dict[str, str] = {}  # pytrec_eval output key -> our name
    for k in ndcg_ks:
        measures[f"ndcg_cut_{k}"] = f"ndcg@{k}"
    for k in recall_ks:
        measures[f"recall_{k}"] = f"recall@{k}"
    for k in map_ks:
        measures[f"map_cut_{k}"] = f"map@{k}"
    if measures:
        spec = set()
        if ndcg_ks:
            spec.add("ndcg_cut." + ",".join(map(str, ndcg_ks)))
        if recall_ks:
            spec.add("recall." + ",".join(map(str, recall_ks)))
        if map_ks:
            spec.add("map_cut." + ",".join(map(str, map_ks)))
        results = pytrec_eval.RelevanceEvaluator(qrels_clean, spec).evaluate(run_clean)
        for qid in judged:
            res = results.get(qid, {})
            for key, name in measures.items():
                per_query[qid][name] = float(res.get(key, 0.0))

    if mrr_ks:
        evaluator = pytrec_eval.RelevanceEvaluator(qrels_clean, {"recip_rank"})
        for k in mrr_ks:
            truncated = {qid: dict(rank_docs(docs)[:k]) for qid, docs in run_clean.items()}
            results = evaluator.evaluate(truncated)
            for qid in judged:
                per_query[qid][f"mrr@{k}"] = float(results.get(qid, {}).get("recip_rank", 0.0))

    names = (
        [f"ndcg@{k}" for k in ndcg_ks]
        + [f"recall@{k}" for k in recall_ks]
        + [f"mrr@{k}" for k in mrr_ks]
        + [f"map@{k}" for k in map_ks]
    )
    n = len(judged)
    out: dict = {name: math.fsum(pq[name] for pq in per_query.values()) / n for name in names}
    out["num_queries"] = n
    out["per_query"] = per_query
    return out


# --------------------------------------------------------------------------- TREC run files


def _check_token(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a TREC run file (empty or contains whitespace)")
    return value


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str = "llara") -> Path:
    """Write ``qid Q0 docid rank score tag`` lines, ranks from 1 in :func:`rank_docs` order.

    The file is written atomically (temporary file in the same directory, then ``os.replace``);
    parent directories are created.  Scores are written with full float precision.
    """
    path = Path(path)
    _check_token(tag, "tag")
    with open_atomic(path) as fh:
        for qid in sorted(run, key=str):
            q = _check_token(str(qid), "query id")
            for rank, (doc_id, score) in enumerate(rank_docs(run[qid]), start=1):
                _check_token(doc_id, "doc id")
                fh.write(f"{q} Q0 {doc_id} {rank} {score!r} {tag}\n")
    logger.debug("wrote run for %d queries to %s", len(run), path)
    return path


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a TREC run file (``qid Q0 docid rank score tag``, whitespace-separated) into a run dict.

    Raises :class:`~llara.io.DataError` for a missing file, wrong column count, a
    non-numeric score or a repeated ``(qid, docid)`` pair.  Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 6:
                raise DataError(path, line_no, f"expected 6 columns (qid Q0 docid rank score tag), got {len(cols)}")
            qid, _, doc_id, _, raw_score, _ = cols
            try:
                score = float(raw_score)
            except ValueError:
                raise DataError(path, line_no, f"score {raw_score!r} is not a number") from None
            docs = run.setdefault(qid, {})
            if doc_id in docs:
                raise DataError(path, line_no, f"duplicate doc '{doc_id}' for query '{qid}'")
            docs[doc_id] = score
    return run
