"""Exact (brute-force) dense retrieval with FAISS."""
from __future__ import annotations

import logging
from typing import Sequence

import faiss
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["exact_search"]


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def exact_search(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    k: int = 100,
    batch_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Top-``k`` documents per query by inner product, using a FAISS ``IndexFlatIP``.

    Embeddings are cast to contiguous float32; the score is their inner product (the cosine
    similarity when they are L2-normalised, as every built-in template makes them).  ``k`` is clipped to the number of documents.
    Queries are searched ``batch_size`` at a time.  Returns a run ``{qid: {doc_id: score}}``.
    """
    q = _as_matrix(query_emb, "query_emb")
    d = _as_matrix(doc_emb, "doc_emb")
    doc_ids = [str(x) for x in doc_ids]
    query_ids = [str(x) for x in query_ids]
    if len(doc_ids) != d.shape[0]:
        raise ValueError(f"{len(doc_ids)} doc_ids for {d.shape[0]} document embeddings")
    if len(query_ids) != q.shape[0]:
        raise ValueError(f"{len(query_ids)} query_ids for {q.shape[0]} query embeddings")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids contain duplicates")
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids contain duplicates")
    if q.shape[0] and d.shape[0] and q.shape[1] != d.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {q.shape[1]}, documents {d.shape[1]}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    run: dict[str, dict[str, float]] = {qid: {} for qid in query_ids}
    if d.shape[0] == 0 or q.shape[0] == 0:
        return run
    k = min(k, d.shape[0])

    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    for start in range(0, q.shape[0], batch_size):
        scores, idx = index.search(q[start : start + batch_size], k)
        for row, qid in enumerate(query_ids[start : start + batch_size]):
            hits = run[qid]
            for j, s in zip(idx[row].tolist(), scores[row].tolist()):
                if j >= 0:  # FAISS pads with -1 when fewer than k results exist
                    hits[doc_ids[j]] = float(s)
    logger.debug("exact search: %d queries x %d docs, k=%d", q.shape[0], d.shape[0], k)
    return run
