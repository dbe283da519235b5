"""Fusion of a dense and a BM25 run: hand computations, brute force, ties, empty and one-sided runs."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from llara.retrieval.fusion import FusionConfig, fuse, linear, normalize, rrf

DENSE = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
BM25 = {"q": {"b": 10.0, "d": 4.0, "a": 2.0}}


def test_linear_minmax_by_hand():
    # dense min-max: a 1, b 0.5, c 0; bm25: b 1, d 0.25, a 0; c is missing from bm25 -> 0, d from dense -> 0
    got = linear(DENSE, BM25, 0.3)["q"]
    assert list(got) == ["b", "a", "d", "c"]
    assert got == pytest.approx({"b": 0.3 * 0.5 + 0.7, "a": 0.3, "d": 0.7 * 0.25, "c": 0.0})


def test_linear_zscore_by_hand():
    dense = {"q": {"a": 3.0, "b": 1.0}}
    bm25 = {"q": {"b": 5.0, "c": 1.0, "d": 3.0}}  # mean 3, sd sqrt(8/3)
    sd = math.sqrt(8 / 3)
    got = linear(dense, bm25, 0.5, normalization="zscore")["q"]
    want = {"a": 0.5 * 1 + 0.5 * (-2 / sd), "b": 0.5 * -1 + 0.5 * (2 / sd),
            "c": 0.5 * -1 + 0.5 * (-2 / sd), "d": 0.5 * -1 + 0.5 * 0}  # missing -> that run's minimum
    assert got == pytest.approx(want)
    assert list(got) == sorted(want, key=lambda d: (want[d], d), reverse=True)


def test_rrf_by_hand():
    got = rrf(DENSE, BM25)["q"]  # dense ranks a1 b2 c3; bm25 ranks b1 d2 a3
    assert got == pytest.approx({"b": 1 / 62 + 1 / 61, "a": 1 / 61 + 1 / 63, "d": 1 / 62, "c": 1 / 63})
    assert list(got) == ["b", "a", "d", "c"]
    assert rrf(DENSE, BM25, rrf_k=0)["q"]["b"] == pytest.approx(1 / 2 + 1)


def test_depth_cuts_each_run_before_normalising():
    # depth 2: dense {a 1, b 0}, bm25 {b 1, d 0}; c and the bm25 score of a are not candidates
    got = linear(DENSE, BM25, 0.3, depth=2)["q"]
    assert got == pytest.approx({"b": 0.7, "a": 0.3, "d": 0.0})
    assert set(rrf(DENSE, BM25, depth=1)["q"]) == {"a", "b"}


def test_k_keeps_the_best():
    assert list(linear(DENSE, BM25, 0.3, k=2)["q"]) == ["b", "a"]
    assert list(rrf(DENSE, BM25, k=1)["q"]) == ["b"]


def test_ties_break_by_doc_id_descending_like_trec_eval():
    dense = {"q": {"x": 1.0, "y": 1.0, "z": 1.0}}  # all equal -> all normalise to 0
    assert list(linear(dense, {}, 0.5)["q"]) == ["z", "y", "x"]
    # a tie between the two runs' contributions
    got = linear({"q": {"m": 1.0, "n": 0.0}}, {"q": {"n": 1.0, "m": 0.0}}, 0.5)["q"]
    assert got == {"n": 0.5, "m": 0.5} and list(got) == ["n", "m"]
    assert list(rrf({"q": {"m": 2.0}}, {"q": {"n": 2.0}})["q"]) == ["n", "m"]
    # and the same answer whatever the order of the input dicts
    a = linear({"q": dict(reversed(list(dense["q"].items())))}, {}, 0.5)
    assert list(a["q"]) == ["z", "y", "x"]


def test_empty_and_one_sided_runs():
    assert linear({}, {}) == {} and rrf({}, {}) == {}
    assert linear({"q": {}}, {"q": {}}) == {"q": {}}
    # only one run has the query (or results for it): the fused ranking is that run's
    for alpha in (0.3, 0.7):
        assert list(linear(DENSE, {"q": {}}, alpha)["q"]) == ["a", "b", "c"]
        assert list(linear({}, BM25, alpha)["q"]) == ["b", "d", "a"]
    # with no weight on the one run there is, every candidate ties at 0: doc id order
    assert list(linear(DENSE, {"q": {}}, 0.0)["q"]) == ["c", "b", "a"]
    assert list(rrf(DENSE, {})["q"]) == ["a", "b", "c"]
    # queries from either run are all kept
    assert set(linear({"q1": {"a": 1.0}}, {"q2": {"b": 1.0}})) == {"q1", "q2"}


def test_alpha_extremes_give_each_run_alone():
    # alpha 1: the dense order; d (not in dense) gets dense's minimum and ties with c (d > c by id)
    assert list(linear(DENSE, BM25, 1.0)["q"]) == ["a", "b", "d", "c"]
    assert list(linear(DENSE, BM25, 0.0)["q"]) == ["b", "d", "c", "a"]  # c ties a at bm25's minimum


def _brute_linear(dense, bm25, alpha, depth, norm):
    """Independent implementation with numpy arrays and np.lexsort."""
    out = {}
    for qid in set(dense) | set(bm25):
        cols = []
        for run in (dense.get(qid, {}), bm25.get(qid, {})):
            items = sorted(run.items(), key=lambda x: (x[1], x[0]), reverse=True)[:depth]
            v = np.array([s for _, s in items], dtype=np.float64)
            if len(v) == 0:
                cols.append({})
                continue
            if norm == "minmax":
                v = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)
            else:
                v = (v - v.mean()) / v.std() if v.std() > 0 else np.zeros_like(v)
            cols.append(dict(zip([d for d, _ in items], v)))
        docs = sorted(set(cols[0]) | set(cols[1]))
        mins = [min(c.values()) if c else 0.0 for c in cols]
        s = np.array([alpha * cols[0].get(d, mins[0]) + (1 - alpha) * cols[1].get(d, mins[1]) for d in docs])
        out[qid] = {d: float(x) for d, x in zip(docs, s)}
    return out


@pytest.mark.parametrize("seed", range(8))
def test_linear_and_rrf_match_brute_force(seed):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(30)]
    dense = {f"q{j}": {d: rng.choice([rng.random(), 0.5]) for d in rng.sample(docs, rng.randint(0, 20))}
             for j in range(6)}
    bm25 = {f"q{j}": {d: float(rng.randint(1, 5)) for d in rng.sample(docs, rng.randint(0, 20))}
            for j in range(2, 8)}
    depth = rng.choice([3, 10, None])
    for norm in ("minmax", "zscore"):
        alpha = rng.random()
        got = linear(dense, bm25, alpha, normalization=norm, depth=depth)
        want = _brute_linear(dense, bm25, alpha, depth or 10**6, norm)
        assert set(got) == set(want)
        for q in want:
            assert got[q] == pytest.approx(want[q], abs=1e-12)
            order = sorted(want[q], key=lambda d: (round(want[q][d], 12), d), reverse=True)
            assert [d for d in got[q]] == order
    got = rrf(dense, bm25, depth=depth)
    for q in got:
        want = {}
        for run in (dense.get(q, {}), bm25.get(q, {})):
            ranked = sorted(run, key=lambda d: (run[d], d), reverse=True)[:depth]
            for r, d in enumerate(ranked, 1):
                want[d] = want.get(d, 0.0) + 1 / (60 + r)
        assert got[q] == pytest.approx(want)


def test_fuse_uses_config_and_candidate_depth():
    cfg = FusionConfig(method="linear", alpha=0.3, depth=2)
    assert fuse(DENSE, BM25, cfg) == linear(DENSE, BM25, 0.3, depth=2)
    # k above depth widens the candidates to k
    assert fuse(DENSE, BM25, cfg, k=3) == linear(DENSE, BM25, 0.3, depth=3, k=3)
    assert fuse(DENSE, BM25, FusionConfig(method="rrf", rrf_k=10)) == rrf(DENSE, BM25, rrf_k=10)
    assert FusionConfig().candidate_depth(10) >= 100 and FusionConfig().candidate_depth(500) == 500


@pytest.mark.parametrize("bad", [dict(method="max"), dict(alpha=1.5), dict(alpha=-0.1), dict(alpha="0.3"),
                                 dict(normalization="l2"), dict(rrf_k=-1), dict(rrf_k=float("inf")),
                                 dict(depth=0), dict(depth=2.5)])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("method", "fusion")):
        FusionConfig(**bad)


def test_config_round_trip_and_bad_inputs():
    cfg = FusionConfig(method="rrf", rrf_k=20, depth=50)
    assert FusionConfig.from_dict(cfg.to_dict()) == cfg and FusionConfig.from_dict(None) == FusionConfig()
    with pytest.raises(ValueError, match="unknown fusion setting"):
        FusionConfig.from_dict({"beta": 1})
    with pytest.raises(ValueError, match="not finite"):
        linear({"q": {"a": float("nan")}}, {})
    with pytest.raises(ValueError, match="k must be"):
        linear(DENSE, BM25, k=0)
    assert normalize({}) == {}
