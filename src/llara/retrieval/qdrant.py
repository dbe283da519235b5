"""Qdrant as an index backend: a finished llara index folder's shards exported into a collection, and
searched through the same interface as :class:`~llara.retrieval.store.DenseIndex`.

``uri`` is a directory (Qdrant's embedded "local" mode: ``QdrantClient(path=...)``, pure Python, one
process at a time, exact search only), ``:memory:``, or a server URL ``http(s)://host:6333`` (API key,
if any, from ``$QDRANT_API_KEY``); the same code serves all three.

A collection holds one point per passage: vector (distance ``Dot``, i.e. FAISS's inner product), and
payload ``doc_id``, ``title`` and ``row`` (the row in the llara index: shard order). Point ids are
UUIDv5 of the doc id, so an export that is interrupted (even by ``kill -9``) and run again overwrites
what it had written (``upsert``): no passage is lost or stored twice. The collection's metadata (key
``llara``) records the index's model, template, lengths and dimension, and the shards already
exported (with their checksums), so a rerun skips them.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..io import DataError
from .store import (
    FORMAT,
    FORMAT_VERSION,
    load_embeddings,
    read_ids,
    read_manifest,
    read_titles,
    setting_differences,
    verify_shard,
)

log = logging.getLogger(__name__)

__all__ = ["connect", "export_to_qdrant", "open_qdrant", "point_id", "QdrantIndex", "DEFAULT_COLLECTION"]

DEFAULT_COLLECTION = "llara"
META_KEY = "llara"
# Namespace of the point ids: uuid5(_NAMESPACE, doc_id) is stable across runs, machines and versions.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/llara/point-id")
# What must agree between an index and a collection it is exported into (or resumed in).
_SETTINGS = ("model", "dimension", "metric", "shard_size", "corpus_documents")
_PAYLOAD = ["doc_id", "title", "row"]


def _require():
    try:
        import qdrant_client  # noqa: F401
    except ImportError:
        raise ImportError("the qdrant backend needs qdrant-client: pip install 'llara[qdrant]'") from None


def connect(uri: str):
    """A ``QdrantClient`` for a server URL, ``:memory:``, or a local directory (embedded mode)."""
    _require()
    from qdrant_client import QdrantClient

    if is_server(uri):
        return QdrantClient(url=uri, api_key=os.environ.get("QDRANT_API_KEY"))
    if uri == ":memory:":
        return QdrantClient(location=":memory:")
    Path(uri).mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=uri)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def _metadata(client, collection: str) -> dict | None:
    config = client.get_collection(collection).config
    return (getattr(config, "metadata", None) or {}).get(META_KEY)


def _set_metadata(client, collection: str, meta: dict) -> None:
    client.update_collection(collection, metadata={META_KEY: meta})


def _shard_rows(manifest: dict) -> Iterator[tuple[dict, int]]:
    offset = 0
    for s in manifest["shards"]:
        yield s, offset
        offset += s["rows"]


def export_to_qdrant(
    index_dir: "str | os.PathLike",
    uri: str,
    collection: str = DEFAULT_COLLECTION,
    *,
    batch_size: int = 512,
    verify: bool = True,
    hnsw_m: int = 16,
    hnsw_ef_construct: int = 100,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Write a finished index's vectors, doc ids and titles into ``collection`` (created if missing).

    Resumable: shards recorded in the collection's metadata with the same checksum are skipped, the
    others are upserted again. ``on_batch(points_written)`` is called after each upsert. Returns the
    collection's llara metadata.
    """
    from qdrant_client import models

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if manifest.get("part"):
        raise DataError(index_dir, None, "this is a part of an index; merge the parts first (llara merge)")
    if not manifest.get("complete"):
        raise DataError(index_dir, None, "the index is unfinished; finish it with --resume before exporting")
    client = connect(uri)
    try:
        wanted = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "llara_version": manifest["llara_version"],
            **{k: manifest.get(k) for k in _SETTINGS}, "normalized": manifest.get("normalized"),
            "count": manifest["count"], "factory": "qdrant", "source_index": str(index_dir.resolve()),
        }
        where = f"{uri} (collection {collection!r})"
        if client.collection_exists(collection):
            meta = _metadata(client, collection)
            if meta is None:
                raise DataError(where, None, "the collection exists and was not written by llara; choose another "
                                             "--collection")
            diffs = [d for k in _SETTINGS for d in setting_differences(meta.get(k), wanted[k], k)]
            if diffs:
                raise DataError(where, None, f"the collection holds another index: {'; '.join(diffs)}; choose "
                                             "another --collection or delete it")
            exported = dict(meta.get("exported_shards") or {})
            log.info("resuming the export into %s: %d of %d shards already there", where, len(exported),
                     len(manifest["shards"]))
        else:
            client.create_collection(
                collection,
                vectors_config=models.VectorParams(size=manifest["dimension"], distance=models.Distance.DOT),
                hnsw_config=models.HnswConfigDiff(m=hnsw_m, ef_construct=hnsw_ef_construct),
                metadata={META_KEY: {**wanted, "complete": False, "exported_shards": {}}},
            )
            if is_server(uri):  # embedded mode has no payload indexes (it scans)
                for field, schema in (("row", models.PayloadSchemaType.INTEGER),
                                      ("doc_id", models.PayloadSchemaType.KEYWORD)):
                    client.create_payload_index(collection, field, field_schema=schema)
            exported = {}
        meta = {**wanted, "complete": False, "exported_shards": exported}
        _set_metadata(client, collection, meta)
        written = 0
        for s, offset in _shard_rows(manifest):
            sha = s["files"]["embeddings"]["sha256"]
            if exported.get(str(s["number"])) == sha:
                continue
            verify_shard(index_dir, s, manifest["dimension"], checksum=verify)
            emb = load_embeddings(index_dir, s, mmap=False)
            ids = read_ids(index_dir / s["files"]["ids"]["path"])
            titles = read_titles(index_dir / s["files"]["titles"]["path"])
            for start in range(0, len(ids), batch_size):
                stop = min(start + batch_size, len(ids))
                client.upsert(collection, wait=True, points=models.Batch(
                    ids=[point_id(d) for d in ids[start:stop]],
                    vectors=emb[start:stop].tolist(),
                    payloads=[{"doc_id": d, "title": t, "row": offset + start + i}
                              for i, (d, t) in enumerate(zip(ids[start:stop], titles[start:stop]))],
                ))
                written += stop - start
                if on_batch is not None:
                    on_batch(written)
            exported[str(s["number"])] = sha
            _set_metadata(client, collection, {**meta, "exported_shards": exported})
            log.info("exported shard %d (%d passages) into %s", s["number"], len(ids), where)
        count = client.count(collection, exact=True).count
        if count != manifest["count"]:
            raise DataError(where, None, f"the collection holds {count} points, the index {manifest['count']} passages")
        meta = {**meta, "exported_shards": exported, "complete": True}
        _set_metadata(client, collection, meta)
    finally:
        client.close()
    return meta


