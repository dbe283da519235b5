"""Readiness: ``llara serve`` listens at once and loads its model (and index) in a thread, so that
orchestrators see the process alive (``/health``) before it is ready (``/ready``)."""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

__all__ = ["LOADING_RETRY_AFTER", "Service"]

LOADING_RETRY_AFTER = 2  # seconds a client is told to wait while the model loads


class Service:
    """The ASGI app ``llara serve`` runs: it listens at once and loads the model (and index) in a
    thread, so that orchestrators see the process alive (``/health``) before it is ready
    (``/ready``). Until ``load()`` returns, ``/health`` and ``/metrics`` answer and every other path
    gets 503 with ``Retry-After``; then ``build(loaded)`` (a :func:`create_app`) answers everything.
    A failed load is kept in ``error`` and ``on_error()`` is called (``run`` stops the server)."""

    def __init__(self, load: Callable[[], Any], build: Callable[[Any], Any], metrics):
        self.load = load
        self.build = build
        self.metrics = metrics
        self.app = None
        self.error: BaseException | None = None
        self.on_error: Callable[[], None] = lambda: None
        self.loaded = threading.Event()  # set when loading ended, well or not

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.app = self.build(self.load())
            self.metrics.ready.set(1)
            log.info("ready after %.1f s", time.perf_counter() - t0)
        except BaseException as e:  # reported by run() once the server has stopped
            log.debug("loading failed", exc_info=True)
            self.error = e
            self.on_error()
        finally:
            self.loaded.set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        from .limits import send_error

        path, method = scope["path"], scope.get("method")
        if path == "/health" and method == "GET":
            return await _send_json(send, 200, {"status": "ok", "passages": None})
        if path == "/metrics" and method == "GET":
            from prometheus_client import CONTENT_TYPE_LATEST

            return await _send_bytes(send, 200, self.metrics.exposition(), CONTENT_TYPE_LATEST.encode())
        await send_error(send, 503, "not ready: the model and index are still loading (see GET /ready)",
                         ((b"retry-after", str(LOADING_RETRY_AFTER).encode()),), path=path)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                threading.Thread(target=self._load, name="llara-load", daemon=True).start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.app is not None:
                    await self.app.state.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send_bytes(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, obj) -> None:
    await _send_bytes(send, status, json.dumps(obj).encode(), b"application/json")
