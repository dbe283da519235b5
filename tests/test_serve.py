"""The HTTP search service: validation (4xx, never 500), micro-batching, and a load test against a
real uvicorn server driven from a second process."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from tiny_index import make_encoder, save_model, write_corpus

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from llara.retrieval.index import build_index  # noqa: E402
from llara.retrieval.store import open_index  # noqa: E402
from llara.retrieval.searcher import Searcher  # noqa: E402
from llara.serve.app import create_app  # noqa: E402

LOAD_REQUESTS = 500  # bounded for the test suite; the 2,000-request run is in benchmarks/index_bench.py


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = save_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n=40)
    return build_index(make_encoder(), corpus, root / "index", model_spec=str(model), shard_size=16)


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher(make_encoder(), open_index(index_dir))


@pytest.fixture(scope="module")
def client(searcher):
    app = create_app(searcher, max_k=50, max_query_chars=200, max_body_bytes=4096, max_batch=8)
    with TestClient(app) as c:
        yield c


def test_search_single_and_batch(client, searcher):
    r = client.post("/search", json={"query": "fish in the river", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    want = searcher.search("fish in the river", k=3)[0]
    assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in want]
    assert [h["title"] for h in body["hits"]] == [h.title for h in want]
    assert body["hits"][0]["score"] == pytest.approx(want[0].score, abs=1e-5)
    r = client.post("/search", json={"queries": ["the brain", "capital city"]})
    assert r.status_code == 200 and [len(x["hits"]) for x in r.json()["results"]] == [10, 10]
    assert client.get("/health").json() == {"status": "ok", "passages": 40}
    info = client.get("/info").json()
    assert info["passages"] == 40 and info["limits"]["max_k"] == 50 and "spec" not in json.dumps(info)


@pytest.mark.parametrize("body,status,message", [
    (b'{"query": "a"', 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"", 422, "request body is empty"),
    (b"[1, 2]", 422, "request body: Input should be a valid dictionary"),
    (b'{"query": 3}', 422, "query: Input should be a valid string"),
    (b'{"queries": "abc"}', 422, "queries: Input should be a valid list"),
    (b'{"queries": ["a", 1]}', 422, "queries.1: Input should be a valid string"),
    (b'{"query": "a", "k": "3"}', 422, "k: Input should be a valid integer"),
    (b'{"query": "a", "k": 2.5}', 422, "k: Input should be a valid integer"),
    (b'{"query": "a", "k": true}', 422, "k: Input should be a valid integer"),
    (b'{"query": ""}', 422, "query: String should have at least 1 character"),
    (b'{"query": "  \\n "}', 422, "query: the query is empty"),
    (b'{"queries": []}', 422, "queries: List should have at least 1 item"),
    (b'{"queries": ["ok", " "]}', 422, "queries.1: the query is empty (only whitespace)"),
    (b'{"queries": ["a","b","c","d","e","f","g","h","i"]}', 422, "queries: List should have at most 8 items"),
    (b'{"query": "a", "k": 0}', 422, "k: Input should be greater than or equal to 1"),
    (b'{"query": "a", "k": -3}', 422, "k: Input should be greater than or equal to 1"),
    (b'{"query": "a", "k": 51}', 422, "k: Input should be less than or equal to 50"),
    (b'{"query": "a", "k": 100000000000000000000000}', 422, "k: Input should be less than or equal to 50"),
    (json.dumps({"query": "x" * 201}).encode(), 422, "query: String should have at most 200 characters"),
    (json.dumps({"queries": ["x" * 201]}).encode(), 422, "queries.0: String should have at most 200 characters"),
    (b'{"query": "a", "path": "/etc/passwd"}', 422, "path: Extra inputs are not permitted"),
    (b"{}", 422, "give exactly one of 'query'"),
    (b'{"query": "a", "queries": ["b"]}', 422, "give exactly one of 'query'"),
    (b'{"query": null}', 422, "'query' may not be null"),
    (json.dumps({"query": "x" * 5000}).encode(), 413, "over the limit of 4096 bytes"),
])
def test_malformed_requests_get_4xx_with_a_message(client, body, status, message):
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_content_type_size_and_method_errors(client):
    r = client.post("/search", content=b'{"query": "a"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]

    def chunks():  # no Content-Length: the bytes actually received are counted
        for _ in range(10):
            yield b" " * 500

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = client.post("/search", content=b'{"query": "a"}',
                    headers={"content-type": "application/json", "content-length": "999999"})
    assert r.status_code == 413
    assert client.get("/search").status_code == 405
    assert client.get("/nope").json() == {"error": "Not Found"}


def test_concurrent_requests_share_encoder_calls(searcher):
    app = create_app(searcher, max_batch=32, max_wait_ms=200)
    queries = [f"the {w} study" for w in ("fish", "brain", "heart", "city", "river", "water")] * 4

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            rs = await asyncio.gather(*(c.post("/search", json={"query": q, "k": 1 + i % 5})
                                        for i, q in enumerate(queries)))
            return rs, (await c.get("/info")).json()

    rs, info = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    for i, (q, r) in enumerate(zip(queries, rs)):
        want = searcher.search(q, k=1 + i % 5)[0]
        assert [h["doc_id"] for h in r.json()["hits"]] == [h.doc_id for h in want]
    assert info["queries_answered"] == len(queries) and info["batches"] < len(queries) / 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_from_a_second_process(index_dir, tmp_path):
    """A real uvicorn server in one process, an httpx client in another: every request answered,
    server memory flat."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "llara.cli", "serve", "--index", str(index_dir),
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start in 60 s"
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "llara.serve.loadtest", "--url", url, "--requests",
                              str(LOAD_REQUESTS), "--concurrency", "16", "--pid", str(server.pid)],
                             env=env, capture_output=True, text=True, timeout=120)
        result = json.loads(out.stdout)
        assert result["statuses"] == {"200": LOAD_REQUESTS}, result
        growth = result["rss_mb"].get("growth_first_to_last_quarter")
        if growth is not None:  # Linux: /proc is readable
            assert growth < 50, result["rss_mb"]
        assert out.returncode == 0
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
