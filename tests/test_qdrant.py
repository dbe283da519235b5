"""The Qdrant backend in embedded mode (offline): export, search, serve give the FAISS Flat results on the
same vectors; an export killed with SIGKILL and run again leaves every passage exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from tiny_index import make_encoder, save_model, write_corpus

pytest.importorskip("qdrant_client", reason="the qdrant extra: pip install -e '.[qdrant]'")

from llara.io import DataError  # noqa: E402
from llara.retrieval.index import build_index  # noqa: E402
from llara.retrieval.store import open_index  # noqa: E402
from llara.retrieval.qdrant import connect, export_to_qdrant, open_qdrant, point_id  # noqa: E402
from llara.retrieval.searcher import Searcher  # noqa: E402

QUERIES = ["fish in the river", "the capital city of france", "blood cell study", "dense retrieval model",
           "a large language model", "water plant", "heart and brain", "the paper method result"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qdrant")
    model = save_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n=40)
    index = build_index(make_encoder(), corpus, root / "index", model_spec=str(model), shard_size=8)
    uri = str(root / "qdrant")
    meta = export_to_qdrant(index, uri)
    return {"root": root, "model": model, "corpus": corpus, "index": index, "uri": uri, "meta": meta}


def test_collection_records_model_and_template(setup):
    meta, manifest = setup["meta"], json.loads((setup["index"] / "manifest.json").read_text())
    assert meta["complete"] and meta["count"] == 40 and meta["model"] == manifest["model"]
    assert meta["model"]["template"]["name"] == "eos" and meta["dimension"] == manifest["dimension"]
    assert sorted(meta["exported_shards"], key=int) == [str(n) for n in range(5)]


@pytest.mark.parametrize("params", [None, "exact=1"])
def test_search_equals_faiss_flat(setup, params):
    faiss_index = open_index(setup["index"])
    q = make_encoder().encode(QUERIES, "query")
    index = open_qdrant(setup["uri"])
    try:
        index.set_params(params)
        assert len(index) == 40 and index.dimension == faiss_index.dimension
        for k in (10, 3, 100):
            fs, fr = faiss_index.search(q, k)
            qs, qr = index.search(q, k)
            assert qr.shape == fr.shape == (len(QUERIES), min(k, 40))
            for i in range(len(QUERIES)):
                assert set(qr[i]) == set(fr[i])  # top-k overlap 100%
                np.testing.assert_allclose(qs[i], fs[i], atol=1e-5)  # same scores, best first
                assert [index.ids[r] for r in qr[i]] == [faiss_index.ids[r] for r in qr[i]]
                assert [index.titles[r] for r in qr[i]] == [faiss_index.titles[r] for r in qr[i]]
        index._cache.clear()  # rows not seen in a search are fetched by their payload
        assert [index.ids[r] for r in (0, 17, 39)] == [faiss_index.ids[r] for r in (0, 17, 39)]
    finally:
        index.close()


def test_searcher_and_serve_through_qdrant(setup):
    from fastapi.testclient import TestClient

    from llara.serve.app import create_app

    want = Searcher(make_encoder(), open_index(setup["index"])).search(QUERIES, k=10)
    index = open_qdrant(setup["uri"])
    try:
        searcher = Searcher(make_encoder(), index)
        got = searcher.search(QUERIES, k=10)
        for g, w in zip(got, want):
            assert {h.doc_id for h in g} == {h.doc_id for h in w}
            assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-5)
        assert searcher.info()["factory"] == "qdrant" and searcher.info()["passages"] == 40
        with TestClient(create_app(searcher, max_batch=4)) as client:
            r = client.post("/search", json={"queries": QUERIES[:3], "k": 5})
            assert r.status_code == 200, r.text
            for res, w in zip(r.json()["results"], want):
                assert [h["doc_id"] for h in res["hits"]] == [h.doc_id for h in searcher.search(res["query"], 5)[0]]
                assert {h["doc_id"] for h in res["hits"]} == {h.doc_id for h in w[:5]}
            assert client.get("/health").json() == {"status": "ok", "passages": 40}
    finally:
        index.close()


def test_cli_index_and_search_with_qdrant(setup, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    uri = str(tmp_path / "db")
    llara = [sys.executable, "-m", "llara.cli"]
    r = subprocess.run([*llara, "index", "--backend", "qdrant", "--uri", uri, "--collection", "demo", "--corpus",
                        str(setup["corpus"]), "--output", str(tmp_path / "idx"), "--model", str(setup["model"]),
                        "--shard-size", "8"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "idx" / "index.faiss").exists()  # the shards only: the vectors are served by Qdrant
    with pytest.raises(DataError, match="no FAISS file"):
        open_index(tmp_path / "idx")

    def search(*where):
        r = subprocess.run([*llara, "search", *where, "--json", "-k", "5", *QUERIES[:3]], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(line) for line in r.stdout.splitlines()]

    got = search("--backend", "qdrant", "--uri", uri, "--collection", "demo", "--search-params", "exact=1")
    want = search("--index", str(setup["index"]), "--mode", "dense")  # Qdrant serves dense search only
    assert [[h["doc_id"] for h in x["hits"]] for x in got] == [[h["doc_id"] for h in x["hits"]] for x in want]
    r = subprocess.run([*llara, "search", "--backend", "qdrant", "--uri", uri, "--collection", "nope", "x"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such collection" in r.stderr


KILLED_EXPORT = """
import os, signal, sys
from llara.retrieval.qdrant import export_to_qdrant

def kill_after_seven_batches(written):
    if written >= 7 * 16:
        os.kill(os.getpid(), signal.SIGKILL)

export_to_qdrant(sys.argv[1], sys.argv[2], batch_size=16, on_batch=kill_after_seven_batches)
"""


def test_export_killed_then_rerun_keeps_every_passage_once(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=300, seed=1)
    index = build_index(make_encoder(), corpus, tmp_path / "index", model_spec="tiny", shard_size=50)
    uri = str(tmp_path / "db")
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(index), uri], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    client = connect(uri)
    partial = client.count("llara", exact=True).count
    assert 0 < partial < 300  # killed in the middle of shard 2
    client.close()
    with pytest.raises(DataError, match="unfinished"):
        open_qdrant(uri)
    written = []
    meta = export_to_qdrant(index, uri, batch_size=16, on_batch=written.append)
    assert meta["complete"] and written[-1] == 200  # shards 0 and 1 were finished: skipped
    client = connect(uri)
    points, offset, seen = [], None, []
    while True:
        points, offset = client.scroll("llara", limit=64, offset=offset, with_payload=True)
        seen += [(str(p.id), p.payload["doc_id"], p.payload["row"]) for p in points]
        if offset is None:
            break
    client.close()
    ids = [doc_id for _, doc_id, _ in seen]
    assert len(ids) == 300 and sorted(ids) == sorted(f"d{i}" for i in range(300))  # each exactly once
    assert sorted(row for _, _, row in seen) == list(range(300))
    assert all(pid == point_id(doc_id) for pid, doc_id, _ in seen)
    # A third run finds everything exported and writes nothing.
    written.clear()
    export_to_qdrant(index, uri, on_batch=written.append)
    assert written == []


def test_refuses_a_collection_of_another_index(setup, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=12, seed=3)
    other = build_index(make_encoder(), corpus, tmp_path / "index", model_spec="tiny", shard_size=4)
    uri = str(tmp_path / "db")
    export_to_qdrant(other, uri)
    with pytest.raises(DataError, match="another index"):
        export_to_qdrant(setup["index"], uri)