class _RowView:
    """``ids[row]`` / ``titles[row]`` of a Qdrant-backed index, like DenseIndex's lists: answered from
    the payloads of recent searches, else fetched by ``row``."""

    def __init__(self, index: "QdrantIndex", field: str):
        self.index, self.field = index, field

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> str:
        return self.index._payload(int(row))[self.field]

    def __iter__(self) -> Iterator[str]:
        for row in range(len(self)):
            yield self[row]


class QdrantIndex:
    """An exported index opened in Qdrant; ``search`` has DenseIndex's contract (rows = llara rows)."""

    CACHE = 100_000  # payloads kept for ids[row] / titles[row] after a search

    def __init__(self, client, collection: str, uri: str):
        self.client, self.collection, self.uri = client, collection, uri
        self.path = f"{uri}#{collection}"
        if not client.collection_exists(collection):
            raise DataError(self.path, None, "no such collection; export an index into it with "
                                             "llara index --backend qdrant")
        meta = _metadata(client, collection)
        if meta is None:
            raise DataError(self.path, None, "this collection was not written by llara (no llara metadata)")
        if not meta.get("complete"):
            raise DataError(self.path, None, "the export is unfinished; run the same llara index command again "
                                             "with --resume")
        self.manifest = meta
        self.ids, self.titles = _RowView(self, "doc_id"), _RowView(self, "title")
        self._params = None  # models.SearchParams (servers only)
        self._cache: OrderedDict[int, dict] = OrderedDict()

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def set_params(self, params: str | None) -> None:
        """Qdrant search parameters, e.g. ``"exact=1"`` (brute force) or ``"hnsw_ef=128"``."""
        from qdrant_client import models

        if not params:
            return
        values = {}
        for item in params.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key == "exact":
                values["exact"] = value.strip().lower() in ("1", "true", "yes")
            elif key == "hnsw_ef":
                values["hnsw_ef"] = int(value)
            else:
                raise ValueError(f"unknown Qdrant search parameter {key!r} (known: exact, hnsw_ef)")
        if is_server(self.uri):
            self._params = models.SearchParams(**values)
        else:
            log.info("embedded Qdrant searches exactly (brute force); %r has no effect", params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from qdrant_client import models

        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise ValueError(f"queries must be (n, {self.dimension}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self))
        requests = [models.QueryRequest(query=v.tolist(), limit=k, with_payload=_PAYLOAD, params=self._params)
                    for v in q]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for i, response in enumerate(responses):
            for j, point in enumerate(response.points):
                scores[i, j], rows[i, j] = point.score, point.payload["row"]
                self._remember(point.payload)
        return scores, rows

    def close(self) -> None:
        """Release the client (in embedded mode: the directory's lock)."""
        self.client.close()

    def _remember(self, payload: dict) -> None:
        self._cache[payload["row"]] = payload
        self._cache.move_to_end(payload["row"])
        while len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)

    def _payload(self, row: int) -> dict:
        if row in self._cache:
            return self._cache[row]
        from qdrant_client import models

        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range (0..{len(self) - 1})")
        points, _ = self.client.scroll(self.collection, limit=1, with_payload=_PAYLOAD, scroll_filter=models.Filter(
            must=[models.FieldCondition(key="row", match=models.MatchValue(value=row))]))
        if not points:
            raise DataError(self.path, None, f"no point for row {row}; export the index again")
        self._remember(points[0].payload)
        return points[0].payload


def open_qdrant(uri: str, collection: str = DEFAULT_COLLECTION) -> QdrantIndex:
    """Open a collection written by :func:`export_to_qdrant` (``DataError`` when it is missing or unfinished)."""
    return QdrantIndex(connect(uri), collection, uri)

