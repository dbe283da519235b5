"""Hybrid retrieval everywhere: evaluation (one BM25 and one encoder pass), the index's BM25 half,
search modes, the service, and the old dense-only indexes."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil

import pytest
from tiny import make_model, make_tokenizer
from tiny_index import index_setup

import llara.retrieval.bm25 as bm25_module
from llara.cli import main
from llara.data.beir import load_beir, load_corpus
from llara.io import DataError
from llara.evaluation.metrics import evaluate_run, read_trec_run
from llara.evaluation.runner import evaluate_datasets
from llara.modeling.encoder import Encoder
from llara.retrieval.bm25 import bm25_search
from llara.retrieval.fusion import FusionConfig, fuse, linear
from llara.retrieval.index import build_index, merge_indexes
from llara.retrieval.searcher import Searcher
from llara.retrieval.store import open_index

QUERIES = ["the retrieval of a passage", "fish in the river water", "capital city of france", "brain cell study"]


# ---------------------------------------------------------------------------------------- evaluation
@pytest.fixture
def counted_encoder(monkeypatch):
    """A tiny encoder whose encoder passes and BM25 passes are counted."""
    enc = Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False,
                  max_query_length=32, max_passage_length=64)
    calls = {"encode": 0, "bm25": 0}
    encode_multi = enc.encode_multi

    def counting(*a, **kw):
        calls["encode"] += 1
        return encode_multi(*a, **kw)

    monkeypatch.setattr(enc, "encode_multi", counting)
    search = bm25_module.bm25_search

    def counting_bm25(*a, **kw):
        calls["bm25"] += 1
        return search(*a, **kw)

    monkeypatch.setattr(bm25_module, "bm25_search", counting_bm25)
    return enc, calls


def test_evaluate_bm25_dense_hybrid_encodes_once(adi_dir, counted_encoder, tmp_path):
    enc, calls = counted_encoder
    fusion = FusionConfig(alpha=0.4, depth=50)
    pairs = evaluate_datasets([adi_dir], ["bm25", "dense", "hybrid"], tmp_path, encoder=lambda: enc,
                              templates=["llara", "mean"], k=20, fusion=fusion)
    assert calls == {"encode": 2, "bm25": 1}  # queries once and corpus once, for both templates; BM25 once
    labels = [r.label for r, _ in pairs]
    assert labels == ["bm25", "model:llara", "model:mean", "hybrid:model:llara", "hybrid:model:mean"]
    (b_res, b_run), (d_res, d_run), _, (h_res, h_run), _ = pairs
    # bm25 and dense were retrieved 50 deep for the fusion, and are reported and saved at k=20
    assert all(len(docs) <= 20 for docs in b_run.values()) and b_res.settings["k"] == 20
    assert b_res.metrics["ndcg@10"] == pytest.approx(evaluate_run(load_beir(adi_dir).qrels, b_run)["ndcg@10"])
    ds = load_beir(adi_dir)
    deep_b = bm25_search(ds.corpus, ds.queries, k=50)
    assert h_run == linear(d_run_deep(pairs, enc, ds), deep_b, 0.4, depth=50, k=20)
    m = json.loads((tmp_path / "adi" / "hybrid__model__llara" / "metrics.json").read_text())
    assert m["retrieval"] == "hybrid" and m["settings"]["fusion"] == fusion.to_dict()
    assert m["settings"]["depth"] == {"bm25": 50, "dense": 50} and m["settings"]["k"] == 20
    assert m["metrics"]["ndcg@10"] == pytest.approx(h_res.metrics["ndcg@10"])
    trec = read_trec_run(tmp_path / "adi" / "hybrid__model__llara" / "run.trec")
    assert {q: list(d) for q, d in trec.items() if d} == {q: list(d) for q, d in h_run.items() if d}
    summary = (tmp_path / "summary.md").read_text()
    assert "| dataset | bm25 | model:llara | model:mean | hybrid:model:llara | hybrid:model:mean |" in summary
    assert f"| adi | {b_res.metrics['ndcg@10']:.4f} | {d_res.metrics['ndcg@10']:.4f} |" in summary


def d_run_deep(pairs, enc, ds):
    """The llara dense run, 50 deep, recomputed independently of the runner."""
    from llara.evaluation.runner import evaluate_dense

    return evaluate_dense(ds, enc, ["llara"], k=50)[0][1]


def test_hybrid_only_still_one_pass_each_and_rrf(adi_dir, counted_encoder, tmp_path):
    enc, calls = counted_encoder
    pairs = evaluate_datasets([adi_dir], ["hybrid"], tmp_path, encoder=lambda: enc, templates=["llara"],
                              fusion=FusionConfig(method="rrf", rrf_k=10))
    assert calls == {"encode": 2, "bm25": 1} and [r.label for r, _ in pairs] == ["hybrid:model:llara"]
    assert pairs[0][0].settings["fusion"]["method"] == "rrf"
    assert not (tmp_path / "adi" / "bm25").exists()  # only what was asked for is written


def test_cli_evaluate_hybrid_and_bad_fusion(adi_dir, tmp_path, capsys):
    ckpt = Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False,
                   max_query_length=32, max_passage_length=64).save(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(ckpt), "--dataset", str(adi_dir), "--method", "bm25", "--method", "dense",
               "--method", "hybrid", "--fusion", "linear", "--alpha", "0.6", "--depth", "120", "--output", str(out),
               "--no-cache"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "side by side" in printed and "hybrid:ckpt:llara" in printed
    m = json.loads((out / "adi" / "hybrid__ckpt__llara" / "metrics.json").read_text())
    assert m["settings"]["fusion"]["alpha"] == 0.6 and m["settings"]["depth"] == {"bm25": 120, "dense": 120}
    assert main(["evaluate", "--method", "hybrid", "--model", str(ckpt), "--dataset", str(adi_dir), "--alpha", "1.5",
                 "--output", str(out), "--no-cache"]) == 2
    assert "alpha must be a number in [0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- index
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    b = index_setup(tmp_path_factory.mktemp("hybrid"), 30, 8, fusion=FusionConfig(alpha=0.4, depth=12))
    return {**b, "index": b["ref"]}


def test_index_has_checksummed_bm25_and_fusion(built):
    m = json.loads((built["index"] / "manifest.json").read_text())
    entry = m["bm25"]
    assert entry["documents"] == 30 and entry["path"] == "bm25" and entry["stemmer"] == "PyStemmer english"
    assert {f["path"] for f in entry["files"].values()} == {f"bm25/{p.name}" for p in (built["index"] / "bm25").iterdir()}
    assert all(len(f["sha256"]) == 64 for f in entry["files"].values())
    assert m["fusion"] == FusionConfig(alpha=0.4, depth=12).to_dict()
    assert not list(built["index"].rglob("*.tmp"))


def test_bm25_mode_equals_evaluation_bm25(built):
    s = Searcher.from_index(built["index"])
    corpus = load_corpus(built["corpus"])
    want = bm25_search(corpus, {str(i): q for i, q in enumerate(QUERIES)}, k=7)
    got = s.search(QUERIES, k=7, mode="bm25")
    for i, hits in enumerate(got):
        assert {h.doc_id: h.score for h in hits} == pytest.approx(want[str(i)])


def test_hybrid_search_equals_library_fusion_of_the_two_runs(built):
    s = Searcher.from_index(built["index"])
    assert s.default_mode == "hybrid" and s.fusion == FusionConfig(alpha=0.4, depth=12)
    for fusion, k in ((None, 5), (FusionConfig(method="rrf", depth=12), 5), (None, 20)):
        cfg = fusion or s.fusion
        depth = cfg.candidate_depth(k)
        dense = {str(i): {h.doc_id: h.score for h in hits} for i, hits in enumerate(s.search(QUERIES, depth, mode="dense"))}
        lex = {str(i): {h.doc_id: h.score for h in hits} for i, hits in enumerate(s.search(QUERIES, depth, mode="bm25"))}
        want = fuse(dense, lex, cfg, k=k)
        got = s.search(QUERIES, k=k, fusion=fusion)
        titles = dict(zip(s.index.ids, s.index.titles))
        for i, hits in enumerate(got):
            assert [(h.doc_id, h.score) for h in hits] == list(want[str(i)].items())
            assert all(h.title == titles[h.doc_id] for h in hits)
    with pytest.raises(ValueError, match="unknown mode"):
        s.search(QUERIES, mode="sparse")


def test_resume_keeps_bm25_and_corruption_is_named(built, tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    shutil.copytree(built["index"], idx)
    import llara.retrieval.lexical as lexical

    calls = []
    real = lexical.build_bm25
    monkeypatch.setattr(lexical, "build_bm25", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    build_index(built["encoder"], built["corpus"], idx, model_spec=str(built["model"]), shard_size=8, resume=True)
    assert calls == []  # intact: kept
    victim = next((idx / "bm25").glob("*.npy"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DataError, match="BM25 index file does not match its checksum"):
        Searcher.from_index(idx)
    build_index(built["encoder"], built["corpus"], idx, model_spec=str(built["model"]), shard_size=8, resume=True)
    assert calls == [1]  # corrupt: rebuilt
    assert len(Searcher.from_index(idx).search("fish", mode="bm25")[0]) > 0


def test_merged_parts_get_bm25_too(built, tmp_path):
    parts = [build_index(built["encoder"], built["corpus"], tmp_path / f"part{i}", model_spec=str(built["model"]),
                         shard_size=8, shard=(i, 2)) for i in range(2)]
    assert all("bm25" not in json.loads((p / "manifest.json").read_text()) for p in parts)
    merged = merge_indexes(parts, tmp_path / "merged", fusion=FusionConfig(alpha=0.4, depth=12))
    one, two = Searcher.from_index(built["index"]), Searcher.from_index(merged)
    assert two.default_mode == "hybrid" and one.search(QUERIES, k=6) == two.search(QUERIES, k=6)
    bm25_files = sorted(p.name for p in (built["index"] / "bm25").iterdir())
    assert bm25_files == sorted(p.name for p in (merged / "bm25").iterdir())
    assert all((merged / "bm25" / f).read_bytes() == (built["index"] / "bm25" / f).read_bytes() for f in bm25_files)


def test_no_bm25_and_old_index_serve_dense(built, tmp_path, capsys):
    out = tmp_path / "nobm25"
    assert main(["index", "--model", str(built["model"]), "--corpus", str(built["corpus"]), "--output", str(out),
                 "--no-bm25"]) == 0
    assert "bm25" not in json.loads((out / "manifest.json").read_text()) and not (out / "bm25").exists()
    # an index written before hybrid search: no "bm25" or "fusion" in its manifest
    old = tmp_path / "old"
    shutil.copytree(built["index"], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["bm25"], m["fusion"]
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "bm25")
    for d in (out, old):
        s = Searcher.from_index(d)
        assert s.modes == ("dense",) and s.default_mode == "dense" and s.info()["fusion"] is None
        assert s.search(QUERIES, k=3) == s.search(QUERIES, k=3, mode="dense")
        with pytest.raises(ValueError, match="needs a BM25 index"):
            s.search(QUERIES, mode="hybrid")
    capsys.readouterr()
    assert main(["search", "--index", str(old), "--json", "-k", "2", "fish"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 2
    assert main(["search", "--index", str(old), "--mode", "bm25", "fish"]) == 2
    assert "needs a BM25 index" in capsys.readouterr().err


def test_cli_search_modes(built, capsys):
    s = Searcher.from_index(built["index"])
    for mode in ("dense", "bm25", "hybrid"):
        capsys.readouterr()
        assert main(["search", "--index", str(built["index"]), "--json", "-k", "4", "--mode", mode, QUERIES[1]]) == 0
        got = json.loads(capsys.readouterr().out)["hits"]
        assert [h["doc_id"] for h in got] == [h.doc_id for h in s.search(QUERIES[1], k=4, mode=mode)[0]]
    assert main(["search", "--index", str(built["index"]), "--json", "--alpha", "0.9", QUERIES[1]]) == 0
    got = json.loads(capsys.readouterr().out)["hits"]
    want = s.search(QUERIES[1], fusion=FusionConfig(alpha=0.9, depth=12))[0]
    assert [h["doc_id"] for h in got] == [h.doc_id for h in want]
    assert main(["search", "--index", str(built["index"]), "--mode", "dense", "--alpha", "0.5", "x"]) == 2
    assert main(["search", "--index", str(built["index"]), "--alpha", "7", "x"]) == 2


# ---------------------------------------------------------------------------------------- service
httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def client(built):
    from fastapi.testclient import TestClient

    from llara.serve.app import create_app

    searcher = Searcher.from_index(built["index"])
    with TestClient(create_app(searcher, max_batch=8)) as c:
        yield c, searcher


def test_serve_modes_equal_the_searcher(client):
    c, s = client
    for body, mode in (({}, "hybrid"), ({"mode": "dense"}, "dense"), ({"mode": "bm25"}, "bm25"),
                       ({"mode": "hybrid", "fusion": "rrf", "rrf_k": 5}, "hybrid"), ({"alpha": 0.8}, "hybrid")):
        r = c.post("/search", json={"query": QUERIES[0], "k": 4, **body})
        assert r.status_code == 200, r.text
        assert r.json()["mode"] == mode
        fusion = {k.replace("fusion", "method"): v for k, v in body.items() if k != "mode"}
        want = s.search(QUERIES[0], k=4, mode=mode,
                        fusion=FusionConfig(**{**s.fusion.to_dict(), **fusion}) if fusion else None)[0]
        assert [(h["doc_id"], h["score"]) for h in r.json()["hits"]] == [(h.doc_id, pytest.approx(h.score)) for h in want]
    info = c.get("/info").json()
    assert info["default_mode"] == "hybrid" and info["modes"] == ["dense", "bm25", "hybrid"]
    assert info["fusion"] == s.fusion.to_dict() and info["bm25"]["documents"] == 30


def test_a_query_without_a_bm25_term_is_logged_at_debug_only(client, caplog):
    # per query: at INFO, a client would decide how fast the service's log grows
    c = client[0]
    caplog.set_level(logging.INFO, logger="llara")
    for body in ({"query": "the of and"}, {"queries": ["zzzq", "the"], "mode": "bm25"}):
        r = c.post("/search", json={"k": 3, **body})
        assert r.status_code == 200, r.text
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO] == []
    caplog.set_level(logging.DEBUG, logger="llara.retrieval.bm25")
    assert c.post("/search", json={"query": "the of and", "k": 3}).status_code == 200
    assert [rec.levelno for rec in caplog.records if "no term in the BM25 vocabulary" in rec.getMessage()] == [
        logging.DEBUG]


@pytest.mark.parametrize("body,message", [
    ({"mode": "sparse"}, "mode: Input should be 'dense', 'bm25' or 'hybrid'"),
    ({"alpha": 1.5}, "alpha: Input should be less than or equal to 1"),
    ({"alpha": "0.5"}, "alpha: Input should be a valid number"),
    ({"fusion": "max"}, "fusion: Input should be 'linear' or 'rrf'"),
    ({"rrf_k": -1}, "rrf_k: Input should be greater than or equal to 0"),
    ({"mode": "dense", "alpha": 0.5}, "alpha: only for mode 'hybrid'"),
    ({"mode": "bm25", "fusion": "rrf"}, "fusion: only for mode 'hybrid'"),
])
def test_serve_bad_modes_and_params_get_422(client, body, message):
    r = client[0].post("/search", json={"query": "fish", **body})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


def test_serve_old_index_dense_and_hybrid_is_422(built, tmp_path):
    from fastapi.testclient import TestClient

    from llara.serve.app import create_app

    s = Searcher(built["encoder"], open_index(built["index"]))  # no BM25 given: dense only
    with TestClient(create_app(s)) as c:
        r = c.post("/search", json={"query": "fish", "k": 2})
        assert r.status_code == 200 and r.json()["mode"] == "dense"
        r = c.post("/search", json={"query": "fish", "mode": "hybrid"})
        assert r.status_code == 422 and "needs a BM25 index" in r.json()["error"]


def test_concurrent_hybrid_requests_share_encoder_calls(built):
    from llara.serve.app import create_app

    s = Searcher.from_index(built["index"])
    encodes = []
    real = s.encoder.encode
    s.encoder.encode = lambda texts, *a, **kw: encodes.append(len(texts)) or real(texts, *a, **kw)
    app = create_app(s, max_batch=32, max_wait_ms=200)
    bodies = [{"query": q, "k": 3, **m} for q in QUERIES for m in ({}, {"mode": "dense"}, {"mode": "bm25"},
                                                                      {"alpha": 0.9})]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/search", json=b) for b in bodies))

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    assert sum(encodes) == 12 and len(encodes) < 12 / 2  # the bm25 requests need no encoding
    for b, r in zip(bodies, rs):
        fusion = FusionConfig(**{**s.fusion.to_dict(), "alpha": b["alpha"]}) if "alpha" in b else None
        want = s.search(b["query"], k=3, mode=b.get("mode"), fusion=fusion)[0]
        assert [h["doc_id"] for h in r.json()["hits"]] == [h.doc_id for h in want]
