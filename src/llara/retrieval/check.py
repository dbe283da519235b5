"""Check an index directory against its manifest without reading it into memory.

``check_index(dir)`` is the light check that ``llara check-index`` runs and that ``search`` and
``serve`` run on open when told ``--no-verify``: every shard file exists with the size the
manifest records, each ``.npy`` header says float32 ``(rows, dimension)``, the id and title files
have one line per row and their recorded sha256 (they are small: they map rows to doc ids), and
the FAISS file has its recorded size. ``full=True`` hashes the embeddings and the FAISS file too
(what opening without ``--no-verify`` does). Any mismatch raises ``DataError`` naming the file.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..io import DataError
from .store import MANIFEST, read_manifest, sha256_file, verify_shard

__all__ = ["check_index"]


def check_index(index_dir: "str | os.PathLike", *, full: bool = False) -> dict:
    """Check ``index_dir``; returns what was checked (shards, rows, files, bytes, bytes hashed, seconds)."""
    t0 = time.perf_counter()
    d = Path(index_dir)
    manifest = read_manifest(d)
    shards = manifest.get("shards") or []
    for shard in shards:
        verify_shard(d, shard, manifest.get("dimension"), checksum=full)
    files = [info for s in shards for info in s["files"].values()]
    hashed = sum(info["bytes"] for s in shards for role, info in s["files"].items() if full or role != "embeddings")
    faiss_info = manifest.get("faiss")
    if faiss_info:
        path = d / faiss_info["path"]
        if not path.is_file():
            raise DataError(path, None, "FAISS index file is missing")
        size = path.stat().st_size
        if size != faiss_info["bytes"]:
            raise DataError(path, None, f"FAISS index file has {size} bytes, the manifest says "
                                        f"{faiss_info['bytes']} (truncated or overwritten)")
        if full and sha256_file(path) != faiss_info["sha256"]:
            raise DataError(path, None, "FAISS index file: sha256 mismatch (corrupt)")
        if faiss_info.get("ntotal", manifest["count"]) != manifest["count"]:
            raise DataError(path, None, f"FAISS index holds {faiss_info['ntotal']} vectors, the shards "
                                        f"{manifest['count']}")
        files.append(faiss_info)
        hashed += faiss_info["bytes"] if full else 0
    rows = sum(s["rows"] for s in shards)
    if rows != manifest.get("count", rows):
        raise DataError(d / MANIFEST, None, f"the shards hold {rows} rows, the manifest's count is "
                                                   f"{manifest['count']}")
    return {
        "path": str(d),
        "complete": bool(manifest.get("complete")),
        "part": manifest.get("part"),
        "shards": len(shards),
        "rows": rows,
        "files": len(files),
        "bytes": sum(info["bytes"] for info in files),
        "bytes_hashed": hashed,
        "full": full,
        "seconds": round(time.perf_counter() - t0, 3),
    }
