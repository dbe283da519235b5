"""An HTTP search service over a persistent index (FastAPI + uvicorn).

Endpoints::

    POST /search   {"query": "text", "k": 10}  or  {"queries": ["a", "b"], "k": 10}; optional "mode"
                   (dense, bm25, hybrid; default hybrid when the index has BM25) and, for hybrid,
                   "fusion" (linear, rrf), "alpha", "rrf_k" (default: the index's settings)
    GET  /health   {"status": "ok", "passages": N}
    GET  /info     model, template, index size and the request limits
    GET  /openapi.json  the contract: request constraints, every response and its body model

Concurrent requests are micro-batched: each request puts its queries on an asyncio queue, and a
single worker collects them (up to ``max_batch`` queries, waiting at most ``max_wait_ms`` for the
clients it expects; see :class:`llara.serve.batching.MicroBatcher`) and runs *one* encoder call + FAISS search for all
of them (the dense half of hybrid requests included; BM25 and fusion are per query) in a dedicated
thread, so the event loop keeps accepting requests meanwhile. When ``max_pending`` queries already
wait for the encoder, a new request gets 503 with ``Retry-After`` (seconds, from the measured time
per batch): only a saturated encoder turns clients away, never open sockets.

Every error is ``{"error": "<what is wrong>"}`` with a 4xx (a 500 only if the search itself
fails): bad JSON (400), a body not received within ``body_timeout`` (408), over
``max_body_bytes`` (413), not JSON (415), wrong types, unknown fields, empty or over-long queries,
``k`` out of range (422), wrong method (405). Read deadlines and limits against slow clients are
in :mod:`llara.serve.limits`. The service binds to loopback unless told otherwise, and no endpoint
touches a file named in a request.
"""

import ipaddress
import logging
import os
import time
from contextlib import asynccontextmanager

from .batching import MicroBatcher, Saturated

log = logging.getLogger(__name__)

__all__ = ["create_app", "run"]

DEFAULT_MAX_QUERY_CHARS = 2048
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEAD_TIMEOUT = 10.0  # seconds for a request head (from connect or the previous response)
DEFAULT_BODY_TIMEOUT = 10.0  # seconds for a whole request body (from its head)
DEFAULT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open after a response


def _describe(errors) -> str:
    """One line naming each offending field, e.g. ``k: Input should be less than or equal to 100``."""
    parts = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            parts.append(f"malformed JSON{where}: {(e.get('ctx') or {}).get('error', msg)}")
            continue
        if loc == ("body",) and e.get("type") == "missing":
            parts.append('the request body is empty; send a JSON object such as {"query": "...", "k": 10}')
            continue
        if e.get("type") == "string_pattern_mismatch":
            msg = "the query is empty (only whitespace)"
        field = ".".join(str(x) for x in loc if x != "body")
        parts.append(f"{field}: {msg}" if field else f"request body: {msg}")
    return "; ".join(parts) or "invalid request"


def create_app(
    searcher,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 50,
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
    max_k: int = DEFAULT_MAX_K,
    max_queries: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pending: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    default_k: int = 10,
):
    """A FastAPI app serving ``searcher`` (a :class:`llara.retrieval.searcher.Searcher`).

    ``max_queries`` (per request) defaults to ``max_batch``, ``max_pending`` (queries waiting for
    the encoder before new requests get 503) to ``8 * max_batch``.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from .limits import RequestGuard
    from .schema import SEARCH_RESPONSE, Health, Info, error_responses, request_model

    max_queries = max_queries or max_batch
    SearchRequest = request_model(max_query_chars, max_k, max_queries, min(default_k, max_k),
                                  tuple(getattr(searcher, "modes", ("dense",))),
                                  getattr(searcher, "default_mode", "dense"))
    batcher = MicroBatcher(searcher, max_batch, max_wait_ms, max_pending)
    if max_queries > batcher.max_pending:
        raise ValueError(f"max_queries ({max_queries}) must be <= max_pending ({batcher.max_pending})")
    info = {**searcher.info(), "limits": {"max_query_chars": max_query_chars, "max_k": max_k,
                                          "max_queries": max_queries, "max_body_bytes": max_body_bytes,
                                          "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                                          "max_pending": batcher.max_pending, "body_timeout_s": body_timeout}}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="llara search", version=info["llara_version"], lifespan=lifespan,
                  description="Dense retrieval over a llara index. Every error body is {\"error\": \"...\"}.")
    app.state.batcher = batcher

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return error(400 if any(e.get("type") == "json_invalid" for e in errors) else 422, _describe(errors))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal error (see the server log)")

    @app.post("/search", response_model=None, responses={200: {"model": SEARCH_RESPONSE, "description": "the hits"},
              **error_responses(400, 408, 413, 415, 422, 500, 503)})
    async def search(req: SearchRequest):  # type: ignore[valid-type]
        """Top-k passages for one query or a list of queries."""
        t0 = time.perf_counter()
        queries = [req.query] if req.query is not None else req.queries
        try:
            mode, fusion = searcher.plan(req.mode, fusion=req.fusion, alpha=req.alpha, rrf_k=req.rrf_k)
        except ValueError as e:  # fusion settings for another mode than hybrid
            return error(422, str(e))
        try:
            hits = await batcher.search(queries, req.k, mode, fusion)
        except Saturated as e:
            return error(503, str(e), {"Retry-After": str(e.retry_after)})
        except Exception:
            return error(500, "search failed (see the server log)")
        results = [{"query": q, "hits": [{"doc_id": h.doc_id, "score": h.score, "title": h.title} for h in hs]}
                   for q, hs in zip(queries, hits)]
        took_ms = round((time.perf_counter() - t0) * 1000, 3)
        if req.query is not None:
            return {**results[0], "k": req.k, "mode": mode, "took_ms": took_ms}
        return {"results": results, "k": req.k, "mode": mode, "took_ms": took_ms}

    @app.get("/health", response_model=None, responses={200: {"model": Health, "description": "serving"}})
    async def health():
        return {"status": "ok", "passages": info["passages"]}

    @app.get("/info", response_model=None, responses={200: {"model": Info, "description": "what is served"}})
    async def get_info():
        return {**info, "batches": batcher.batches, "queries_answered": batcher.queries}

    app.add_middleware(RequestGuard, json_routes={("POST", "/search")}, max_bytes=max_body_bytes,
                       body_timeout=body_timeout)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    index_dir: "str | os.PathLike",
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | None = None,
    params: str | None = None,
    runtime: str | None = None,
    verify: bool = True,
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
    keep_alive: int = DEFAULT_KEEP_ALIVE,
    backend: str = "faiss",
    collection: str | None = None,
    **app_kwargs,
) -> None:
    """Load the index and its model, then serve until interrupted (binds to loopback by default).

    uvicorn's ``limit_concurrency`` is left off on purpose: it counts open connections, so idle
    sockets would turn real requests away; load is bounded by ``max_pending`` instead, and idle or
    slow connections by the head, body and keep-alive timeouts (see :mod:`llara.serve.limits`)."""
    import uvicorn

    from ..retrieval.searcher import Searcher
    from .limits import head_deadline_protocol

    if not _is_loopback(host):
        log.warning("serving on %s: reachable from other machines; the service has no authentication", host)
    searcher = Searcher.from_index(index_dir, device=device, params=params, verify=verify, backend=backend,
                                   collection=collection, runtime=runtime)
    app = create_app(searcher, **app_kwargs)
    log.info("serving %d passages on http://%s:%d", len(searcher.index), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=1,
                http=head_deadline_protocol(head_timeout), timeout_keep_alive=keep_alive)
