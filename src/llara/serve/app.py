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
clients it expects; see :class:`MicroBatcher`) and runs *one* encoder call + FAISS search for all
of them (the dense half of hybrid requests included; BM25 and fusion are per query) in a dedicated
thread, so the event loop keeps accepting requests meanwhile. When ``max_pending`` queries already
wait for the encoder, a new request gets 503 with ``Retry-After`` (seconds, from the measured time
per batch): only a saturated encoder turns clients away, never open sockets.

Every error is ``{"error": "<what is wrong>"}`` with a 4xx (a 500 only if the search itself
fails): bad JSON (400), a body not received within ``body_timeout`` (408), over
``max_body_bytes`` (413), not JSON (415), wrong types, unknown fields, empty or over-long queries,
``k`` out of range (422), wrong method (405). Read deadlines and limits against slow clients are
in :mod:`llara.serve_limits`. The service binds to loopback unless told otherwise, and no endpoint
touches a file named in a request.
"""

import asyncio
import ipaddress
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
log = logging.getLogger(__name__)

__all__ = ["create_app", "run"]

DEFAULT_MAX_QUERY_CHARS = 2048
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEAD_TIMEOUT = 10.0  # seconds for a request head (from connect or the previous response)
DEFAULT_BODY_TIMEOUT = 10.0  # seconds for a whole request body (from its head)
DEFAULT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open after a response


# ----------------------------------------------------------------------------------------------
# micro-batching
# ----------------------------------------------------------------------------------------------
class Saturated(Exception):
    """The encoder's queue is full; ``retry_after`` seconds is when it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__(f"the encoder is saturated; retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher:
    """Collect concurrent searches into one ``searcher.search_requests`` call, run in one worker thread.

    Batching policy: when the worker is free it takes the oldest request, then keeps collecting
    until the batch holds as many queries as are expected, or ``max_wait_ms`` have passed since it
    started collecting, or ``max_batch`` is reached. Expected = the queries of the batch just
    answered (their clients tend to send again within milliseconds) plus those that queued while
    it ran. Counting the wait from when the *worker* is free, not from when the oldest request
    arrived, matters: requests that queued during a long encoder call have already used up their
    wait, and would otherwise leave at once without the clients just answered, so that two
    half-size groups take turns on the encoder. One client never waits (expected = 1).

    At most ``max_pending`` queries (default: 8 batches) wait or run at once; beyond that
    :meth:`search` raises :class:`Saturated` at once instead of queueing."""

    def __init__(self, searcher, max_batch: int, max_wait_ms: float, max_pending: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait = max(max_wait_ms, 0) / 1000
        self.max_pending = max_pending or 8 * max_batch
        if self.max_pending < max_batch:
            raise ValueError(f"max_pending ({self.max_pending}) must be >= max_batch ({max_batch})")
        self.pending = 0  # queries admitted and not answered yet
        self.batch_seconds: float | None = None  # moving average of one encoder call + search
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llara-search")
        self.queue: asyncio.Queue | None = None
        self.arrived: asyncio.Event | None = None  # set on every new request
        self.task: asyncio.Task | None = None
        self.batches = 0  # encoder calls so far
        self.queries = 0  # queries answered so far
        self.waiting = 0  # queries queued, not yet taken into a batch
        self.expected = 1  # queries the next batch waits for (see the class docstring)

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.arrived = asyncio.Event()
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

    def retry_after(self) -> int:
        """Seconds until the queries now pending have likely been answered (at least 1)."""
        batches = math.ceil(self.pending / self.max_batch)
        return max(1, math.ceil(batches * (self.batch_seconds or 1.0)))

    async def search(self, queries: list[str], k: int, mode: str | None = None, fusion=None):
        if self.pending + len(queries) > self.max_pending:
            raise Saturated(self.retry_after())
        self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending += len(queries)
        self.waiting += len(queries)
        try:
            await self.queue.put((queries, k, fut, loop.time(), mode, fusion))
            self.arrived.set()
            return await fut
        finally:
            self.pending -= len(queries)

    def _take(self, item: tuple) -> tuple:
        self.waiting -= len(item[0])
        return item

    async def _collect(self) -> list[tuple]:
        loop = asyncio.get_running_loop()
        batch = [self._take(await self.queue.get())]
        n = len(batch[0][0])
        target = min(self.max_batch, max(self.expected, 1))
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if n >= target or remaining <= 0:
                    break
                self.arrived.clear()
                try:  # waits on an event, not on queue.get(): a timed-out get could drop a request
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            item = self.queue.get_nowait()
            batch.append(self._take(item))
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
            t0 = loop.time()
            try:
                hits = await loop.run_in_executor(self.executor, self.searcher.search_requests, requests)
            except Exception as e:  # handed to every waiting request, which answers 500
                log.exception("search failed for a batch of %d queries", len(queries))
                for b in batch:
                    if not b[2].done():
                        b[2].set_exception(e)
                continue
            took = loop.time() - t0
            self.batch_seconds = took if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * took
            self.batches += 1
            self.queries += len(queries)
            self.expected = len(queries) + self.waiting
            for b, h in zip(batch, hits):
                if not b[2].done():
                    b[2].set_result(h)


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------
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

    from .serve_limits import RequestGuard
    from .serve_schema import SEARCH_RESPONSE, Health, Info, error_responses, request_model

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
            mode, fusion = _mode_and_fusion(searcher, req)
        except ValueError as e:  # the request model already rejects what the index cannot do
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
    slow connections by the head, body and keep-alive timeouts (see :mod:`llara.serve_limits`)."""
    import uvicorn

    from .retrieval.searcher import Searcher
    from .serve_limits import head_deadline_protocol

    if not _is_loopback(host):
        log.warning("serving on %s: reachable from other machines; the service has no authentication", host)
    searcher = Searcher.from_index(index_dir, device=device, params=params, verify=verify, backend=backend,
                                   collection=collection, runtime=runtime)
    app = create_app(searcher, **app_kwargs)
    log.info("serving %d passages on http://%s:%d", len(searcher.index), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=1,
                http=head_deadline_protocol(head_timeout), timeout_keep_alive=keep_alive)
