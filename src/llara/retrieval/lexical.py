"""The BM25 half of an index folder, for hybrid search.

``llara index`` writes, next to the dense shards::

    bm25/                 the bm25s index of the same corpus (bm25s's own .npy/.json files, no pickles;
                          the vocabulary numbered in sorted order, so one corpus gives the same bytes)

and records it in ``manifest.json`` under ``"bm25"``: every file with its sha256 and size (checked on
open like the dense shards), the tokenisation and scoring settings (those of
:func:`llara.retrieval.bm25.bm25_search`, which evaluation uses), the number of documents and a
sha256 of the document ids in row order, so that BM25 row ``i`` is provably dense row ``i``. The
folder is written under a temporary name and moved into place; an interrupted build leaves no
``bm25/`` and is redone on resume. An index without ``"bm25"`` (built before hybrid search, or with
``--no-bm25``) opens as dense-only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..io import DataError, atomic_dir, passage_text
from .bm25 import BM25Index
from .store import iter_corpus, sha256_file

log = logging.getLogger(__name__)

__all__ = ["BM25_DIR", "build_bm25", "bm25_entry_ok", "ids_sha256", "open_bm25"]

BM25_DIR = "bm25"


def ids_sha256(ids: Iterable[str]) -> str:
    """sha256 of the ids, one per line, in row order."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def build_bm25(index_dir: "str | os.PathLike", corpus_path: "str | os.PathLike", language: str = "english") -> dict:
    """Index ``corpus.jsonl`` (streamed, in file order: the dense rows' order) into ``index_dir/bm25``;
    returns the manifest entry."""
    index_dir, corpus_path = Path(index_dir), Path(corpus_path)
    t0 = time.perf_counter()
    digest, count = hashlib.sha256(), 0

    def texts():
        nonlocal count
        for doc_id, title, text in iter_corpus(corpus_path):
            digest.update(doc_id.encode("utf-8", "surrogatepass") + b"\n")
            count += 1
            yield passage_text({"title": title, "text": text})

    try:
        bm25 = BM25Index.build(texts(), language)
    except ValueError:
        raise DataError(corpus_path, None, "no documents to index") from None
    with atomic_dir(index_dir / BM25_DIR) as tmp:
        bm25.save(tmp)
        files = {p.name: {"path": f"{BM25_DIR}/{p.name}", "sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir())}
    log.info("BM25 index of %d documents in %.1f s", count, time.perf_counter() - t0)
    return {"path": BM25_DIR, "documents": count, "ids_sha256": digest.hexdigest(), "files": files,
            **bm25.settings()}


def _check_files(index_dir: Path, entry: dict, checksum: bool) -> None:
    for name, info in entry["files"].items():
        path = index_dir / info["path"]
        if not path.is_file():
            raise DataError(path, None, "BM25 index file is missing; rebuild it with llara index --resume")
        if path.stat().st_size != info["bytes"] or (checksum and sha256_file(path) != info["sha256"]):
            raise DataError(path, None, "BM25 index file does not match its checksum (truncated or corrupt); "
                                        "rebuild it with llara index --resume")


def bm25_entry_ok(index_dir: "str | os.PathLike", entry: dict | None, documents: int, digest: str) -> bool:
    """Whether ``entry`` describes an intact BM25 folder over ``documents`` ids whose
    :func:`ids_sha256` is ``digest`` (to skip rebuilding it on resume)."""
    if not entry:
        return False
    try:
        _check_files(Path(index_dir), entry, checksum=True)
    except DataError as e:
        log.warning("%s", e)
        return False
    return entry.get("documents") == documents and entry.get("ids_sha256") == digest


def open_bm25(index_dir: "str | os.PathLike", manifest: dict, ids: Sequence[str], *, verify: bool = True
              ) -> BM25Index | None:
    """The index's BM25 half, or None when it has none. ``ids`` are the dense rows' ids."""
    entry = manifest.get("bm25")
    if not entry:
        return None
    d = Path(index_dir)
    _check_files(d, entry, checksum=verify)
    if entry["documents"] != len(ids) or entry["ids_sha256"] != ids_sha256(ids):
        raise DataError(d / BM25_DIR, None, f"the BM25 index holds {entry['documents']} documents that are not the "
                                            f"{len(ids)} dense rows in the same order; rebuild it")
    bm25 = BM25Index.load(d / entry["path"], entry.get("language", "english"))
    if bm25.num_docs != len(ids):
        raise DataError(d / BM25_DIR, None, f"holds {bm25.num_docs} documents, the index {len(ids)}")
    return bm25
