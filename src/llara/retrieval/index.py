"""Building a persistent dense index, shard by shard, resumable; merging the parts of a split build.

The folder's format (manifest, shard files, checksums, readers, :func:`~llara.retrieval.store.open_index`)
is :mod:`llara.retrieval.store`; ``docs/index-format.md`` describes it for a reader.

The corpus is streamed: only one shard of passages is in memory at a time. Every file is written
to a temporary name and moved into place with ``os.replace``, and the manifest is rewritten after
each finished shard, so an interrupted run resumes (``resume=True``) after its last finished shard.
Two builds of one corpus with one model write the same bytes, resumed or not: timings go to
``build-log.jsonl``, which is no part of the index.

``shard=(i, n)`` encodes only the shards whose number ``s`` has ``s % n == i`` (round robin over
the same global shards a single run writes), into a partial directory; :func:`merge_indexes` joins
the ``n`` parts into an index byte-for-byte equal, shard by shard, to a single run's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import __version__
from ..io import DataError, atomic_path, passage_text, write_json
from ..training.logging_utils import JsonlLog
from .faiss_index import build_faiss, check_factory
from .store import (BUILD_LOG, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_DIR, iter_corpus, parse_shard_spec, read_ids,
                    read_manifest, setting_differences, verify_shard, write_shard)

log = logging.getLogger(__name__)

__all__ = ["build_index", "merge_indexes", "LocalEngine", "ShardJob", "ShardResult"]

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_TRAIN_SIZE = 200_000
# Settings that must agree between an interrupted run and its resumption, or between merged parts.
_SETTINGS = ("model", "shard_size", "factory", "corpus_documents")


def _iter_shards(path: Path, shard_size: int) -> Iterator[tuple[int, list[tuple[str, str, str]]]]:
    """Group the streamed corpus into numbered shards of ``shard_size`` documents (the last may be short)."""
    batch: list[tuple[str, str, str]] = []
    number = 0
    for doc in iter_corpus(path):
        batch.append(doc)
        if len(batch) == shard_size:
            yield number, batch
            number += 1
            batch = []
    if batch:
        yield number, batch


@dataclass
class ShardJob:
    """A shard to encode: its number and its passages' texts (title and text joined)."""

    number: int
    texts: list[str]


@dataclass
class ShardResult:
    number: int
    embeddings: np.ndarray
    tokens: int
    seconds: float


class LocalEngine:
    """Encodes the shards one after the other in this process (streaming: one shard in memory).

    An engine is any callable ``engine(jobs: Iterator[ShardJob]) -> Iterator[ShardResult]``; results
    may come in any order (see :mod:`llara.retrieval.ray_engine`)."""

    def __init__(self, encoder, batch_size: int | None = None):
        self.encoder, self.batch_size = encoder, batch_size

    def __call__(self, jobs: Iterator[ShardJob]) -> Iterator[ShardResult]:
        for job in jobs:
            ts = time.perf_counter()
            emb = self.encoder.encode(job.texts, "passage", batch_size=self.batch_size)
            yield ShardResult(job.number, emb, int(getattr(self.encoder.last_stats, "tokens", 0)),
                              time.perf_counter() - ts)


def _model_settings(encoder, model_spec: str) -> dict:
    p = Path(model_spec)
    spec = str(p.resolve()) if p.exists() else model_spec  # a path must survive a change of cwd
    settings = {
        "spec": spec,
        "model_id": encoder.model_id,
        "template": encoder.template.to_dict(),
        "max_query_length": encoder.max_length["query"],
        "max_passage_length": encoder.max_length["passage"],
        # shards encoded in another precision would differ slightly: a resume must not mix them
        "dtype": str(next(encoder.model.parameters()).dtype).replace("torch.", ""),
    }
    runtime = getattr(encoder, "runtime", "torch")
    if runtime != "torch":  # recorded only when not torch: manifests written before stay resumable
        settings["runtime"] = runtime
    return settings


def _check_resumable(manifest: dict, wanted: dict, manifest_path: Path) -> None:
    diffs = [d for key, value in wanted.items() for d in setting_differences(manifest.get(key), value, key)]
    if diffs:
        raise DataError(manifest_path, None, f"cannot resume with other settings: {'; '.join(diffs)}; "
                                             "use the same settings or a new output directory")


