"""The service's OpenAI-compatible embeddings and its operations, in-process (FastAPI's TestClient):
/v1/embeddings gives Encoder.encode's vectors on both sides through the search micro-batcher, with
OpenAI's request and error shapes; /v1/models; /metrics; /health and /ready while loading; the API
key; 429 when the queue is full."""
from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest
from tiny import make_model, make_tokenizer
from tiny_index import make_encoder, save_model, write_corpus

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("prometheus_client", reason="the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llara.io import passage_text  # noqa: E402
from llara.modeling.encoder import Encoder  # noqa: E402
from llara.retrieval.index import build_index  # noqa: E402
from llara.retrieval.store import open_index  # noqa: E402
from llara.retrieval.searcher import Hit, Searcher  # noqa: E402
from llara.serve.app import ROUTES, create_app, route_of  # noqa: E402
from llara.serve.readiness import Service  # noqa: E402
from llara.serve.batching import token_counts  # noqa: E402
from llara.serve.metrics import Metrics, MetricsMiddleware  # noqa: E402

QUERIES = ["fish in the river", "the brain and the heart", "capital city"]
PASSAGES = ["the river holds many fish and the water is cold", "a city by the sea", "the heart of the study"]
MODEL = "tiny"


def llara_encoder() -> Encoder:
    """The tiny model with LLaRA's template, whose query and passage sides differ."""
    return Encoder(make_model(), make_tokenizer(), "llara", show_progress=False)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    corpus = write_corpus(root / "corpus.jsonl", n=20)
    index = build_index(llara_encoder(), corpus, root / "index", model_spec=str(save_model(root / "model")),
                        shard_size=8)
    searcher = Searcher(llara_encoder(), open_index(index))
    searcher.corpus_path = corpus  # for the tests' own reference
    return searcher


@pytest.fixture(scope="module")
def client(searcher):
    app = create_app(searcher, model_name=MODEL, max_batch=8, max_inputs=6, max_body_bytes=8192)
    with TestClient(app) as c:
        yield c


def embed(client, input, **kw):
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": input, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def vectors(body) -> np.ndarray:
    rows = []
    for i, d in enumerate(body["data"]):
        assert d["object"] == "embedding" and d["index"] == i
        e = d["embedding"]
        rows.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.array(e, np.float32))
    return np.stack(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("side,texts", [("query", QUERIES), ("passage", PASSAGES)])
def test_vectors_are_encoder_encode_on_both_sides(client, searcher, side, texts, encoding_format):
    body = embed(client, texts, input_type=side, encoding_format=encoding_format)
    got, want = vectors(body), searcher.encoder.encode(texts, side)
    assert got.shape == want.shape == (len(texts), 32)
    assert cosines(got, want).min() >= 0.999
    np.testing.assert_allclose(got, want, atol=1e-6)  # in practice equal: the same encoder call
    assert body["object"] == "list" and body["model"] == MODEL
    other = "passage" if side == "query" else "query"  # the sides really differ
    assert cosines(got, searcher.encoder.encode(texts, other)).max() < 0.99


def test_a_single_string_and_the_default_side(client, searcher):
    one = embed(client, PASSAGES[0])
    assert len(one["data"]) == 1
    np.testing.assert_allclose(vectors(one)[0], searcher.encoder.encode(PASSAGES[:1], "passage")[0], atol=1e-6)


def test_search_scores_with_the_same_query_vectors(client, searcher):
    """/search and /v1/embeddings share the encoder: a hit's score is the embedded query's inner
    product with the indexed passage."""
    q = vectors(embed(client, [QUERIES[0]], input_type="query"))[0]
    hits = client.post("/search", json={"query": QUERIES[0], "k": 3, "mode": "dense"}).json()["hits"]
    rows = {d: i for i, d in enumerate(searcher.index.ids)}
    stored = searcher.index.embeddings()
    for h in hits:
        assert h["score"] == pytest.approx(float(stored[rows[h["doc_id"]]] @ q), abs=1e-5)


def test_a_document_gets_the_vector_stored_in_the_index(client, searcher):
    corpus = [json.loads(line) for line in open(searcher.corpus_path, encoding="utf-8")]
    got = vectors(embed(client, [passage_text(d) for d in corpus[:5]], input_type="passage"))
    np.testing.assert_allclose(got, searcher.index.embeddings()[:5], atol=1e-5)


def test_usage_counts_the_tokens_the_model_runs(client, searcher):
    enc = searcher.encoder
    long_text = " ".join(["river fish water"] * 400)
    for side in ("query", "passage"):
        texts = [QUERIES[0], long_text]
        overhead = enc.encoded_side(side).overhead
        short = len(enc.tokenizer(QUERIES[0], add_special_tokens=False)["input_ids"]) + overhead
        assert token_counts(enc, texts, side) == [short, enc.max_length[side]]  # the long one is cut
        usage = embed(client, texts, input_type=side)["usage"]
        assert usage == {"prompt_tokens": short + enc.max_length[side], "total_tokens": short + enc.max_length[side]}


def test_dimensions_accepted_only_when_equal(client):
    assert len(embed(client, "a", dimensions=32)["data"][0]["embedding"]) == 32
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 16})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "dimensions" and "32-d" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,param,message", [
    ({"model": "gpt-4", "input": "a"}, 404, "model", "does not exist"),
    ({"model": MODEL, "input": [1, 2, 3]}, 422, "input", "token-id arrays are not supported"),
    ({"model": MODEL, "input": [[1, 2], [3]]}, 422, "input", "token-id arrays are not supported"),
    ({"model": MODEL, "input": []}, 422, "input", "at least 1 item"),
    ({"model": MODEL, "input": ["a"] * 7}, 422, "input", "at most 6 items"),
    ({"model": MODEL, "input": ""}, 422, "input", "the text is empty"),
    ({"model": MODEL, "input": ["a", " \n"]}, 422, "input", "input.1: the text is empty (only whitespace)"),
    ({"model": MODEL, "input": 3}, 422, "input", "a string or a list of strings"),
    ({"model": MODEL, "input": "a", "encoding_format": "int8"}, 422, "encoding_format", "'float' or 'base64'"),
    ({"model": MODEL, "input": "a", "input_type": "document"}, 422, "input_type", "'query' or 'passage'"),
    ({"model": MODEL, "input": "a", "temperature": 1}, 422, "temperature", "Extra inputs are not permitted"),
    ({"input": "a"}, 422, "model", "Field required"),
])
def test_errors_have_openai_shape(client, body, status, param, message):
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and message in err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"


