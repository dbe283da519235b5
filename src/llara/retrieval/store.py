"""The index folder's file format: what an index directory holds, and how it is read and checked.

Layout of an index directory (``docs/index-format.md`` describes every file and manifest field)::

    manifest.json              model spec, template, lengths, dimension, shards with sha256, factory
    shards/emb-00000.npy       float32 (rows, dim) embeddings, L2-normalised unless the template says not
    shards/ids-00000.txt       one doc id per line: line i <-> row i of emb-00000.npy
    shards/titles-00000.jsonl  one JSON string per line: the title of doc i ("" when none)
    index.faiss                the FAISS index over all shards, rows in shard order
    bm25/                      the BM25 index of the same corpus (:mod:`llara.retrieval.lexical`)
    build-log.jsonl            this folder's build timings (not part of the index: never read or checked)

No pickles: ``.npy`` holds plain arrays (loaded with ``allow_pickle=False``), the rest is text. Every
file but ``build-log.jsonl`` is reproducible: the same corpus and model give the same bytes.

This module is the format; :mod:`llara.retrieval.index` builds and merges indexes,
:mod:`llara.retrieval.check` checks one without opening it, :mod:`llara.retrieval.qdrant` exports one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from ..io import DataError, iter_jsonl, json_line, save_npy, write_text

__all__ = [
    "BUILD_LOG", "FAISS_FILE", "FORMAT", "FORMAT_VERSION", "MANIFEST", "SHARD_DIR", "TEXT_ROLES",
    "DenseIndex", "iter_corpus", "load_embeddings", "open_index", "parse_shard_spec", "read_ids", "read_manifest",
    "read_titles", "setting_differences", "sha256_file", "shard_files", "text_digest", "verify_shard", "write_shard",
]

MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
SHARD_DIR = "shards"
BUILD_LOG = "build-log.jsonl"
FORMAT = "llara-index"
FORMAT_VERSION = 1
TEXT_ROLES = ("ids", "titles")  # one line per row


# ----------------------------------------------------------------------------------------------
# files and the manifest
# ----------------------------------------------------------------------------------------------
def sha256_file(path: "str | os.PathLike", chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(index_dir: "str | os.PathLike") -> dict:
    """The manifest of ``index_dir``; ``DataError`` when it is missing, not JSON, not an index's or newer
    than this llara reads."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise DataError(path, None, "not a llara index (no manifest.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, None, f"not a llara index manifest (format is not {FORMAT!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(path, None, f"index format {manifest['format_version']} is newer than this llara "
                                    f"reads ({FORMAT_VERSION}); upgrade llara")
    return manifest


def shard_files(number: int) -> dict[str, str]:
    """Paths, relative to the index directory, of shard ``number``'s three files."""
    return {
        "embeddings": f"{SHARD_DIR}/emb-{number:05d}.npy",
        "ids": f"{SHARD_DIR}/ids-{number:05d}.txt",
        "titles": f"{SHARD_DIR}/titles-{number:05d}.jsonl",
    }


