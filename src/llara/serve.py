"""An HTTP search service over a persistent index (FastAPI + uvicorn).

Endpoints::

    POST /search   {"query": "text", "k": 10}  or  {"queries": ["a", "b"], "k": 10}; optional "mode"
                   (dense, bm25, hybrid; default hybrid when the index has BM25) and, for hybrid,
                   "fusion" (linear, rrf), "alpha", "rrf_k" (default: the index's settings)
    GET  /health   {"status": "ok", "passages": N}
    GET  /info     model, template, index size and the request limits

Concurrent requests are micro-batched: each request puts its queries on an asyncio queue, and a
single worker takes whatever has arrived within ``max_wait_ms`` of the oldest waiting request (up
to ``max_batch`` queries) and runs *one* encoder call + FAISS search for all of them (the dense
half of hybrid requests included; BM25 and fusion are per query) in a dedicated thread, so the
event loop keeps accepting requests meanwhile.

Every malformed request gets a 4xx with ``{"error": "<what is wrong>"}``: bodies over
``max_body_bytes`` (by Content-Length and by the bytes actually received), bad JSON, wrong types,
unknown fields, empty or over-long queries, ``k`` out of range. The service binds to loopback
unless told otherwise, and no endpoint touches a file named in a request.
"""

import asyncio
import ipaddress
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional

log = logging.getLogger(__name__)

__all__ = ["create_app", "run"]

DEFAULT_MAX_QUERY_CHARS = 2048
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------
# micro-batching
# ----------------------------------------------------------------------------------------------
class MicroBatcher:
    """Collect concurrent searches into one ``searcher.search`` call, run in one worker thread."""

    def __init__(self, searcher, max_batch: int, max_wait_ms: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait = max(max_wait_ms, 0) / 1000
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llara-search")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # encoder calls so far
        self.queries = 0  # queries answered so far

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def search(self, queries: list[str], k: int, mode: str | None = None, fusion=None):
        self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        await self.queue.put((queries, k, fut, loop.time(), mode, fusion))
        return await fut

    async def _collect(self) -> list[tuple]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        n = len(batch[0][0])
        deadline = batch[0][3] + self.max_wait  # counted from when the oldest request arrived
        while n < self.max_batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.0005))
                continue
            item = self.queue.get_nowait()
            batch.append(item)
            n += len(item[0])
        return batch

    async def _work(self) -> None:
        from .retrieval.searcher import Request

        loop = asyncio.get_running_loop()
        while True:
            batch = [b for b in await self._collect() if not b[2].done()]  # done = client went away
            if not batch:
                continue
            queries = [q for b in batch for q in b[0]]
            requests = [Request(tuple(qs), k, mode, fusion) for qs, k, _, _, mode, fusion in batch]
            try:
                hits = await loop.run_in_executor(self.executor, self.searcher.search_requests, requests)
            except Exception as e:  # handed to every waiting request, which answers 500
                log.exception("search failed for a batch of %d queries", len(queries))
                for b in batch:
                    if not b[2].done():
                        b[2].set_exception(e)
                continue
            self.batches += 1
            self.queries += len(queries)
            for b, h in zip(batch, hits):
                if not b[2].done():
                    b[2].set_result(h)


