"""Dense exact search (FAISS) against brute force, and BM25 on the real adi collection."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llara.data.beir import load_beir
from llara.evaluation.metrics import evaluate_run
from llara.retrieval.bm25 import bm25_search
from llara.retrieval.dense import exact_search

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ADI = SHARED_DATA / "adi"


def _normed(rng, n, dim):
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k,batch_size", [(10, 1024), (7, 3), (500, 16)])
def test_exact_search_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    q = _normed(rng, 20, 32)  # float64, converted inside
    d = _normed(rng, 300, 32)
    doc_ids = [f"doc{i}" for i in range(300)]
    query_ids = [f"q{i}" for i in range(20)]
    run = exact_search(q, d, doc_ids, query_ids, k=k, batch_size=batch_size)
    kk = min(k, 300)
    sims = q.astype(np.float32) @ d.astype(np.float32).T
    assert list(run) == query_ids
    for i, qid in enumerate(query_ids):
        top = np.argsort(-sims[i], kind="stable")[:kk]
        got = sorted(run[qid].items(), key=lambda x: -x[1])
        assert [doc for doc, _ in got] == [doc_ids[j] for j in top]
        np.testing.assert_allclose([s for _, s in got], sims[i, top], atol=1e-5)


def test_exact_search_edge_cases():
    rng = np.random.default_rng(0)
    d = _normed(rng, 3, 8).astype(np.float32)
    q = _normed(rng, 2, 8).astype(np.float32)
    run = exact_search(q, np.asfortranarray(d), ["a", "b", "c"], ["x", "y"], k=100)
    assert all(len(v) == 3 for v in run.values())
    assert exact_search(q, np.zeros((0, 8), np.float32), [], ["x", "y"]) == {"x": {}, "y": {}}
    with pytest.raises(ValueError, match="dimension"):
        exact_search(q, d[:, :4], ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="doc_ids"):
        exact_search(q, d, ["a", "b"], ["x", "y"])


def test_bm25_tiny_corpus_and_empty_query():
    corpus = {
        "d1": {"title": "Paris", "text": "Paris is the capital of France."},
        "d2": {"title": "", "text": "Fish live in rivers and the sea."},
        "d3": {"title": "Hearts", "text": "The heart pumps blood through the body."},
    }
    queries = {"q1": "capital city of France", "q2": "the of and", "q3": "!!!", "q4": "zebra", "q5": "fishes"}
    run = bm25_search(corpus, queries, k=2)
    assert set(run) == set(queries)
    assert list(run["q1"]) == ["d1"]  # only documents sharing a term are returned
    assert run["q2"] == {} and run["q3"] == {} and run["q4"] == {}
    assert list(run["q5"]) == ["d2"]  # stemming: fishes -> fish
    assert all(s > 0 for s in run["q1"].values())


@pytest.mark.skipif(not ADI.is_dir(), reason=f"shared data not found at {ADI}")
def test_bm25_adi():
    ds = load_beir(ADI)
    run = bm25_search(ds.corpus, ds.queries, k=100)
    assert set(run) == set(ds.queries)
    assert all(0 < len(hits) <= 82 for hits in run.values())
    res = evaluate_run(ds.qrels, run)
    assert res["ndcg@10"] > 0.3, f"BM25 nDCG@10 on adi = {res['ndcg@10']:.4f}"
    assert res["recall@100"] > 0.7, f"BM25 Recall@100 on adi = {res['recall@100']:.4f}"