def test_transport_errors_under_v1_have_openai_shape_too(client):
    for r, status in ((client.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"}), 400),
                      (client.post("/v1/embeddings", content=b"{}", headers={"content-type": "text/plain"}), 415),
                      (client.post("/v1/embeddings", json={"model": MODEL, "input": "x" * 9000}), 413),
                      (client.get("/v1/embeddings"), 405),
                      (client.get("/v1/nope"), 404)):
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert client.post("/search", content=b"{}", headers={"content-type": "text/plain"}).json().keys() == {"error"}


def test_models_list_and_retrieve(client):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL]
    card = listed["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "llara" and isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").json() == card
    r = client.get("/v1/models/text-embedding-3-small")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    info = client.get("/info").json()
    assert info["model_name"] == MODEL and info["limits"]["max_inputs"] == 6 and info["inputs_embedded"] > 0


def test_concurrent_searches_and_embeddings_share_worker_jobs(searcher):
    app = create_app(searcher, model_name=MODEL, max_batch=64, max_wait_ms=200)
    texts = [f"the {w} study" for w in ("fish", "brain", "heart", "city", "river", "water")]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            calls = []
            for i, t in enumerate(texts * 2):
                if i % 3 == 0:
                    calls.append(c.post("/search", json={"query": t, "k": 2, "mode": "dense"}))
                else:
                    calls.append(c.post("/v1/embeddings", json={"model": MODEL, "input": [t],
                                                                 "input_type": ("query", "passage")[i % 2]}))
            rs = await asyncio.gather(*calls)
            return rs, (await c.get("/info")).json()

    rs, info = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    for i, (t, r) in enumerate(zip(texts * 2, rs)):
        if i % 3 == 0:
            assert [h["doc_id"] for h in r.json()["hits"]] == [h.doc_id for h in searcher.search(t, 2, mode="dense")[0]]
        else:
            want = searcher.encoder.encode([t], ("query", "passage")[i % 2])
            np.testing.assert_allclose(vectors(r.json()), want, atol=1e-6)
    assert info["queries_answered"] == 4 and info["inputs_embedded"] == 8 and info["batches"] < 6


