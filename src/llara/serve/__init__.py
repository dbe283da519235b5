"""``llara serve``: an HTTP search and OpenAI-compatible embedding service (FastAPI + uvicorn).

- ``app.py``: the endpoints, their errors, and :func:`~llara.serve.app.run` (load an index, serve it);
- ``schema.py``: the request and response models (the OpenAPI contract);
- ``limits.py``: read deadlines and body limits against slow or oversized clients;
- ``batching.py``: micro-batching, concurrent requests sharing one encoder call;
- ``metrics.py``: the Prometheus metrics (``GET /metrics``);
- ``loadtest.py``: ``llara loadtest``, a bounded load test of a running service.
"""