def build_index(
    encoder,
    corpus_path: "str | os.PathLike",
    out_dir: "str | os.PathLike",
    *,
    model_spec: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    factory: str = "Flat",
    resume: bool = False,
    shard: "tuple[int, int] | str | None" = None,
    batch_size: int | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    faiss_index: bool = True,
    engine=None,
    bm25: bool = True,
    fusion=None,
) -> Path:
    """Encode ``corpus.jsonl`` shard by shard into ``out_dir`` and build ``index.faiss``.

    With ``bm25`` (and no ``shard``), the BM25 index of the same corpus is built too
    (:mod:`llara.retrieval.lexical`) and ``fusion`` (a :class:`~llara.retrieval.fusion.FusionConfig`,
    default its defaults) is recorded as the index's hybrid-search settings.

    ``model_spec`` is what :meth:`Encoder.from_pretrained` needs to load the same model again (a
    path is stored absolute); the searcher reloads it from the manifest. With ``shard=(i, n)`` only
    part ``i`` of ``n`` is encoded and no FAISS index is built (see :func:`merge_indexes`).
    ``faiss_index=False`` writes the shards and manifest only (for a vector database backend).
    ``engine`` encodes the shards (default: :class:`LocalEngine` on ``encoder``; a Ray Data engine
    in :mod:`llara.retrieval.ray_engine`). Returns ``out_dir``.

    Examples:
        Index the MED collection shipped in ``llara/data/demo`` (``med``) with ``model_dir``, any
        model llara loads (here a tiny random checkpoint), into a scratch directory ``tmp``:

        >>> import json
        >>> from llara import Encoder, build_index
        >>> enc = Encoder.from_pretrained(model_dir, show_progress=False)
        >>> out = build_index(enc, med / "corpus.jsonl", tmp / "med-index", model_spec=model_dir)
        >>> m = json.loads((out / "manifest.json").read_text())
        >>> m["count"], m["complete"], m["factory"], "bm25" in m
        (1033, True, 'Flat', True)
    """
    corpus_path, out = Path(corpus_path), Path(out_dir)
    part = parse_shard_spec(shard)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    config = getattr(getattr(encoder, "model", None), "config", None)
    check_factory(factory, getattr(config, "hidden_size", None))
    manifest_path = out / MANIFEST
    wanted = json.loads(json.dumps({  # as it reads back from the manifest (tuples become lists)
        "model": _model_settings(encoder, model_spec),
        "shard_size": int(shard_size),
        "factory": factory,
        "part": list(part) if part else None,
    }))
    done: dict[int, dict] = {}
    if manifest_path.exists():
        if not resume:
            raise DataError(out, None, "already holds an index; resume it (--resume) or choose a new directory")
        manifest = read_manifest(out)
        _check_resumable(manifest, wanted, manifest_path)
        for s in manifest["shards"]:
            try:
                verify_shard(out, s, manifest.get("dimension"))
            except DataError as e:
                log.warning("%s; encoding shard %d again", e, s["number"])
                continue
            done[s["number"]] = s
        log.info("resuming %s: %d finished shards verified", out, len(done))
    else:
        if out.exists() and any(out.iterdir()):
            raise DataError(out, None, "exists and is not empty; choose a new directory")
        out.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "llara_version": __version__,
            **wanted,
            "dimension": None,
            "normalized": bool(encoder.template.normalize),
            "metric": "inner_product",
            "corpus": {"path": str(corpus_path.resolve()), "bytes": corpus_path.stat().st_size
                       if corpus_path.is_file() else None},
            "corpus_documents": None,
            "count": 0,
            "complete": False,
            "shards": [],
            "faiss": None,
        }
    manifest.update(complete=False, faiss=None)

    t0 = time.perf_counter()
    build_log = JsonlLog(out / BUILD_LOG)  # timings: they differ run to run, so not in the manifest
    total_docs = 0
    pending: dict[int, tuple[list[str], list[str]]] = {}  # shards being encoded: ids, titles
    ids_digest = hashlib.sha256()  # of every id in row order: ties the BM25 rows to the dense rows

    def jobs() -> Iterator[ShardJob]:
        nonlocal total_docs
        for number, docs in _iter_shards(corpus_path, shard_size):
            total_docs += len(docs)
            for d in docs:
                ids_digest.update(d[0].encode("utf-8", "surrogatepass") + b"\n")
            if part and number % part[1] != part[0]:
                continue
            ids = [d[0] for d in docs]
            if number in done:
                # The corpus must not have changed under a finished shard.
                have = read_ids(out / done[number]["files"]["ids"]["path"])
                if have != ids:
                    raise DataError(corpus_path, None, f"cannot resume: the documents of shard {number} differ "
                                                       f"from those already indexed in {out}; the corpus changed")
                continue
            pending[number] = (ids, [d[1] for d in docs])
            yield ShardJob(number, [passage_text({"title": t, "text": x}) for _, t, x in docs])

    for res in (engine or LocalEngine(encoder, batch_size))(jobs()):
        emb = res.embeddings
        if manifest["dimension"] is None:
            manifest["dimension"] = int(emb.shape[1])
        elif emb.shape[1] != manifest["dimension"]:
            raise ValueError(f"encoder gives dimension {emb.shape[1]}, the index has {manifest['dimension']}")
        ids, titles = pending.pop(res.number)
        entry = write_shard(out, res.number, emb, ids, titles)
        entry["tokens"] = res.tokens
        done[res.number] = entry
        manifest["shards"] = [done[k] for k in sorted(done)]
        manifest["count"] = sum(s["rows"] for s in manifest["shards"])
        write_json(manifest_path, manifest)
        build_log.write({"shard": res.number, "rows": len(ids), "tokens": res.tokens, "seconds": round(res.seconds, 3),
                         "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        log.info("shard %d: %d passages in %.1f s (%.0f passages/s)", res.number, len(ids), res.seconds,
                 len(ids) / max(res.seconds, 1e-9))

    manifest["corpus_documents"] = total_docs
    expected = [n for n in range(-(-total_docs // shard_size)) if not part or n % part[1] == part[0]]
    stale = sorted(set(done) - set(expected))
    if stale:
        raise DataError(corpus_path, None, f"cannot resume: {out} holds shards {stale} that the corpus "
                                           "no longer has; the corpus changed")
    manifest["shards"] = [done[k] for k in expected]
    manifest["count"] = sum(s["rows"] for s in manifest["shards"])
    if manifest["dimension"] is None and not part:
        raise DataError(corpus_path, None, "no documents to index")
    if part is None and faiss_index:
        manifest["faiss"] = build_faiss(out, manifest, train_size=train_size, seed=seed)
    if bm25 and part is None:
        _add_bm25(out, corpus_path, manifest, total_docs, ids_digest.hexdigest(), fusion)
    manifest["complete"] = True
    write_json(manifest_path, manifest)
    log.info("indexed %d passages into %s in %.1f s", manifest["count"], out, time.perf_counter() - t0)
    return out


def _add_bm25(out: Path, corpus_path: Path, manifest: dict, documents: int, digest: str, fusion) -> None:
    """Build (or, on resume, keep if intact) the BM25 half and record the fusion settings."""
    from .fusion import FusionConfig
    from .lexical import bm25_entry_ok, build_bm25

    if bm25_entry_ok(out, manifest.get("bm25"), documents, digest):
        log.info("BM25 index already built and verified")
    else:
        entry = build_bm25(out, corpus_path)
        if (entry["documents"], entry["ids_sha256"]) != (documents, digest):
            raise DataError(corpus_path, None, f"the corpus changed while indexing: {entry['documents']} documents "
                                               f"for BM25, {documents} in the dense shards (or other ids)")
        manifest["bm25"] = entry
    if fusion is not None or not manifest.get("fusion"):
        fusion = fusion if isinstance(fusion, FusionConfig) else FusionConfig.from_dict(fusion)
        manifest["fusion"] = fusion.to_dict()


# ----------------------------------------------------------------------------------------------
# merging parts
# ----------------------------------------------------------------------------------------------
def merge_indexes(
    part_dirs: Sequence["str | os.PathLike"],
    out_dir: "str | os.PathLike",
    *,
    factory: str | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
    bm25: bool = True,
    fusion=None,
) -> Path:
    """Join the parts written by ``build_index(..., shard=(i, n))`` for every ``i`` into one index.

    The parts must come from the same corpus and settings; every shard is checked (sha256) and
    copied. ``factory`` overrides the parts' FAISS factory string. With ``bm25``, the BM25 index is
    built from the corpus the parts recorded, when that file is still there.
    """
    out = Path(out_dir)
    if not part_dirs:
        raise ValueError("no part directories to merge")
    manifests = [(Path(d), read_manifest(Path(d))) for d in part_dirs]
    first_dir, first = manifests[0]
    shards: dict[int, tuple[Path, dict]] = {}
    parts_seen: dict[int, Path] = {}
    n_parts = None
    for d, m in manifests:
        if not m.get("complete"):
            raise DataError(d / MANIFEST, None, "this part is unfinished; finish it with --resume before merging")
        for key in _SETTINGS:
            if m.get(key) != first.get(key):
                raise DataError(d / MANIFEST, None, f"cannot merge: '{key}' is {m.get(key)!r} here but "
                                                    f"{first.get(key)!r} in {first_dir}")
        part = m.get("part") or [0, 1]
        if n_parts is None:
            n_parts = part[1]
        if part[1] != n_parts:
            raise DataError(d / MANIFEST, None, f"part {part[0]}/{part[1]} does not belong to a {n_parts}-way split")
        if part[0] in parts_seen:
            raise DataError(d / MANIFEST, None, f"part {part[0]}/{n_parts} given twice (also {parts_seen[part[0]]})")
        parts_seen[part[0]] = d
        for s in m["shards"]:
            verify_shard(d, s, m["dimension"])
            if s["number"] in shards:
                raise DataError(d / MANIFEST, None, f"shard {s['number']} is also in {shards[s['number']][0]}")
            shards[s["number"]] = (d, s)
    dims = {m["dimension"] for _, m in manifests if m["dimension"] is not None}
    if len(dims) != 1:
        raise DataError(first_dir, None, f"cannot merge: parts have dimensions {sorted(dims)}")
    missing = sorted(set(range(n_parts)) - set(parts_seen))
    if missing:
        raise DataError(Path(part_dirs[0]), None, f"cannot merge: parts {missing} of {n_parts} are missing")
    expected = range(-(-first["corpus_documents"] // first["shard_size"]))
    if sorted(shards) != list(expected):
        raise DataError(Path(part_dirs[0]), None, f"cannot merge: shards {sorted(set(expected) - set(shards))} "
                                                  "are missing")
    if (out / MANIFEST).exists() or (out.exists() and any(out.iterdir())):
        raise DataError(out, None, "exists and is not empty; choose a new directory")
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for number in expected:
        d, s = shards[number]
        for info in s["files"].values():
            with atomic_path(out / info["path"]) as tmp:
                shutil.copyfile(d / info["path"], tmp)
        entries.append(s)
    manifest = {k: v for k, v in first.items()}
    manifest.update(part=None, dimension=dims.pop(), shards=entries, count=sum(s["rows"] for s in entries),
                    complete=False, faiss=None, merged_from=[str(Path(d).resolve()) for d, _ in manifests],
                    llara_version=__version__)
    if factory is not None:
        check_factory(factory, manifest["dimension"])
        manifest["factory"] = factory
    write_json(out / MANIFEST, manifest)
    manifest["faiss"] = build_faiss(out, manifest, train_size=train_size, seed=seed)
    corpus = Path((manifest.get("corpus") or {}).get("path") or "")
    if bm25 and corpus.is_file():
        from .lexical import ids_sha256

        ids = [i for s in entries for i in read_ids(out / s["files"]["ids"]["path"])]
        _add_bm25(out, corpus, manifest, len(ids), ids_sha256(ids), fusion)
    elif bm25:
        log.warning("no BM25 index (the parts' corpus %s is gone): the merged index serves dense search only", corpus)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    log.info("merged %d parts (%d passages) into %s", len(manifests), manifest["count"], out)
    return out