def _samples(text: str) -> dict:
    """{(name, labels as sorted tuple): value} of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_count_requests_batches_and_encoder_time(searcher):
    app = create_app(searcher, model_name=MODEL)
    with TestClient(app) as c:
        for _ in range(3):
            embed(c, QUERIES, input_type="query")
        c.post("/search", json={"query": "fish", "mode": "dense"})
        c.post("/v1/embeddings", json={"model": "nope", "input": "a"})
        c.get("/no/such/path")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    req = "llara_http_requests_total"
    assert m[(req, (("method", "POST"), ("route", "/v1/embeddings"), ("status", "200")))] == 3
    assert m[(req, (("method", "POST"), ("route", "/v1/embeddings"), ("status", "404")))] == 1
    assert m[(req, (("method", "POST"), ("route", "/search"), ("status", "200")))] == 1
    assert m[(req, (("method", "GET"), ("route", "other"), ("status", "404")))] == 1
    assert m[("llara_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/embeddings")))] == 4
    assert m[("llara_batch_texts_count", ())] == 4 and m[("llara_batch_texts_sum", ())] == 3 * 3 + 1
    enc = searcher.encoder
    tokens = sum(token_counts(enc, QUERIES, "query")) * 3 + token_counts(enc, ["fish"], "query")[0]
    assert m[("llara_batch_tokens_sum", ())] == tokens
    assert m[("llara_encoder_duration_seconds_count", ())] == 4 and m[("llara_encoder_duration_seconds_sum", ())] > 0
    assert m[("llara_queue_depth", ())] == 0 and m[("llara_queue_limit", ())] == 256 and m[("llara_ready", ())] == 1


def test_every_served_path_has_its_own_route_label(searcher):
    app = create_app(searcher)
    assert {r.path.replace(":path", "") for r in app.routes} == set(ROUTES)
    assert route_of("/v1/models/org/name") == "/v1/models/{model}" and route_of("/etc/passwd") == "other"


def test_api_key(searcher):
    app = create_app(searcher, model_name=MODEL, api_key="s3cret", max_body_bytes=100)
    ok = {"Authorization": "Bearer s3cret"}
    with TestClient(app) as c:
        for auth in (None, "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2", "Bearer  "):
            headers = {"Authorization": auth} if auth else {}
            for r in (c.post("/v1/embeddings", json={"model": MODEL, "input": "a"}, headers=headers),
                      c.post("/search", json={"query": "a"}, headers=headers), c.get("/info", headers=headers),
                      c.get("/v1/models", headers=headers)):
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/search", json={"query": "a"})
        assert r.json() == {"error": "missing API key: send Authorization: Bearer <key>"}
        # the key is checked before the body is read: no 413 for an oversized body without it
        assert c.post("/search", content=b"x" * 1000, headers={"content-type": "application/json"}).status_code == 401
        assert c.post("/v1/embeddings", json={"model": MODEL, "input": "a"}, headers=ok).status_code == 200
        assert c.post("/search", json={"query": "a"}, headers=ok).status_code == 200
        assert c.get("/info", headers={"Authorization": "bearer s3cret"}).status_code == 200  # scheme: any case
        assert c.get("/v1/models", headers=ok).status_code == 200
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["paths"]["/v1/embeddings"]["post"]["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/search"]["post"]["responses"]
    assert "security" not in spec["paths"]["/ready"]["get"]


def test_ready_is_503_until_loaded(searcher):
    release, metrics = threading.Event(), Metrics()

    def load():
        assert release.wait(30)
        return searcher

    service = Service(load, lambda s: create_app(s, model_name=MODEL, metrics=metrics), metrics)
    with TestClient(MetricsMiddleware(service, metrics, route_of)) as c:
        assert c.get("/health").json() == {"status": "ok", "passages": None}
        for r in (c.get("/ready"), c.post("/search", json={"query": "a"})):
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "loading" in r.json()["error"]
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        assert _samples(c.get("/metrics").text)[("llara_ready", ())] == 0
        release.set()
        assert service.loaded.wait(30) and service.error is None
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.get("/health").json() == {"status": "ok", "passages": 20}
        assert c.post("/search", json={"query": "a"}).status_code == 200
        m = _samples(c.get("/metrics").text)
    assert m[("llara_ready", ())] == 1
    assert m[("llara_http_requests_total", (("method", "GET"), ("route", "/ready"), ("status", "503")))] == 1
    assert m[("llara_http_requests_total", (("method", "GET"), ("route", "/ready"), ("status", "200")))] == 1


def test_the_api_key_is_checked_while_loading(searcher):
    # `llara serve --api-key`: a wrong or missing key gets 401 at once, not 503 until the model is
    # loaded and 401 after; the open paths stay open.
    from llara.serve.server import front

    release, metrics = threading.Event(), Metrics()

    def load():
        assert release.wait(30)
        return searcher

    service = Service(load, lambda s: create_app(s, model_name=MODEL, metrics=metrics, api_key="k"), metrics)
    with TestClient(front(service, metrics, api_key="k")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.post("/search", json={"query": "a"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 503
        r = c.post("/search", json={"query": "a"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 503  # the right key: told to come back
        release.set()
        assert service.loaded.wait(30) and service.error is None
        assert c.post("/search", json={"query": "a"}, headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.post("/search", json={"query": "a"}, headers={"Authorization": "Bearer x"}).status_code == 401
        m = _samples(c.get("/metrics").text)
    assert m[("llara_http_requests_total", (("method", "POST"), ("route", "/search"), ("status", "401")))] == 3


def test_a_failed_load_is_kept_and_reported():
    stopped = []

    def load():
        raise FileNotFoundError("no index here")

    service = Service(load, lambda s: None, Metrics())
    service.on_error = lambda: stopped.append(True)
    with TestClient(service) as c:
        assert service.loaded.wait(30)
        assert c.get("/ready").status_code == 503
    assert isinstance(service.error, FileNotFoundError) and stopped == [True]


class _BlockedSearcher:
    """Holds every search until released, like an encoder that is busy."""

    def __init__(self):
        self.release = threading.Event()
        self.index = None

    def info(self):
        return {"model_id": "m", "template": "eos", "max_query_length": 8, "passages": 1, "dimension": 32,
                "factory": "Flat", "llara_version": "0"}

    def search_requests(self, requests):
        assert self.release.wait(30)
        return [[[Hit("d1", 1.0, "")] for _ in r.queries] for r in requests]

    def plan(self, mode, **fusion):
        return mode or "dense", None


def test_429_with_retry_after_when_the_queue_is_full():
    searcher = _BlockedSearcher()
    app = create_app(searcher, encoder=make_encoder(), model_name=MODEL, max_batch=2, max_pending=4, max_wait_ms=0)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async with app.router.lifespan_context(app):
                held = [asyncio.create_task(c.post("/search", json={"queries": ["a", "b"]})) for _ in range(2)]
                for _ in range(200):
                    if app.state.batcher.pending == 4:
                        break
                    await asyncio.sleep(0.05)
                full = await c.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
                searcher.release.set()
                await asyncio.gather(*held)
                after = await c.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
                return full, after

    full, after = asyncio.run(go())
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "rate_limit_error" and full.json()["error"]["code"] == "rate_limit_exceeded"
    assert after.status_code == 200


def test_embeddings_only_without_an_index():
    encoder = llara_encoder()
    app = create_app(None, encoder=encoder, default_input_type="query")
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["llara"]  # no model id: "llara"
        body = c.post("/v1/embeddings", json={"model": "llara", "input": QUERIES}).json()
        np.testing.assert_allclose(vectors(body), encoder.encode(QUERIES, "query"), atol=1e-6)  # default: query here
        assert c.post("/search", json={"query": "a"}).status_code == 404
        assert c.get("/health").json() == {"status": "ok", "passages": None}
        info = c.get("/info").json()
        assert info["passages"] is None and info["modes"] == [] and info["dimension"] == 32
        spec = c.get("/openapi.json").json()
    assert "/search" not in spec["paths"]
    assert spec["components"]["schemas"]["EmbeddingsRequest"]["properties"]["input_type"]["default"] == "query"


@pytest.mark.parametrize("kwargs,message", [
    ({"max_inputs": 300}, "max_inputs (300) must be between 1 and max_pending (256)"),
    ({"max_queries": 9, "max_pending": 8, "max_batch": 2}, "max_queries (9) must be between 1 and max_pending (8)"),
    ({"default_input_type": "doc"}, "default_input_type must be 'query' or 'passage'"),
])
def test_impossible_limits_fail_at_creation(searcher, kwargs, message):
    with pytest.raises(ValueError) as e:
        create_app(searcher, **kwargs)
    assert message in str(e.value)


def test_a_token_budget_splits_micro_batches_without_changing_vectors(searcher):
    """--max-batch-tokens: a micro-batch over the budget runs as several forward passes, same vectors."""
    texts = [passage_text(d) for d in (json.loads(line) for line in searcher.corpus_path.read_text().splitlines())]
    plain = llara_encoder()
    budgeted = llara_encoder().set_max_batch_tokens(256)
    assert budgeted.max_batch_tokens == 256
    for side in ("query", "passage"):
        shapes = [b.input_ids.shape for _, b in budgeted.batches(texts, side)]
        assert len(shapes) > 1 and all(rows * length <= 256 for rows, length in shapes)
        np.testing.assert_allclose(budgeted.encode(texts, side), plain.encode(texts, side), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch_tokens=8 is below one"):
        llara_encoder().set_max_batch_tokens(8)
