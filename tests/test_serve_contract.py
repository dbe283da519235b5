"""The service's OpenAPI schema is its contract: declared errors with their real body, request
constraints in the schema, 405 for wrong methods, 429 + Retry-After only when the encoder is
saturated (503 means not ready); and schemathesis, driven from the schema against a real uvicorn
server on loopback, finds no violation with all of its checks, on every route."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading

import pytest
from tiny_index import index_setup, make_encoder, start_server

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from llara.retrieval.searcher import Hit, Searcher  # noqa: E402
from llara.retrieval.store import open_index  # noqa: E402
from llara.serve.app import create_app  # noqa: E402
from llara.serve.limits import RequestGuard  # noqa: E402
from llara.serve.schema import NON_BLANK  # noqa: E402

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
SCHEMATHESIS_EXAMPLES = 60  # per operation and phase; the whole run takes ~10 s here


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return index_setup(tmp_path_factory.mktemp("contract"), 30, 16)["ref"]


@pytest.fixture(scope="module")
def client(index_dir):
    app = create_app(Searcher(make_encoder(), open_index(index_dir)), max_k=50, max_query_chars=100, max_batch=4)
    with TestClient(app) as c:
        yield c


def test_schema_declares_errors_with_their_real_body(client):
    spec = client.get("/openapi.json").json()
    search = spec["paths"]["/search"]["post"]["responses"]
    assert set(search) == {"200", "400", "408", "413", "415", "422", "429", "500", "503"}
    for code, resp in search.items():
        if code != "200":
            assert resp["content"]["application/json"]["schema"] == ERROR_REF, code
    assert search["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert search["503"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert {r["$ref"].rsplit("/", 1)[1] for r in search["200"]["content"]["application/json"]["schema"]["anyOf"]} \
        == {"SearchResponse", "BatchSearchResponse"}
    components = spec["components"]["schemas"]
    assert "HTTPValidationError" not in components and components["ErrorBody"]["required"] == ["error"]
    # and the bodies really are that model, whichever layer answers
    for r in (client.post("/search", content=b"{", headers={"content-type": "application/json"}),
              client.post("/search", json={"k": 3}), client.post("/search", content=b"x"),
              client.post("/health"), client.get("/nope"), client.delete("/search")):
        assert set(r.json()) == {"error"} and r.headers["content-type"] == "application/json", r.text


def test_every_error_declares_its_routes_body(client):
    """Errors under /v1 are OpenAI's shape, the others llara's; the schema says which."""
    spec = client.get("/openapi.json").json()
    openai_ref = {"$ref": "#/components/schemas/OpenAIErrorBody"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    want = openai_ref if path.startswith("/v1/") else ERROR_REF
                    assert resp["content"]["application/json"]["schema"] == want, (method, path, code)
    emb = spec["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"404", "422", "429", "503"} <= set(emb) and "Retry-After" in emb["429"]["headers"]
    assert set(spec["paths"]["/ready"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    req = spec["components"]["schemas"]["EmbeddingsRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["input", "model"]
    assert req["properties"]["input_type"]["default"] == "passage"
    assert "vectors stored under the wrong side" in req["properties"]["input_type"]["description"]
    for r in (client.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"}),
              client.post("/v1/embeddings", json={"model": "m"}), client.get("/v1/embeddings"),
              client.get("/v1/models/nope")):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_schema_states_the_request_constraints(client):
    spec = client.get("/openapi.json").json()
    req = spec["components"]["schemas"]["SearchRequest"]
    assert req["oneOf"] == [{"required": ["query"]}, {"required": ["queries"]}]
    assert req["additionalProperties"] is False
    q, qs, k = req["properties"]["query"], req["properties"]["queries"], req["properties"]["k"]
    assert (q["type"], q["minLength"], q["maxLength"], q["pattern"]) == ("string", 1, 100, NON_BLANK)
    assert (qs["type"], qs["minItems"], qs["maxItems"], qs["items"]["minLength"]) == ("array", 1, 4, 1)
    assert (k["type"], k["minimum"], k["maximum"]) == ("integer", 1, 50)
    assert "null" not in str(q) + str(qs)  # null is rejected, so the schema does not allow it
    # the issue's example was schema-valid and got 422; now the schema says it is invalid (oneOf)
    r = client.post("/search", json={"k": 999, "queries": [""], "query": "0"})
    assert r.status_code == 422


@pytest.mark.parametrize("method,path,allow", [("POST", "/health", "GET"), ("POST", "/info", "GET"),
                                               ("GET", "/search", "POST"), ("PUT", "/search", "POST")])
def test_wrong_method_is_405_with_allow(client, method, path, allow):
    r = client.request(method, path, content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 405 and allow in r.headers["allow"] and "error" in r.json()


class _BlockedSearcher:
    """Holds every search until released, like an encoder that is busy."""

    def __init__(self):
        self.release = threading.Event()

    def info(self):
        return {"model_id": "m", "template": "eos", "max_query_length": 8, "passages": 1, "dimension": 2,
                "factory": "Flat", "llara_version": "0"}

    def search(self, queries, k):
        assert self.release.wait(30)
        return [[Hit("d1", 1.0, "")] for _ in queries]

    def search_requests(self, requests):
        return [self.search(r.queries, r.k) for r in requests]

    def plan(self, mode, **fusion):
        return mode or "dense", None


def test_429_with_retry_after_only_when_the_encoder_queue_is_full():
    searcher = _BlockedSearcher()
    app = create_app(searcher, max_batch=2, max_pending=4, max_wait_ms=0)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async with app.router.lifespan_context(app):
                tasks = [asyncio.create_task(c.post("/search", json={"query": f"q{i}"})) for i in range(10)]
                for _ in range(200):  # the 6 over the limit are answered at once
                    if sum(t.done() for t in tasks) == 6:
                        break
                    await asyncio.sleep(0.05)
                rejected = [t.result() for t in tasks if t.done()]
                info = (await c.get("/info")).json()
                searcher.release.set()
                return rejected, await asyncio.gather(*tasks), info

    rejected, responses, info = asyncio.run(go())
    assert len(rejected) == 6 and info["limits"]["max_pending"] == 4
    assert all(r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "saturated" in r.json()["error"]
               for r in rejected)
    assert sorted(r.status_code for r in responses) == [200] * 4 + [429] * 6


def test_body_deadline_answers_408(caplog):
    async def app(scope, receive, send):  # never reached
        raise AssertionError

    guard = RequestGuard(app, json_routes={("POST", "/search")}, max_bytes=100, body_timeout=0.2)
    sent = []

    async def go():
        async def receive():  # the head came, the body never does
            await asyncio.sleep(60)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/search",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"50")]}
        await asyncio.wait_for(guard(scope, receive, send), 10)

    caplog.set_level(logging.DEBUG, logger="llara")
    asyncio.run(go())
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b"did not arrive within 0.2 s" in sent[1]["body"]
    # per request, so DEBUG: at INFO a slow client would decide how fast the log grows
    assert [r.levelno for r in caplog.records if "not received within" in r.getMessage()] == [logging.DEBUG]


def test_schemathesis_finds_no_violation(index_dir, tmp_path):
    pytest.importorskip("schemathesis", reason="the dev extra: pip install -e '.[dev]'")
    server, url = start_server(index_dir, tmp_path / "server.log", "--max-k", "50", "--max-query-chars", "100",
                                "--max-batch", "4", "--max-body-bytes", "8192")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
             "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", "0", "--workers", "1",
             "--request-timeout", "30", "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    finally:
        server.terminate()
        server.wait(timeout=10)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "8 selected / 8 total" in report and "No issues found" in report, report
    generated = re.search(r"(\d+) generated, \1 passed", report)
    assert generated and int(generated.group(1)) >= SCHEMATHESIS_EXAMPLES, report
