"""evaluate_run against brute-force pure-Python metrics (trec_eval conventions), TREC run files."""
from __future__ import annotations

import math
import random

import pytest

from llara.io import DataError
from llara.evaluation.metrics import evaluate_run, read_trec_run, write_trec_run
from llara.retrieval.ranking import rank_docs


# --------------------------------------------------------------------------- brute force
# trec_eval: rank by score desc, ties by doc id desc; relevant means grade >= 1;
# nDCG gain = grade (linear, negatives count as 0), discount 1/log2(rank + 1).


def _ranked(scores: dict[str, float]) -> list[str]:
    return [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def bf_ndcg(rels: dict[str, int], scores: dict[str, float], k: int) -> float:
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(_ranked(scores)[:k]))
    ideal = sorted((max(g, 0) for g in rels.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def bf_recall(rels, scores, k):
    n_rel = sum(1 for g in rels.values() if g >= 1)
    hits = sum(1 for d in _ranked(scores)[:k] if rels.get(d, 0) >= 1)
    return hits / n_rel if n_rel else 0.0


def bf_mrr(rels, scores, k):
    for i, d in enumerate(_ranked(scores)[:k]):
        if rels.get(d, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def bf_map(rels, scores, k):
    n_rel = sum(1 for g in rels.values() if g >= 1)
    if not n_rel:
        return 0.0
    hits, total = 0, 0.0
    for i, d in enumerate(_ranked(scores)[:k]):
        if rels.get(d, 0) >= 1:
            hits += 1
            total += hits / (i + 1)
    return total / n_rel


BRUTE = {"ndcg": bf_ndcg, "recall": bf_recall, "mrr": bf_mrr, "map": bf_map}


def _random_case(seed: int):
    rng = random.Random(seed)
    # mixed-width ids so that string order differs from numeric order
    docs = [f"d{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(25):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 30))
        qrels[qid] = {d: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for d in judged}
        if q % 7 == 3:
            continue  # judged query with no entry in the run
        retrieved = rng.sample(docs, rng.randint(0, 140))
        # coarse scores -> many ties, resolved by the doc-id rule
        run[qid] = {d: round(rng.uniform(-1, 1), 1) for d in retrieved}
    run["unjudged"] = {"d1": 1.0, "d2": 0.5}
    qrels["allzero"] = {"d5": 0, "d6": 0}
    run["allzero"] = {"d5": 3.0}
    return qrels, run


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    qrels, run = _random_case(seed)
    ks = (1, 5, 10, 100)
    res = evaluate_run(qrels, run, ndcg_at=ks, recall_at=ks, mrr_at=ks, map_at=ks)
    assert res["num_queries"] == len(qrels)
    assert set(res["per_query"]) == set(qrels)
    for metric, fn in BRUTE.items():
        for k in ks:
            name = f"{metric}@{k}"
            expected = {q: fn(rels, run.get(q, {}), k) for q, rels in qrels.items()}
            for q in qrels:
                assert res["per_query"][q][name] == pytest.approx(expected[q], abs=1e-6), (name, q)
            mean = sum(expected.values()) / len(expected)
            assert res[name] == pytest.approx(mean, abs=1e-6), name


def test_default_metrics_and_missing_queries_count_as_zero():
    qrels = {"a": {"d1": 1}, "b": {"d2": 2}, "c": {"d3": 1}}
    run = {"a": {"d1": 2.0, "d9": 1.0}, "b": {}, "zzz": {"d1": 1.0}}  # "c" absent, "b" empty
    res = evaluate_run(qrels, run)
    assert {"ndcg@10", "recall@100", "mrr@10", "map@100"} <= set(res)
    assert res["num_queries"] == 3
    for name in ("ndcg@10", "recall@100", "mrr@10", "map@100"):
        assert res[name] == pytest.approx(1 / 3)
        assert res["per_query"]["b"][name] == 0.0
        assert res["per_query"]["c"][name] == 0.0
    assert "zzz" not in res["per_query"]


def test_mrr_truncation_respects_ties():
    # d_b and d_a tie; trec_eval ranks d_b first (doc id descending)
    qrels = {"q": {"d_a": 1}}
    run = {"q": {f"x{i:02d}": 10.0 - i for i in range(9)} | {"d_a": 0.5, "d_b": 0.5}}
    res = evaluate_run(qrels, run, mrr_at=(10, 11))
    assert rank_docs(run["q"])[9][0] == "d_b"
    assert res["mrr@10"] == 0.0
    assert res["mrr@11"] == pytest.approx(1 / 11)


def test_empty_qrels_rejected():
    with pytest.raises(ValueError):
        evaluate_run({}, {"q": {"d": 1.0}})


def test_trec_run_roundtrip(tmp_path):
    rng = random.Random(0)
    run = {f"q{q}": {f"doc-{d}": rng.random() * 10 - 5 for d in rng.sample(range(500), 50)} for q in range(5)}
    run["q0"]["tie1"] = run["q0"]["tie2"] = 0.25
    path = write_trec_run(run, tmp_path / "sub" / "run.trec", tag="bm25")
    assert read_trec_run(path) == run  # exact float round trip
    assert not [p for p in path.parent.iterdir() if p.name != "run.trec"]  # no temp files left

    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(v) for v in run.values())
    first = [ln.split() for ln in lines if ln.startswith("q0 ")]
    assert [int(c[3]) for c in first] == list(range(1, len(first) + 1))
    assert all(c[1] == "Q0" and c[5] == "bm25" for c in first)
    scores = [float(c[4]) for c in first]
    assert scores == sorted(scores, reverse=True)
    ties = [c[2] for c in first if c[2].startswith("tie")]
    assert ties == ["tie2", "tie1"]

    # overwriting is atomic and replaces the content
    write_trec_run({"q": {"d": 1.0}}, path)
    assert read_trec_run(path) == {"q": {"d": 1.0}}


def test_trec_run_errors(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run({"q": {"bad id": 1.0}}, tmp_path / "r.trec")
    assert not list(tmp_path.iterdir())
    p = tmp_path / "bad.trec"
    p.write_text("q Q0 d 1 1.0 t\nq Q0 e 2 oops t\n")
    with pytest.raises(DataError, match=r"bad\.trec:2: score 'oops' is not a number"):
        read_trec_run(p)
    p.write_text("q Q0 d 1 1.0\n")
    with pytest.raises(DataError, match=r"bad\.trec:1: expected 6 columns"):
        read_trec_run(p)
