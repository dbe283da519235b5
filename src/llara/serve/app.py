"""An HTTP search and embedding service over a persistent index (FastAPI + uvicorn).

Endpoints::

    POST /search          {"query": "text", "k": 10}  or  {"queries": ["a", "b"], "k": 10}; optional "mode"
                          (dense, bm25, hybrid; default hybrid when the index has BM25) and, for hybrid,
                          "fusion" (linear, rrf), "alpha", "rrf_k" (default: the index's settings)
    POST /v1/embeddings   OpenAI's embeddings API: {"model": ..., "input": "text" or ["a", "b"],
                          "encoding_format": "float" | "base64", "input_type": "query" | "passage"}
    GET  /v1/models       OpenAI's model list: the one served model (also GET /v1/models/{model})
    GET  /health          liveness: {"status": "ok", "passages": N} as soon as the process listens
    GET  /ready           readiness: 200 once the model and index are loaded, 503 until then
    GET  /metrics         Prometheus metrics (see :mod:`llara.serve.metrics`)
    GET  /info            model, template, index size and the request limits
    GET  /openapi.json    the contract: request constraints, every response and its body model

Concurrent requests are micro-batched: each request puts its queries (or texts to embed) on an
asyncio queue, and a single worker collects them (up to ``max_batch`` texts, waiting at most
``max_wait_ms`` for the clients it expects; see :mod:`llara.serve.batching`) and runs *one* worker job for
all of them in a dedicated thread: one encoder call + FAISS search for the searches (the dense half
of hybrid requests included; BM25 and fusion are per query), and one ``Encoder.encode`` call per
side for the embeddings, so ``/v1/embeddings`` gives exactly the vectors ``/search`` searches with.
When ``max_pending`` texts already wait for the encoder, a new request gets 429 with
``Retry-After`` (seconds, from the measured time per batch): only a saturated encoder turns
clients away, never open sockets. 503 means not ready (still loading).

Every error is ``{"error": "<what is wrong>"}`` (OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` under ``/v1``) with a 4xx (a 500 only if the search itself fails): bad JSON (400), no or
a wrong API key (401), an unknown model (404), a body not received within ``body_timeout`` (408),
over ``max_body_bytes`` (413), not JSON (415), wrong types, unknown fields, empty or over-long
queries, ``k`` out of range (422), wrong method (405). Read deadlines and limits against slow
clients, and the API key, are in :mod:`llara.serve.limits`; :func:`llara.serve.server.run` listens, loads
and serves. No endpoint touches a file named in a request.
"""

import base64
import json
import logging
import time
from contextlib import asynccontextmanager

import numpy as np

from .batching import MicroBatcher, Saturated, check_limits

log = logging.getLogger(__name__)

__all__ = ["ROUTES", "create_app", "route_of"]

DEFAULT_MAX_QUERY_CHARS = 2048
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT = 10.0  # seconds for a whole request body (from its head)

