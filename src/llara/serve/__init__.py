"""``llara serve``: an HTTP search service over a persistent index (FastAPI + uvicorn).

- ``app.py``: the endpoints, their errors, and :func:`~llara.serve.app.run` (load an index, serve it);
- ``schema.py``: the request and response models (the OpenAPI contract);
- ``limits.py``: read deadlines and body limits against slow or oversized clients;
- ``batching.py``: micro-batching, concurrent requests sharing one encoder call;
- ``loadtest.py``: ``llara loadtest``, a bounded load test of a running service.
"""
