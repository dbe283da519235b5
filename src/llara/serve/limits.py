"""What keeps slow or hostile clients from holding ``llara serve``: read deadlines and body limits.

uvicorn brings an idle keep-alive timeout (``timeout_keep_alive``, armed after each response) and a
cap on the size of a request head (h11's 16 KiB), and nothing else we want: it has no deadline for
reading a request head or body, and its ``limit_concurrency`` counts open *connections*, so a few
hundred idle or half-sent requests answer every new client with 503 (the lock-out this module
replaces). hypercorn is no better here: its idle and read timeouts restart with every byte, so a
client trickling one byte a second holds a connection forever, and it has no body deadline either.
So the service keeps uvicorn and adds two small pieces:

* :func:`head_deadline_protocol`: uvicorn's h11 protocol plus a deadline for each request head,
  counted from when the connection opens or the previous response ends; a connection whose head
  is not complete by then is closed (bytes trickled in do not restart it);
* :class:`RequestGuard`: ASGI middleware for the routes that take a JSON body: 415 unless the body
  is declared JSON, 413 over ``max_bytes`` (by Content-Length, then by the bytes received), 408
  when the whole body has not arrived within ``body_timeout`` seconds of its head (a body shorter
  than its Content-Length). Other requests pass untouched: the router answers 404 or 405.

* :class:`BearerAuth`: with ``--api-key``, every route but the probes, the metrics and the schema
  needs ``Authorization: Bearer <key>`` (compared in constant time); it runs before the body is
  read, so a client without the key cannot make the service read or buffer anything.

Admission control (429 with ``Retry-After`` when the encoder's queue is full) lives with the
micro-batcher in :mod:`llara.serve.batching`: it counts queries waiting for the encoder, never sockets.
Error bodies have the service's error shape for the path (:func:`llara.serve.schema.error_json`):
``{"error": "<message>"}``, or OpenAI's under ``/v1``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging

from .schema import error_json

log = logging.getLogger(__name__)

__all__ = ["BearerAuth", "OPEN_PATHS", "RequestGuard", "head_deadline_protocol", "send_error"]

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""Paths answered without the API key: the probes (a kubelet or load balancer has no key), the
metrics (scraped from inside the cluster) and the schema and its viewers (not secret)."""


async def send_error(send, status: int, message: str, headers: tuple = (), *, path: str = "", close: bool = True,
                     code: str | None = None) -> None:
    """Answer ``status`` with the error body for ``path``; close the connection unless told not to (a
    body left unread must not be taken for the next request)."""
    body = json.dumps(error_json(path, status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *([(b"connection", b"close")] if close else []), *headers]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """401 with ``WWW-Authenticate: Bearer`` for requests outside :data:`OPEN_PATHS` whose
    ``Authorization`` header is not ``Bearer <api_key>``."""

    def __init__(self, app, *, api_key: str):
        if not api_key:
            raise ValueError("the API key is empty")
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "missing API key: send Authorization: Bearer <key>" if not given else "invalid API key"
        await send_error(send, 401, message, ((b"www-authenticate", b"Bearer"),), path=scope["path"])


class _TooLarge(Exception):
    pass


class RequestGuard:
    """Content type, size and read deadline of the JSON bodies of ``json_routes`` ({(method, path)})."""

    def __init__(self, app, *, json_routes, max_bytes: int, body_timeout: float):
        self.app = app
        self.json_routes = set(json_routes)
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) not in self.json_routes:
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])  # lower-cased names; a repeated header keeps its last value
        ctype = headers.get(b"content-type", b"")
        mime = ctype.split(b";")[0].strip().lower()
        if mime != b"application/json" and not mime.endswith(b"+json"):
            return await send_error(send, 415, "Content-Type must be application/json, got "
                                               f"{ctype.decode('latin-1') or 'none'}", path=path)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_error(send, 400, "invalid Content-Length header", path=path)
            if size > self.max_bytes:
                return await send_error(send, 413, f"request body of {size} bytes is over the limit of "
                                                   f"{self.max_bytes} bytes", path=path)
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout)
        except asyncio.TimeoutError:
            log.debug("408: request body from %s not received within %g s", scope.get("client"), self.body_timeout)
            return await send_error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                    path=path)
        except _TooLarge:
            return await send_error(send, 413, f"request body is over the limit of {self.max_bytes} bytes", path=path)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def head_deadline_protocol(head_timeout: float):
    """uvicorn's h11 protocol class with a deadline of ``head_timeout`` seconds for each request head
    (pass it as ``uvicorn.run(..., http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline(self.scope)

        def on_response_complete(self) -> None:
            finished = self.scope
            super().on_response_complete()  # may start a pipelined request (a new scope)
            if self.scope is finished and not self.transport.is_closing():
                self._arm_head_deadline(finished)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self, scope) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_expired, scope)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a malformed request, with the service's error body instead of text."""
            import h11

            body = json.dumps({"error": msg}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _head_expired(self, scope) -> None:
            # Still the same scope: no new request head was parsed since the deadline was armed.
            if self.scope is scope and not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request head within %g s", self.client,
                          head_timeout)
                self.transport.close()

    return HeadDeadlineH11Protocol
