"""Streaming readers of unlabelled text: documents as lists of text units (paragraphs, passages,
sentences), for LLaRA's adaptation stage (``llara.data.pretrain``).

Input formats (``fmt="auto"`` decides by extension, then by the first JSON record):

* ``.txt`` / ``.text`` / ``.md`` (optionally ``.gz``): ``txt_mode="blocks"`` (default) makes every
  blank-line-separated block one document (its lines joined by a space); ``txt_mode="file"`` makes
  the whole file one document whose units are its blocks.
* sequential passages ``{"doc", "idx", "text"}`` (first record has ``doc`` and ``idx``): consecutive
  lines of the same ``doc`` are one document, in strictly increasing ``idx`` order.
* BEIR ``corpus.jsonl`` ``{"_id", "title", "text"}`` (first record has ``_id``): one document each,
  ``title`` then ``text`` (as ``llara.io.passage_text``). A directory means its ``corpus.jsonl``.
* any other JSONL: one document per line from ``text_field`` (a string or a list of strings); a
  non-blank ``title_field`` is put first unless the text already starts with it (wiki_vital's
  ``articles.jsonl`` repeats its title as the first words of its text).

Every reader is a generator over a file handle: one document in memory at a time. Malformed input
raises :class:`llara.io.DataError` naming ``file:line``.
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..io import DataError, iter_jsonl, iter_lines
from .beir import get_doc_id, get_str_field

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "TXT_MODES",
    "detect_format",
    "iter_documents",
    "read_beir",
    "read_jsonl",
    "read_passages",
    "read_text",
]

FORMATS = ("auto", "text", "jsonl", "beir", "passages")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_MODES = ("blocks", "file")


# --------------------------------------------------------------------------- low-level reading


def _base_suffix(path: Path) -> str:
    """'.jsonl' for 'x.jsonl' and 'x.jsonl.gz'."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its terminator) for every line, blank ones included."""
    return iter_lines(path, skip_blank=False)


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    return iter_jsonl(path, allow_empty=True)


def _str_field(path: Path, line_no: int, obj: dict, key: str, *, required: bool) -> str:
    if obj.get(key) is None and required:
        raise DataError(path, line_no, f"missing field '{key}'")
    return get_str_field(path, line_no, obj, key, required=False)


def _classify(obj: dict) -> str:
    if "doc" in obj and "idx" in obj:
        return "passages"
    if "_id" in obj:
        return "beir"
    return "jsonl"


def detect_format(path: str | os.PathLike) -> str:
    """'text', 'passages', 'beir' or 'jsonl' for one file (a directory means its corpus.jsonl)."""
    path = _resolve_path(Path(path))
    suffix = _base_suffix(path)
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        for _, obj in _records(path):
            return _classify(obj)
        raise DataError(path, None, "file is empty")
    raise DataError(
        path, None, f"unknown file type {suffix!r}: expected {TEXT_SUFFIXES + JSON_SUFFIXES} (optionally .gz)"
    )


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        if not corpus.is_file():
            raise DataError(path, None, "a directory must hold a BEIR corpus.jsonl; pass files otherwise")
        return corpus
    return path


# --------------------------------------------------------------------------- readers


