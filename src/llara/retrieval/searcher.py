"""Search a persistent index with the model recorded in its manifest."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from ..prompts import Template
from .index import DenseIndex, open_index

log = logging.getLogger(__name__)

__all__ = ["Hit", "Searcher"]


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    title: str


class Searcher:
    """An encoder and an opened index that were built for each other.

    >>> s = Searcher.from_index("runs/index")                     # doctest: +SKIP
    >>> s.search("what is dense retrieval?", k=3)[0][0].doc_id     # doctest: +SKIP
    """

    def __init__(self, encoder, index: DenseIndex):
        dim = getattr(getattr(encoder.model, "config", None), "hidden_size", None)
        if dim is not None and dim != index.dimension:
            raise ValueError(f"the encoder gives {dim}-d vectors, the index at {index.path} holds {index.dimension}-d")
        self.encoder = encoder
        self.index = index

    @classmethod
    def from_index(
        cls,
        index_dir: "str | os.PathLike",
        device: str | None = None,
        *,
        model: str | None = None,
        dtype: str | None = None,
        batch_size: int = 32,
        params: str | None = None,
        verify: bool = True,
        backend: str = "faiss",
        collection: str | None = None,
    ) -> "Searcher":
        """Open ``index_dir`` and load the model its manifest names, with its template and lengths.

        ``model`` overrides the recorded model spec (e.g. the checkpoint moved); ``params`` are FAISS
        run-time parameters such as ``"nprobe=32"`` or ``"efSearch=128"``. ``backend="qdrant"``:
        ``index_dir`` is a Qdrant URI (server URL or local directory) holding ``collection``
        (see :mod:`llara.retrieval.qdrant`; ``params`` such as ``"exact=1"`` or ``"hnsw_ef=128"``).
        """
        from ..modeling.encoder import Encoder

        if backend == "qdrant":
            from .qdrant import DEFAULT_COLLECTION, open_qdrant

            index = open_qdrant(str(index_dir), collection or DEFAULT_COLLECTION)
        elif backend == "faiss":
            index = open_index(index_dir, verify=verify)
        else:
            raise ValueError(f"unknown index backend {backend!r} (faiss or qdrant)")
        index.set_params(params)
        m = index.manifest["model"]
        encoder = Encoder.from_pretrained(
            model or m["spec"],
            template=Template.from_dict(m["template"], source=f"{index_dir}/manifest.json"),
            device=device,
            dtype=dtype,
            max_query_length=m["max_query_length"],
            max_passage_length=m["max_passage_length"],
            batch_size=batch_size,
            show_progress=False,
        )
        log.info("searcher: %d passages, model %s, template %s", len(index), encoder.model_id, encoder.template.name)
        return cls(encoder, index)

    def search(self, queries: "Sequence[str] | str", k: int = 10) -> list[list[Hit]]:
        """Top-``k`` hits for each query, best first (a single string gives a list of one list)."""
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if not queries:
            return []
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        q = self.encoder.encode(queries, "query")
        scores, rows = self.index.search(q, k)
        ids, titles = self.index.ids, self.index.titles
        return [
            [Hit(ids[r], float(s), titles[r]) for s, r in zip(srow.tolist(), rrow.tolist()) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]

    def info(self) -> dict:
        """What is being served (no file paths)."""
        m = self.index.manifest
        return {
            "model_id": m["model"]["model_id"],
            "template": m["model"]["template"]["name"],
            "max_query_length": m["model"]["max_query_length"],
            "passages": len(self.index),
            "dimension": self.index.dimension,
            "factory": m["factory"],
            "llara_version": m["llara_version"],
        }
