"""Search a persistent index with the model recorded in its manifest: dense, BM25 or hybrid.

``mode="hybrid"`` retrieves the top ``FusionConfig.candidate_depth(k)`` documents per query from
the dense index and from the BM25 index, and fuses the two runs with
:func:`llara.retrieval.fusion.fuse`, so a hybrid hit list is exactly the library fusion of the
``dense`` and ``bm25`` hit lists at that depth.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from ..prompts import Template
from .fusion import FusionConfig, fuse
from .store import DenseIndex, open_index

log = logging.getLogger(__name__)

__all__ = ["Hit", "Request", "Searcher", "MODES"]

MODES = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    title: str


@dataclass(frozen=True)
class Request:
    """One search: its queries, ``k``, and optionally a mode and fusion settings (default: the
    searcher's)."""

    queries: tuple[str, ...]
    k: int = 10
    mode: str | None = None
    fusion: FusionConfig | None = None


class Searcher:
    """An encoder and an opened index that were built for each other.

    Examples:
        ``index_dir`` is a folder written by ``llara index`` or ``llara.build_index`` (here: the
        shipped MED abstracts indexed with a tiny random model):

        >>> from llara import Searcher
        >>> s = Searcher.from_index(index_dir)                        # loads the model the index names
        >>> s.default_mode, s.modes                                   # the index holds BM25 too
        ('hybrid', ('dense', 'bm25', 'hybrid'))
        >>> hits = s.search("lung cancer in smokers", k=3)[0]        # one list of hits per query
        >>> len(hits), type(hits[0].doc_id).__name__
        (3, 'str')
        >>> [h.doc_id for h in s.search("lung cancer in smokers", k=3, mode="bm25")[0]]   # BM25 needs no model
        ['141', '774', '784']
    """

    def __init__(self, encoder, index: DenseIndex, bm25=None, fusion: FusionConfig | None = None):
        """``bm25``: a :class:`~llara.retrieval.bm25.BM25Index` over the same rows (None: dense only);
        ``fusion``: the default hybrid settings (default: the index manifest's, else the library's)."""
        dim = getattr(getattr(encoder.model, "config", None), "hidden_size", None)
        if dim is not None and dim != index.dimension:
            raise ValueError(f"the encoder gives {dim}-d vectors, the index at {index.path} holds {index.dimension}-d")
        if bm25 is not None and bm25.num_docs != len(index):
            raise ValueError(f"the BM25 index holds {bm25.num_docs} documents, the dense index {len(index)}")
        self.encoder = encoder
        self.index = index
        self.bm25 = bm25
        self.fusion = fusion or FusionConfig.from_dict(index.manifest.get("fusion"))
        self._rows: dict[str, int] | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.bm25 is not None else ("dense",)

    @property
    def default_mode(self) -> str:
        return "hybrid" if self.bm25 is not None else "dense"

    def check_mode(self, mode: str | None) -> str:
        """The mode to use (None: the default); ValueError for an unknown or unavailable one."""
        mode = mode or self.default_mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} needs a BM25 index, and this index has none (built before hybrid "
                             "search or with --no-bm25; add it with llara index --resume); use mode 'dense'")
        return mode

    def plan(self, mode: str | None = None, **fusion) -> tuple[str, FusionConfig | None]:
        """The mode of one search (None: the default; :meth:`check_mode`) and its fusion settings: None
        when no setting is given (the searcher's apply), else the searcher's with those given (not None)
        replaced; ``fusion=`` names the method, the other keys are :class:`FusionConfig` fields.

        The rule lives here, for the command line and the service alike: fusion settings are only for
        hybrid search; given with another mode they are a ValueError that names them."""
        mode = self.check_mode(mode)
        given = {k: v for k, v in fusion.items() if v is not None}
        if not given:
            return mode, None
        if mode != "hybrid":
            raise ValueError(f"{', '.join(given)}: only for mode 'hybrid' (this search's mode is {mode!r})")
        return mode, FusionConfig(**{**self.fusion.to_dict(),
                                     **{("method" if k == "fusion" else k): v for k, v in given.items()}})

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
        runtime: str | None = None,
    ) -> "Searcher":
        """Open ``index_dir`` and load the model its manifest names, with its template and lengths.

        ``model`` overrides the recorded model spec (e.g. the checkpoint moved); ``params`` are FAISS
        run-time parameters such as ``"nprobe=32"`` or ``"efSearch=128"``. ``backend="qdrant"``:
        ``index_dir`` is a Qdrant URI (server URL or local directory) holding ``collection``
        (see :mod:`llara.retrieval.qdrant`; ``params`` such as ``"exact=1"`` or ``"hnsw_ef=128"``).
        ``runtime`` (``torch`` or ``onnx-int8``) defaults to the one the index was built with.
        """
        from ..modeling.encoder import Encoder
        from .lexical import open_bm25

        if backend == "qdrant":
            from .qdrant import DEFAULT_COLLECTION, open_qdrant

            index = open_qdrant(str(index_dir), collection or DEFAULT_COLLECTION)
        elif backend == "faiss":
            index = open_index(index_dir, verify=verify)
        else:
            raise ValueError(f"unknown index backend {backend!r} (faiss or qdrant)")
        index.set_params(params)
        # the BM25 half lives in the index folder; a Qdrant collection serves dense search only
        bm25 = open_bm25(index_dir, index.manifest, index.ids, verify=verify) if backend == "faiss" else None
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
            runtime=runtime or m.get("runtime", "torch"),
        )
        log.info("searcher: %d passages, model %s, template %s, runtime %s, modes %s", len(index), encoder.model_id,
                 encoder.template.name, encoder.runtime, "/".join(MODES if bm25 is not None else ("dense",)))
        return cls(encoder, index, bm25)

    def search(self, queries: "Sequence[str] | str", k: int = 10, *, mode: str | None = None,
               fusion: FusionConfig | None = None) -> list[list[Hit]]:
        """Top-``k`` hits for each query, best first (a single string gives a list of one list).

        ``mode``: dense, bm25 or hybrid (default: hybrid when the index has BM25, else dense);
        ``fusion``: hybrid settings (default: those recorded in the index)."""
        if isinstance(queries, str):
            queries = [queries]
        return self.search_requests([Request(tuple(queries), k, mode, fusion)])[0]

    def search_requests(self, requests: Sequence[Request]) -> list[list[list[Hit]]]:
        """Answer several requests with one encoder call for all their dense (and hybrid) queries."""
        plans = []
        for r in requests:
            if isinstance(r.k, bool) or not isinstance(r.k, int) or r.k < 1:
                raise ValueError(f"k must be a positive integer, got {r.k!r}")
            mode = self.check_mode(r.mode)
            fusion = r.fusion or self.fusion
            plans.append((r, mode, fusion, fusion.candidate_depth(r.k) if mode == "hybrid" else r.k))
        dense_q = [q for r, mode, _, _ in plans if mode != "bm25" for q in r.queries]
        dense_hits = iter(self._dense(dense_q, max((d for _, m, _, d in plans if m != "bm25"), default=1)))
        out = []
        for r, mode, fusion, depth in plans:
            dense = [next(dense_hits)[:depth] for _ in r.queries] if mode != "bm25" else None
            lexical = self._bm25(list(r.queries), depth) if mode != "dense" else None
            if mode == "hybrid":
                out.append([self._fuse(d, b, fusion, r.k) for d, b in zip(dense, lexical)])
            else:
                out.append(dense if mode == "dense" else lexical)
        return out

    def _dense(self, queries: list[str], k: int) -> list[list[Hit]]:
        if not queries:
            return []
        scores, rows = self.index.search(self.encoder.encode(queries, "query"), k)
        return [self._hits(zip(rrow.tolist(), srow.tolist())) for srow, rrow in zip(scores, rows)]

    def _bm25(self, queries: list[str], k: int) -> list[list[Hit]]:
        return [self._hits(h) for h in self.bm25.search(queries, k)] if queries else []

    def _hits(self, pairs) -> list[Hit]:
        ids, titles = self.index.ids, self.index.titles
        return [Hit(ids[r], float(s), titles[r]) for r, s in pairs if r >= 0]

    def _fuse(self, dense: list[Hit], lexical: list[Hit], fusion: FusionConfig, k: int) -> list[Hit]:
        fused = fuse({"q": {h.doc_id: h.score for h in dense}}, {"q": {h.doc_id: h.score for h in lexical}},
                     fusion, k=k)["q"]
        if self._rows is None:
            self._rows = {d: i for i, d in enumerate(self.index.ids)}
        titles = self.index.titles
        return [Hit(d, s, titles[self._rows[d]]) for d, s in fused.items()]

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
            "modes": list(self.modes),
            "default_mode": self.default_mode,
            "fusion": self.fusion.to_dict() if self.bm25 is not None else None,
            "bm25": {k: v for k, v in m["bm25"].items() if k not in ("files", "path", "ids_sha256")}
            if self.bm25 is not None and m.get("bm25") else None,
        }