# Every path the service answers (a test checks this against the app's routes); the metrics label
# any other path "other".
ROUTES = ("/search", "/v1/embeddings", "/v1/models", "/v1/models/{model}", "/health", "/ready", "/metrics", "/info",
          "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def route_of(path: str) -> str:
    """The route (path template) that answers ``path``, or ``other``."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _describe(errors, text: str = "query", example: str = '{"query": "...", "k": 10}') -> tuple[str, str | None]:
    """One line naming each offending field, e.g. ``k: Input should be less than or equal to 100``, and
    the first offending field (OpenAI's ``param``)."""
    parts, params = [], []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            parts.append(f"malformed JSON{where}: {(e.get('ctx') or {}).get('error', msg)}")
            continue
        if loc == ("body",) and e.get("type") == "missing":
            parts.append(f"the request body is empty; send a JSON object such as {example}")
            continue
        if e.get("type") == "string_pattern_mismatch":
            msg = f"the {text} is empty (only whitespace)"
        names = [str(x) for x in loc if x != "body"]
        if names:
            params.append(names[0])
        field = ".".join(names)
        parts.append(f"{field}: {msg}" if field else f"request body: {msg}")
    return "; ".join(parts) or "invalid request", (params[0] if params else None)


def _encoder_info(encoder) -> dict:
    """What /info says about a served encoder without an index."""
    from .. import __version__

    return {"model_id": encoder.model_id, "template": encoder.template.name,
            "max_query_length": encoder.max_length["query"], "passages": None,
            "dimension": encoder.model.config.hidden_size, "factory": None, "llara_version": __version__,
            "modes": [], "default_mode": None, "fusion": None, "bm25": None}


def _vector_json(v: np.ndarray, encoding: str):
    if encoding == "base64":  # OpenAI's: the little-endian float32 bytes, base64-encoded
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.astype(np.float32).tolist()


def create_app(
    searcher=None,
    *,
    encoder=None,
    max_batch: int = 32,
    max_wait_ms: float = 50,
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
    max_k: int = DEFAULT_MAX_K,
    max_queries: int | None = None,
    max_inputs: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pending: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    default_k: int = 10,
    model_name: str | None = None,
    default_input_type: str | None = None,
    api_key: str | None = None,
    metrics=None,
):
    """A FastAPI app serving ``searcher`` (a :class:`llara.retrieval.searcher.Searcher`) and its
    encoder, or only ``encoder`` (``searcher`` None: embeddings, no ``/search``).

    ``max_queries`` (per search request) defaults to ``max_batch``, ``max_pending`` (texts waiting for
    the encoder before new requests get 429) to ``8 * max_batch``, ``max_inputs`` (per embeddings
    request) to ``max_pending``. ``model_name``: the name ``/v1/embeddings`` expects (default: the
    encoder's model id). ``api_key``: required as ``Authorization: Bearer <key>`` on every route but
    the probes, the metrics and the schema. ``metrics``: a :class:`llara.serve.metrics.Metrics` that
    the caller counts requests into (default: the app's own, counted by its own middleware).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.exceptions import HTTPException

    from .. import __version__
    from .limits import BearerAuth, RequestGuard
    from .metrics import Metrics, MetricsMiddleware
    from .schema import (DEFAULT_INPUT_TYPE, SEARCH_RESPONSE, EmbeddingsResponse, Health, Info, ModelCard,
                         ModelList, OpenAIErrorBody, Ready, embeddings_request_model, error_json,
                         error_responses, input_type_doc, is_openai_path, request_model)

    if searcher is None and encoder is None:
        raise ValueError("give a searcher, an encoder, or both")
    encoder = encoder if encoder is not None else getattr(searcher, "encoder", None)
    max_pending, max_queries, max_inputs = check_limits(max_batch, max_pending, max_queries, max_inputs)
    default_input_type = default_input_type or DEFAULT_INPUT_TYPE
    if default_input_type not in ("query", "passage"):
        raise ValueError(f"default_input_type must be 'query' or 'passage', got {default_input_type!r}")
    own_metrics = metrics is None
    metrics = metrics or Metrics()
    batcher = MicroBatcher(searcher, max_batch, max_wait_ms, max_pending, encoder=encoder, metrics=metrics)
    metrics.watch_queue(lambda: batcher.pending, batcher.max_pending)
    info = searcher.info() if searcher is not None else _encoder_info(encoder)
    model_name = model_name or (encoder.model_id if encoder is not None else None) or info.get("model_id") or "llara"
    created = int(time.time())
    info = {**info, "model_name": model_name,
            "max_passage_length": encoder.max_length["passage"] if encoder is not None else None,
            "limits": {"max_query_chars": max_query_chars, "max_k": max_k, "max_queries": max_queries,
                       "max_inputs": max_inputs, "max_body_bytes": max_body_bytes, "max_batch": max_batch,
                       "max_wait_ms": max_wait_ms, "max_pending": batcher.max_pending, "body_timeout_s": body_timeout}}
    guarded = {401} if api_key else set()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    what = ("Dense, BM25 and hybrid retrieval over a llara index, and " if searcher is not None else "") + \
        "OpenAI-compatible embeddings from a LLaRA model."
    app = FastAPI(title="llara", version=__version__, lifespan=lifespan,
                  description=f"{what} Errors are {{\"error\": \"...\"}}, under /v1 OpenAI's "
                              "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}. "
                              "input_type of POST /v1/embeddings: " + input_type_doc(default_input_type))
    app.state.batcher = batcher
    app.state.metrics = metrics

    def error(path: str, status: int, message: str, headers: dict | None = None, *, param: str | None = None,
              code: str | None = None) -> JSONResponse:
        return JSONResponse(error_json(path, status, message, param=param, code=code), status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        path = request.url.path
        if is_openai_path(path):
            message, param = _describe(errors, "text", '{"model": "...", "input": ["..."]}')
        else:
            message, param = _describe(errors)
        return error(path, 400 if any(e.get("type") == "json_invalid" for e in errors) else 422, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(request.url.path, 500, "internal error (see the server log)")

    def saturated(path: str, e: Saturated) -> JSONResponse:
        return error(path, 429, str(e), {"Retry-After": str(e.retry_after)})

    if searcher is not None:
        SearchRequest = request_model(max_query_chars, max_k, max_queries, min(default_k, max_k),
                                      tuple(getattr(searcher, "modes", ("dense",))),
                                      getattr(searcher, "default_mode", "dense"))

        @app.post("/search", response_model=None, responses={
            200: {"model": SEARCH_RESPONSE, "description": "the hits"},
            **error_responses(400, *guarded, 408, 413, 415, 422, 429, 500, 503)})
        async def search(req: SearchRequest):  # type: ignore[valid-type]
            """Top-k passages for one query or a list of queries."""
            t0 = time.perf_counter()
            queries = [req.query] if req.query is not None else req.queries
            try:
                mode, fusion = searcher.plan(req.mode, fusion=req.fusion, alpha=req.alpha, rrf_k=req.rrf_k)
            except ValueError as e:  # the request model already rejects what the index cannot do
                return error("/search", 422, str(e))
            try:
                hits = await batcher.search(queries, req.k, mode, fusion)
            except Saturated as e:
                return saturated("/search", e)
            except Exception:
                return error("/search", 500, "search failed (see the server log)")
            results = [{"query": q, "hits": [{"doc_id": h.doc_id, "score": h.score, "title": h.title} for h in hs]}
                       for q, hs in zip(queries, hits)]
            took_ms = round((time.perf_counter() - t0) * 1000, 3)
            if req.query is not None:
                return {**results[0], "k": req.k, "mode": mode, "took_ms": took_ms}
            return {"results": results, "k": req.k, "mode": mode, "took_ms": took_ms}

    if encoder is not None:
        EmbeddingsRequest = embeddings_request_model(max_inputs, info["dimension"], model_name, default_input_type)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "llara"}

        def unknown_model(path: str, name: str) -> JSONResponse:
            return error(path, 404, f"the model {name!r} does not exist here; this server serves {model_name!r} "
                                    "(GET /v1/models)", param="model", code="model_not_found")

        @app.post("/v1/embeddings", response_model=None, responses={
            200: {"model": EmbeddingsResponse, "description": "one embedding per input, in order"},
            **error_responses(400, *guarded, 404, 408, 413, 415, 422, 429, 500, 503, openai=True)})
        async def embeddings(req: EmbeddingsRequest):  # type: ignore[valid-type]
            """OpenAI's embeddings API: the vectors of ``input`` on the side ``input_type`` names."""
            path = "/v1/embeddings"
            if req.model != model_name:
                return unknown_model(path, req.model)
            try:
                out = await batcher.embed(req.input, req.input_type)
            except Saturated as e:
                return saturated(path, e)
            except Exception:
                return error(path, 500, "embedding failed (see the server log)")
            used = sum(out.tokens)
            body = {"object": "list", "model": model_name, "usage": {"prompt_tokens": used, "total_tokens": used},
                    "data": [{"object": "embedding", "index": i, "embedding": _vector_json(v, req.encoding_format)}
                             for i, v in enumerate(out.vectors)]}
            return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

        @app.get("/v1/models", response_model=None, responses={
            200: {"model": ModelList, "description": "the served model"},
            **error_responses(*guarded, 503, openai=True)})
        async def models():
            """OpenAI's model list: the one model this server embeds with."""
            return {"object": "list", "data": [card]}

        @app.get("/v1/models/{model:path}", response_model=None, responses={
            200: {"model": ModelCard, "description": "the served model"},
            **error_responses(*guarded, 404, 503, openai=True),
            422: {"model": OpenAIErrorBody, "description": "never sent (any model name is a valid path); declared "
                                                           "so that the schema names no other error body"}})
        async def model(model: str):
            """OpenAI's model retrieval: 404 for any model but the served one."""
            return card if model == model_name else unknown_model(f"/v1/models/{model}", model)

    @app.get("/health", response_model=None, responses={200: {"model": Health, "description": "alive"}})
    async def health():
        """Liveness: the process answers (also while the model loads, with passages null)."""
        return {"status": "ok", "passages": info["passages"]}

    @app.get("/ready", response_model=None, responses={200: {"model": Ready, "description": "loaded"},
                                                         **error_responses(503)})
    async def ready():
        """Readiness: 200 once the model and index are loaded, 503 until then."""
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def get_metrics():
        """Prometheus metrics (requests, latency, queue depth, batch sizes, encoder time)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=None, responses={200: {"model": Info, "description": "what is served"},
                                                        **error_responses(*guarded, 503)})
    async def get_info():
        return {**info, "batches": batcher.batches, "queries_answered": batcher.queries,
                "inputs_embedded": batcher.embedded}

    if api_key:
        def openapi():
            if app.openapi_schema is None:
                from .limits import OPEN_PATHS

                spec = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in spec["paths"].items():
                    if path not in OPEN_PATHS:
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
                app.openapi_schema = spec
            return app.openapi_schema

        app.openapi = openapi

    json_routes = {("POST", "/search"), ("POST", "/v1/embeddings")}
    app.add_middleware(RequestGuard, json_routes=json_routes, max_bytes=max_body_bytes, body_timeout=body_timeout)
    if api_key:  # outside the guard: no body is read before the key is checked
        app.add_middleware(BearerAuth, api_key=api_key)
    if own_metrics:
        app.add_middleware(MetricsMiddleware, metrics=metrics, route_of=route_of)
        metrics.ready.set(1)
    return app
