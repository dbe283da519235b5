"""``llara serve``'s process: listen at once, load the index and its model in a thread (``/ready`` says
when; :mod:`llara.serve.readiness`), then serve the app of :func:`llara.serve.app.create_app` with
uvicorn until interrupted. Binds to loopback unless told otherwise.
"""
import ipaddress
import logging
import os

from .app import create_app, route_of
from .batching import check_limits
from .readiness import Service

log = logging.getLogger(__name__)

__all__ = ["front", "run"]

DEFAULT_HEAD_TIMEOUT = 10.0  # seconds for a request head (from connect or the previous response)
DEFAULT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open after a response


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def front(service: Service, metrics, api_key: str | None = None):
    """The ASGI app ``llara serve`` runs around its :class:`~llara.serve.readiness.Service`: metrics of
    every request and, with an API key, the key checked first, also while the model is still loading
    (a wrong key gets 401 at once, not 503 and then 401)."""
    from .limits import BearerAuth
    from .metrics import MetricsMiddleware

    return MetricsMiddleware(BearerAuth(service, api_key=api_key) if api_key else service, metrics, route_of)


def run(
    index_dir: "str | os.PathLike | None",
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model: str | None = None,
    device: str | None = None,
    params: str | None = None,
    runtime: str | None = None,
    verify: bool = True,
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
    keep_alive: int = DEFAULT_KEEP_ALIVE,
    backend: str = "faiss",
    collection: str | None = None,
    api_key: str | None = None,
    max_batch_tokens: int | None = None,
    **app_kwargs,
) -> None:
    """Listen at once, load the index and its model in a thread (``/ready`` says when), then serve
    until interrupted (binds to loopback by default). Without ``index_dir``, ``model`` is loaded and
    served for embeddings only; with both, ``model`` replaces the one the index's manifest names.
    ``api_key`` (default: the environment variable ``LLARA_API_KEY``) turns on Bearer authentication.
    ``max_batch_tokens`` bounds the padded tokens of one forward pass: a micro-batch over it runs as
    several passes (:meth:`~llara.modeling.encoder.Encoder.set_max_batch_tokens`).

    uvicorn's ``limit_concurrency`` is left off on purpose: it counts open connections, so idle
    sockets would turn real requests away; load is bounded by ``max_pending`` instead, and idle or
    slow connections by the head, body and keep-alive timeouts (see :mod:`llara.serve.limits`)."""
    import uvicorn

    from .limits import head_deadline_protocol
    from .metrics import Metrics

    if index_dir is None and model is None:
        raise ValueError("give an index (--index DIR) or a model to serve embeddings only (--model)")
    if api_key is None:
        api_key = os.environ.get("LLARA_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty (--api-key or $LLARA_API_KEY)")
    # fail before listening on limits that cannot hold
    check_limits(app_kwargs.get("max_batch", 32), app_kwargs.get("max_pending"), app_kwargs.get("max_queries"),
                  app_kwargs.get("max_inputs"))
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s: reachable from other machines, without an API key (--api-key)", host)

    def load():
        if index_dir is None:
            from ..modeling.encoder import Encoder

            encoder = Encoder.from_pretrained(model, device=device, runtime=runtime or "torch", show_progress=False)
            return encoder.set_max_batch_tokens(max_batch_tokens)
        from ..retrieval.searcher import Searcher

        searcher = Searcher.from_index(index_dir, device=device, model=model, params=params, verify=verify,
                                       backend=backend, collection=collection, runtime=runtime)
        searcher.encoder.set_max_batch_tokens(max_batch_tokens)
        return searcher

    metrics = Metrics()

    def build(loaded):
        if index_dir is None:
            app = create_app(None, encoder=loaded, metrics=metrics, api_key=api_key, **app_kwargs)
            log.info("serving embeddings from %s on http://%s:%d", loaded.model_id, host, port)
        else:
            app = create_app(loaded, metrics=metrics, api_key=api_key, **app_kwargs)
            log.info("serving %d passages on http://%s:%d", len(loaded.index), host, port)
        return app

    service = Service(load, build, metrics)
    config = uvicorn.Config(front(service, metrics, api_key), host=host, port=port, log_level="warning",
                            access_log=False, workers=1, http=head_deadline_protocol(head_timeout),
                            timeout_keep_alive=keep_alive, lifespan="on")
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    service.on_error = stop
    log.info("listening on http://%s:%d; loading %s", host, port, index_dir or model)
    server.run()
    if service.error is not None:
        raise service.error