def setting_differences(a, b, prefix: str) -> list[str]:
    """Dotted paths where two JSON-like values differ, e.g. ``model.max_passage_length``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in setting_differences(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [f"{prefix} ({a!r} before, {b!r} now)"]


# ----------------------------------------------------------------------------------------------
# streaming the corpus
# ----------------------------------------------------------------------------------------------
def _id_key(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _first_line_of(path: Path, doc_id: str) -> int | None:
    """Line where ``doc_id`` first occurs (only called to word an error; rescans the file)."""
    for line_no, obj in iter_jsonl(path):
        if obj.get("_id") == doc_id:
            return line_no
    return None


def _field(path: Path, line_no: int, obj: dict, key: str, *, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(path, line_no, f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise DataError(path, line_no, f"field '{key}' must be a string, got {type(value).__name__} ({value!r})")
    return value


def iter_corpus(path: "str | os.PathLike") -> Iterator[tuple[str, str, str]]:
    """Stream ``corpus.jsonl`` as ``(doc_id, title, text)``, one line at a time.

    Same rules as :func:`llara.data.beir.load_corpus` (``DataError`` naming file and line), plus:
    an id may not contain a line break (id files hold one id per line). Duplicate ids are found
    with a set of 64-bit hashes of the ids seen, not the ids themselves.
    """
    path = Path(path)
    seen: set[int] = set()
    for line_no, obj in iter_jsonl(path):
        doc_id = _field(path, line_no, obj, "_id", required=True)
        if not doc_id.strip():
            raise DataError(path, line_no, "field '_id' is empty")
        if "\n" in doc_id or "\r" in doc_id:
            raise DataError(path, line_no, f"field '_id' {doc_id!r} contains a line break")
        key = _id_key(doc_id)
        if key in seen:
            first = _first_line_of(path, doc_id)
            if first is not None and first != line_no:
                raise DataError(path, line_no, f"duplicate _id '{doc_id}' (first seen on line {first})")
        seen.add(key)
        text = _field(path, line_no, obj, "text", required=True)
        title = _field(path, line_no, obj, "title", required=False)
        yield doc_id, title, text


# ----------------------------------------------------------------------------------------------
# shards on disk
# ----------------------------------------------------------------------------------------------
def write_shard(index_dir: Path, number: int, emb: np.ndarray, ids: list[str], titles: list[str]) -> dict:
    """Write shard ``number``'s three files (each atomically); returns its manifest entry."""
    files = shard_files(number)
    (index_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    save_npy(index_dir / files["embeddings"], emb)
    write_text(index_dir / files["ids"], "".join(i + "\n" for i in ids))
    write_text(index_dir / files["titles"], "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in titles))
    entry = {
        "number": number,
        "rows": len(ids),
        "files": {
            role: {"path": rel, "sha256": sha256_file(index_dir / rel), "bytes": (index_dir / rel).stat().st_size}
            for role, rel in files.items()
        },
    }
    for role in TEXT_ROLES:
        entry["files"][role]["lines"] = len(ids)
    return entry


def text_digest(path: Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256, number of lines) of a text file, in one read."""
    h, lines = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            lines += block.count(b"\n")
    return h.hexdigest(), lines


def verify_shard(index_dir: Path, shard: dict, dimension: int | None, *, checksum: bool = True) -> None:
    """Raise ``DataError`` naming the file when a shard file is missing, truncated or corrupt.

    Sizes, line counts and the ``.npy`` header are always checked, and so is the sha256 of the id
    and title files: they map rows to documents and are small next to the embeddings (about 1% of
    an index's bytes), so a changed id file is never served silently. ``checksum`` also hashes the
    embeddings."""
    rebuild = "rebuild this shard (build_index with resume=True re-encodes it)"
    for role, info in shard["files"].items():
        path = index_dir / info["path"]
        if not path.is_file():
            raise DataError(path, None, f"shard {shard['number']} {role} file is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise DataError(path, None, f"shard {shard['number']} {role} file has {size} bytes, the manifest "
                                        f"says {info['bytes']} (truncated or overwritten); {rebuild}")
        if role in TEXT_ROLES:
            digest, lines = text_digest(path)
            want = info.get("lines", shard["rows"])  # indexes written before line counts were recorded
            if lines != want:
                raise DataError(path, None, f"shard {shard['number']} {role} file has {lines} lines, the manifest "
                                            f"says {want} (changed after indexing); {rebuild}")
        elif checksum:
            digest = sha256_file(path)
        else:
            continue
        if digest != info["sha256"]:
            raise DataError(path, None, f"shard {shard['number']} {role} file: sha256 mismatch (changed after "
                                        f"indexing or corrupt); {rebuild}")
    if dimension is not None:
        emb = np.load(index_dir / shard["files"]["embeddings"]["path"], mmap_mode="r", allow_pickle=False)
        if emb.shape != (shard["rows"], dimension) or emb.dtype != np.float32:
            raise DataError(index_dir / shard["files"]["embeddings"]["path"], None,
                            f"expected float32 ({shard['rows']}, {dimension}), found {emb.dtype} {emb.shape}")


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file whose every line ends in ``\\n`` (no other line break splits it)."""
    data = path.read_bytes().decode("utf-8")
    if data and not data.endswith("\n"):
        raise DataError(path, None, "last line is not terminated (truncated file)")
    return data.split("\n")[:-1]


def read_ids(path: Path) -> list[str]:
    """A shard's doc ids: line i is the id of row i."""
    return _read_lines(path)


def read_titles(path: Path) -> list[str]:
    """A shard's titles: line i is a JSON string, the title of row i."""
    return [json_line(path, n, line, str) for n, line in enumerate(_read_lines(path), start=1)]


def load_embeddings(index_dir: Path, shard: dict, mmap: bool = True) -> np.ndarray:
    """A shard's ``(rows, dim)`` float32 embeddings, memory-mapped unless ``mmap=False``."""
    return np.load(index_dir / shard["files"]["embeddings"]["path"], mmap_mode="r" if mmap else None,
                   allow_pickle=False)


# ----------------------------------------------------------------------------------------------
# opening
# ----------------------------------------------------------------------------------------------
@dataclass
class DenseIndex:
    """An opened index: the FAISS index plus row -> doc id and title."""

    path: Path
    manifest: dict
    index: "faiss.Index"
    ids: list[str]
    titles: list[str] = field(repr=False)

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def __len__(self) -> int:
        return len(self.ids)

    def set_params(self, params: str | None) -> None:
        """FAISS run-time parameters, e.g. ``"nprobe=32"`` (IVF) or ``"efSearch=128"`` (HNSW)."""
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.index, params)
            except RuntimeError as e:
                line = str(e).strip().splitlines()[-1]  # drop FAISS's C++ location
                reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", line)
                raise ValueError(f"invalid FAISS parameters {params!r} for a {self.manifest['factory']} "
                                 f"index: {reason}") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, both ``(Q, k')`` with ``k' = min(k, len(self))``; rows may hold -1
        where an approximate index finds fewer than ``k'`` neighbours."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise ValueError(f"queries must be (n, {self.dimension}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        return self.index.search(q, min(k, len(self)))

    def embeddings(self) -> np.ndarray:
        """All stored vectors, in row order (loads every shard)."""
        return np.concatenate([load_embeddings(self.path, s, mmap=False) for s in self.manifest["shards"]])


def open_index(index_dir: "str | os.PathLike", *, verify: bool = True) -> DenseIndex:
    """Open a finished index. ``verify`` checks every file's sha256; without it, sizes, line
    counts, ``.npy`` headers and the id and title files' sha256 are still checked (see
    :func:`llara.retrieval.check.check_index`).

    A missing, truncated or corrupt file raises ``DataError`` naming it.
    """
    d = Path(index_dir)
    manifest = read_manifest(d)
    if manifest.get("part"):
        i, n = manifest["part"]
        raise DataError(d, None, f"this is part {i}/{n} of an index; merge the parts first (llara merge)")
    if not manifest.get("complete"):
        raise DataError(d, None, "the index is unfinished; finish it with --resume")
    if not manifest.get("faiss"):
        raise DataError(d, None, "the index has no FAISS file (built for a vector database with --backend); "
                                 "search it there, or build index.faiss with llara index --resume")
    ids: list[str] = []
    titles: list[str] = []
    for s in manifest["shards"]:
        verify_shard(d, s, manifest["dimension"], checksum=verify)
        shard_ids = read_ids(d / s["files"]["ids"]["path"])
        shard_titles = read_titles(d / s["files"]["titles"]["path"])
        if not len(shard_ids) == len(shard_titles) == s["rows"]:
            raise DataError(d / s["files"]["ids"]["path"], None,
                            f"{len(shard_ids)} ids and {len(shard_titles)} titles for {s['rows']} vectors")
        ids += shard_ids
        titles += shard_titles
    info = manifest["faiss"]
    path = d / info["path"]
    if not path.is_file():
        raise DataError(path, None, "FAISS index file is missing")
    if path.stat().st_size != info["bytes"] or (verify and sha256_file(path) != info["sha256"]):
        raise DataError(path, None, "FAISS index file does not match its checksum (truncated or corrupt)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(path, None, f"cannot read FAISS index: {str(e).strip().splitlines()[-1]}") from None
    if index.ntotal != len(ids) or index.d != manifest["dimension"]:
        raise DataError(path, None, f"FAISS index holds {index.ntotal} x {index.d}, the manifest "
                                    f"{len(ids)} x {manifest['dimension']}")
    return DenseIndex(d, manifest, index, ids, titles)


def parse_shard_spec(spec: "str | Sequence[int] | None") -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` stays ``None``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    else:
        i, n = (int(x) for x in spec)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    return i, n