# ----------------------------------------------------------------------------------------------
# request size limit (pure ASGI, so it sees the raw bytes before anything parses them)
# ----------------------------------------------------------------------------------------------
async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Reject bodies over ``max_bytes`` (first by Content-Length, then by counting what arrives)
    and POST bodies that are not declared JSON."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST":
            ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            mime = ctype.split(b";")[0].strip().lower()
            if mime != b"application/json" and not mime.endswith(b"+json"):
                return await _send_error(send, 415, "Content-Type must be application/json, got "
                                                    f"{ctype.decode('latin-1') or 'none'}")
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            try:
                size = int(declared[0])
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if size > self.max_bytes:
                return await _send_error(send, 413, f"request body of {size} bytes is over the limit of "
                                                    f"{self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, f"request body is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------
def _request_model(max_query_chars: int, max_k: int, max_queries: int, default_k: int):
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    Query = Field(default=None, min_length=1, max_length=max_query_chars)

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        query: Optional[str] = Query
        queries: Optional[list[str]] = Field(default=None, min_length=1, max_length=max_queries)
        k: int = Field(default=default_k, ge=1, le=max_k)
        mode: Optional[Literal["dense", "bm25", "hybrid"]] = None
        fusion: Optional[Literal["linear", "rrf"]] = None
        alpha: Optional[float] = Field(default=None, ge=0, le=1)
        rrf_k: Optional[float] = Field(default=None, ge=0, allow_inf_nan=False)

        @field_validator("query")
        @classmethod
        def _query_text(cls, v):
            if v is not None and not v.strip():
                raise ValueError("the query is empty (only whitespace)")
            return v

        @field_validator("queries")
        @classmethod
        def _queries_text(cls, v):
            for i, q in enumerate(v or []):
                if not q.strip():
                    raise ValueError(f"query {i} is empty")
                if len(q) > max_query_chars:
                    raise ValueError(f"query {i} has {len(q)} characters; the limit is {max_query_chars}")
            return v

        @model_validator(mode="after")
        def _one_of(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
            return self

    return SearchRequest


def _mode_and_fusion(searcher, req):
    """The request's mode (checked against the index) and fusion settings (the index's, overridden)."""
    mode = searcher.check_mode(req.mode)
    given = {k: v for k, v in (("method", req.fusion), ("alpha", req.alpha), ("rrf_k", req.rrf_k)) if v is not None}
    if given and mode != "hybrid":
        names = ", ".join("fusion" if k == "method" else k for k in given)
        raise ValueError(f"{names}: only for mode 'hybrid' (this request's mode is {mode!r})")
    if not given:
        return mode, None
    from .retrieval.fusion import FusionConfig

    return mode, FusionConfig(**{**searcher.fusion.to_dict(), **given})


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
        field = ".".join(str(x) for x in loc if x != "body")
        parts.append(f"{field}: {msg}" if field else f"request body: {msg}")
    return "; ".join(parts) or "invalid request"


def create_app(
    searcher,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5,
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
    max_k: int = DEFAULT_MAX_K,
    max_queries: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_k: int = 10,
):
    """A FastAPI app serving ``searcher`` (a :class:`llara.retrieval.searcher.Searcher`).

    ``max_queries`` (per request) defaults to ``max_batch``.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    max_queries = max_queries or max_batch
    SearchRequest = _request_model(max_query_chars, max_k, max_queries, min(default_k, max_k))
    batcher = MicroBatcher(searcher, max_batch, max_wait_ms)
    info = {**searcher.info(), "limits": {"max_query_chars": max_query_chars, "max_k": max_k,
                                          "max_queries": max_queries, "max_body_bytes": max_body_bytes,
                                          "max_batch": max_batch, "max_wait_ms": max_wait_ms}}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="llara search", version=info["llara_version"], lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        return JSONResponse({"error": _describe(errors)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.post("/search")
    async def search(req: SearchRequest):  # type: ignore[valid-type]
        t0 = time.perf_counter()
        queries = [req.query] if req.query is not None else req.queries
        try:
            mode, fusion = _mode_and_fusion(searcher, req)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        try:
            hits = await batcher.search(queries, req.k, mode, fusion)
        except Exception:
            return JSONResponse({"error": "search failed (see the server log)"}, status_code=500)
        results = [{"query": q, "hits": [{"doc_id": h.doc_id, "score": h.score, "title": h.title} for h in hs]}
                   for q, hs in zip(queries, hits)]
        took_ms = round((time.perf_counter() - t0) * 1000, 3)
        if req.query is not None:
            return {**results[0], "k": req.k, "mode": mode, "took_ms": took_ms}
        return {"results": results, "k": req.k, "mode": mode, "took_ms": took_ms}

    @app.get("/health")
    async def health():
        return {"status": "ok", "passages": info["passages"]}

    @app.get("/info")
    async def get_info():
        return {**info, "batches": batcher.batches, "queries_answered": batcher.queries}

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
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
    limit_concurrency: int = 256,
    verify: bool = True,
    backend: str = "faiss",
    collection: str | None = None,
    **app_kwargs,
) -> None:
    """Load the index and its model, then serve until interrupted (binds to loopback by default)."""
    import uvicorn

    from .retrieval.searcher import Searcher

    if not _is_loopback(host):
        log.warning("serving on %s: reachable from other machines; the service has no authentication", host)
    searcher = Searcher.from_index(index_dir, device=device, params=params, verify=verify, backend=backend,
                                   collection=collection)
    app = create_app(searcher, **app_kwargs)
    log.info("serving %d passages on http://%s:%d", len(searcher.index), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                limit_concurrency=limit_concurrency, workers=1)
