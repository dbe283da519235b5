"""``llara serve``: an HTTP search and OpenAI-compatible embedding service (FastAPI + uvicorn).

- ``app.py``: the endpoints and their errors (:func:`~llara.serve.app.create_app`);
- ``server.py``: :func:`~llara.serve.server.run`, listen at once, load the index in a thread, serve it;
- ``readiness.py``: the service that answers probes while the model loads;
- ``schema.py``: the request and response models (the OpenAPI contract);
- ``limits.py``: read deadlines and body limits against slow or oversized clients;
- ``batching.py``: micro-batching, concurrent requests sharing one encoder call;
- ``metrics.py``: the Prometheus metrics (``GET /metrics``);
- ``loadtest.py``: ``llara loadtest``, a bounded load test of a running service.
"""