def read_text(path: str | os.PathLike, txt_mode: str = "blocks") -> Iterator[list[str]]:
    """Documents of a plain-text file; see the module docstring for ``txt_mode``."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    path = Path(path)
    block: list[str] = []
    blocks: list[str] = []  # txt_mode="file": the units of the one document
    for _, line in itertools.chain(_lines(path), [(0, "")]):  # a final blank line closes the last block
        if line.strip():
            block.append(line.strip())
            continue
        if not block:
            continue
        unit = " ".join(block)
        block = []
        if txt_mode == "blocks":
            yield [unit]
        else:
            blocks.append(unit)
    if blocks:
        yield blocks


def read_jsonl(
    path: str | os.PathLike, text_field: str = "text", title_field: str | None = "title"
) -> Iterator[list[str]]:
    """One document per line: [title] + text (a string or a list of strings)."""
    path = Path(path)
    for line_no, obj in _records(path):
        if text_field not in obj:
            raise DataError(path, line_no, f"missing field '{text_field}'")
        value = obj[text_field]
        if isinstance(value, str):
            units = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            units = list(value)
        else:
            raise DataError(
                path, line_no, f"field '{text_field}' must be a string or a list of strings, got {type(value).__name__}"
            )
        title = _str_field(path, line_no, obj, title_field, required=False).strip() if title_field else ""
        first = next((u for u in units if u.strip()), "")
        if title and not first.lstrip().startswith(title):
            units = [title, *units]
        yield units


def read_beir(path: str | os.PathLike) -> Iterator[list[str]]:
    """BEIR corpus.jsonl: one document per line, [title, text]."""
    path = _resolve_path(Path(path))
    seen: dict[str, int] = {}
    for line_no, obj in _records(path):
        get_doc_id(path, line_no, obj, seen)
        title = _str_field(path, line_no, obj, "title", required=False)
        text = _str_field(path, line_no, obj, "text", required=True)
        yield [title, text] if title.strip() else [text]


def read_passages(path: str | os.PathLike) -> Iterator[list[str]]:
    """Sequential passages {"doc", "idx", "text"}: consecutive lines of one doc, in increasing idx.

    A doc whose lines are not consecutive, or an idx that does not increase, is a DataError; a gap
    in idx (a passage missing) is allowed and logged once per file."""
    path = Path(path)
    seen: dict[Any, int] = {}  # doc -> line of its first passage (doc ids only, not texts)
    units: list[str] = []
    doc: Any = None
    last_idx = last_line = 0
    warned_gap = False
    for line_no, obj in _records(path):
        for key in ("doc", "idx", "text"):
            if key not in obj:
                raise DataError(path, line_no, f"missing field '{key}'")
        this_doc, idx = obj["doc"], obj["idx"]
        if not isinstance(this_doc, (str, int)) or isinstance(this_doc, bool):
            raise DataError(path, line_no, f"field 'doc' must be a string or an integer, got {this_doc!r}")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise DataError(path, line_no, f"field 'idx' must be an integer, got {idx!r}")
        text = _str_field(path, line_no, obj, "text", required=True)
        if this_doc != doc:
            if units:
                yield units
            if this_doc in seen:
                raise DataError(
                    path, line_no,
                    f"doc {this_doc!r} appears again (first on line {seen[this_doc]}): the passages of a "
                    "doc must be consecutive lines",
                )
            seen[this_doc] = line_no
            doc, units = this_doc, [text]
        else:
            if idx <= last_idx:
                raise DataError(
                    path, line_no,
                    f"idx {idx} of doc {doc!r} does not follow idx {last_idx} (line {last_line}): "
                    "passages must be in increasing idx order",
                )
            if idx != last_idx + 1 and not warned_gap:
                logger.warning("%s:%d: idx jumps from %d to %d in doc %r (a passage is missing)",
                               path, line_no, last_idx, idx, doc)
                warned_gap = True
            units.append(text)
        last_idx, last_line = idx, line_no
    if units:
        yield units


def iter_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    fmt: str = "auto",
    text_field: str = "text",
    title_field: str | None = "title",
    txt_mode: str = "blocks",
    interleave: bool = False,
) -> Iterator[list[str]]:
    """Stream documents (lists of non-blank, stripped text units) from files.

    In file order by default; ``interleave=True`` takes one document from each file in turn (files
    that run out drop out), so that a short run over several sources sees all of them. Every file
    stays a stream either way.

    fmt: 'auto' (per file, see the module docstring), or one of 'text', 'jsonl', 'beir', 'passages'
    for every file. Documents without any non-blank unit are skipped."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    streams = [_file_documents(raw, fmt, text_field, title_field, txt_mode) for raw in paths]
    if not interleave:
        yield from itertools.chain.from_iterable(streams)
        return
    while streams:
        alive = []
        for stream in streams:
            units = next(stream, None)
            if units is not None:
                yield units
                alive.append(stream)
        streams = alive


def _file_documents(raw, fmt: str, text_field: str, title_field: str | None, txt_mode: str) -> Iterator[list[str]]:
    path = _resolve_path(Path(raw))
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "text":
        docs = read_text(path, txt_mode)
    elif kind == "passages":
        docs = read_passages(path)
    elif kind == "beir":
        docs = read_beir(path)
    else:
        docs = read_jsonl(path, text_field, title_field)
    for units in docs:
        units = [u.strip() for u in units if u.strip()]
        if units:
            yield units
