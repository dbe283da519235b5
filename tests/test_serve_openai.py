"""The official ``openai`` Python client against a running ``llara serve`` (its own process on a free
loopback port, killed at the end and when the test process dies): vectors equal ``Encoder.encode``
on both sides, /metrics counts the calls, /ready, and the API key (the client sends it as a Bearer
token)."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import make_model, make_tokenizer
from tiny_index import start_server, write_corpus

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra: pip install -e '.[dev]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llara.modeling.encoder import Encoder  # noqa: E402
from llara.retrieval.index import build_index  # noqa: E402

KEY = "test-key-0123"
NAME = "tiny-llara"
QUERIES = ["fish in the river", "the brain and the heart"]
PASSAGES = ["the river holds many fish and the water is cold", "a city by the sea", "the heart of the study"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A saved tiny model with LLaRA's template (its sides differ), loaded back, and an index of a corpus."""
    root = tmp_path_factory.mktemp("openai")
    model_dir = Encoder(make_model(), make_tokenizer(), "llara", show_progress=False).save(root / "model")
    encoder = Encoder.from_pretrained(str(model_dir), show_progress=False)
    assert encoder.template.name == "llara"
    index = build_index(encoder, write_corpus(root / "corpus.jsonl", n=20), root / "index", model_spec=str(model_dir),
                        shard_size=8)
    return {"root": root, "model": model_dir, "index": index, "encoder": encoder}


@pytest.fixture(scope="module")
def server(built):
    """``llara serve --index ... --model-name tiny-llara`` with the API key from $LLARA_API_KEY."""
    proc, url = start_server(built["index"], built["root"] / "server.log", "--model-name", NAME, "--max-batch", "8",
                             env={"LLARA_API_KEY": KEY})
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def embedding_calls(url: str) -> dict[str, float]:
    """{status: count} of POST /v1/embeddings in the server's /metrics (open without the key)."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    return {s.labels["status"]: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
            if s.name == "llara_http_requests_total" and s.labels["route"] == "/v1/embeddings"}


def test_openai_client_gets_encoder_vectors_on_both_sides(server, built):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [NAME]
    before = embedding_calls(server).get("200", 0)
    enc = built["encoder"]
    calls = 0
    for side, texts in (("query", QUERIES), ("passage", PASSAGES)):
        want = enc.encode(texts, side)
        for fmt in ("base64", "float"):  # the client asks for base64 unless told otherwise
            kw = {"encoding_format": fmt} if fmt == "float" else {}
            r = client.embeddings.create(model=NAME, input=texts, extra_body={"input_type": side}, **kw)
            calls += 1
            got = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
            assert cosines(got, want).min() >= 0.999, (side, fmt)
            np.testing.assert_allclose(np.array(got, np.float32), want, atol=1e-6)
            assert r.model == NAME and r.usage.prompt_tokens == r.usage.total_tokens > len(texts) * 20
        other = "passage" if side == "query" else "query"
        assert cosines(got, enc.encode(texts, other)).max() < 0.99  # the side was honoured
    # no input_type: passages, llara's default for clients that do not know the field
    r = client.embeddings.create(model=NAME, input=PASSAGES[0])
    calls += 1
    assert cosines([r.data[0].embedding], enc.encode(PASSAGES[:1], "passage"))[0] >= 0.999
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError, match="token-id arrays are not supported"):
        client.embeddings.create(model=NAME, input=[[1, 2, 3]])
    after = embedding_calls(server)
    assert after["200"] - before == calls and after["404"] >= 1 and after["422"] >= 1


def test_ready_health_and_the_api_key(server):
    assert httpx.get(f"{server}/ready", timeout=10).json() == {"status": "ready"}
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok", "passages": 20}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).embeddings.create(model=NAME, input="a")
    r = httpx.post(f"{server}/v1/embeddings", json={"model": NAME, "input": "a"}, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{server}/search", json={"query": "fish"}, timeout=10).status_code == 401
    r = httpx.post(f"{server}/search", json={"query": "fish"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["hits"]) == 10


def test_embeddings_only_server(built, tmp_path):
    """``llara serve --model DIR`` without an index: embeddings, no /search."""
    proc, url = start_server(None, tmp_path / "server.log", "--model", str(built["model"]))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        assert name == "model"  # the checkpoint directory's name
        r = client.embeddings.create(model=name, input=QUERIES, extra_body={"input_type": "query"})
        assert cosines([d.embedding for d in r.data], built["encoder"].encode(QUERIES, "query")).min() >= 0.999
        assert httpx.post(f"{url}/search", json={"query": "fish"}, timeout=10).status_code == 404
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok", "passages": None}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
