"""Files and records every layer of llara shares: the data error, reading text and JSONL files with
``file:line`` errors, the text of a corpus record, atomic writes, and llara's cache folder.

This module is the bottom layer: it imports nothing from llara. The layers above it, from the
bottom up (a module may import only from its own layer or the layers below it; ``tests/test_layers.py``
checks this)::

    0  llara (the package: __version__), llara.io
    1  llara.prompts                       templates, prompt ids
    2  llara.modeling                      loading a stock model, masks, pooling, the Encoder
    3  llara.data                          BEIR collections, unlabelled-text readers, chunks, collators,
                                           bag-of-words targets
    4  llara.training                    losses, pretraining and fine-tuning
    5  llara.retrieval                     index, search, fusion, ranking, hard-negative mining
    6  llara.evaluation                    metrics, evaluation runs, result tables
    7  llara.interop                       sentence-transformers, MTEB, PEFT exports
    8  llara.pipelines                     the stages composed: the end-to-end recipe, the demo
    9  llara.serve                         the HTTP service, its micro-batching, the load test
   10  llara.cli                           the command line: parses flags, calls one library function
                                           per command

Atomic writes: every file llara writes goes through :func:`atomic_path` (a unique temporary file in
the target's folder, fsync, ``os.replace``; the temporary file is removed if the write fails), so a
crash leaves the old file or the new one, never half of one. :func:`write_text`, :func:`write_json`,
:func:`write_jsonl`, :func:`save_npy` and :func:`open_atomic` are thin wrappers over it. A folder
(a model export, a BM25 index) is written the same way by :func:`atomic_dir`.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = [
    "DataError",
    "atomic_dir",
    "atomic_path",
    "cache_root",
    "iter_jsonl",
    "iter_lines",
    "json_line",
    "open_atomic",
    "passage_text",
    "replace_dir",
    "save_npy",
    "write_json",
    "write_jsonl",
    "write_text",
]


class DataError(ValueError):
    """A data file is missing or malformed.

    Attributes:
        path: the offending file (or directory).
        line: 1-based line number, or ``None`` when the problem is not tied to one line.
        reason: human-readable description of the problem.

    ``str(err)`` reads like ``"/x/corpus.jsonl:12: missing field '_id'"``.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = Path(path)
        self.line = line
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.reason}"
        return f"{self.path}:{self.line}: {self.reason}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # keep pickling (e.g. across processes) working
        return (type(self), (self.path, self.line, self.reason))


def passage_text(doc: dict) -> str:
    """The text that represents a corpus record ``{"title", "text"}``, for BM25 and dense encoding alike.

    ``title + " " + text`` when the title is non-empty (not just whitespace), otherwise ``text``.
    """
    title = doc.get("title") or ""
    text = doc.get("text") or ""
    if title.strip():
        return f"{title} {text}" if text else title
    return text


def cache_root() -> Path:
    """llara's cache folder (converted models, runtimes, embeddings, precision probes):
    ``$LLARA_CACHE``, else ``~/.cache/llara``."""
    return Path(os.environ.get("LLARA_CACHE", Path.home() / ".cache" / "llara"))


# --------------------------------------------------------------------------- reading


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "file not found")
    if not path.is_file():
        raise DataError(path, None, "not a regular file")


def iter_lines(path: str | os.PathLike, *, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """Yield ``(line_no, line)`` (1-based, without the terminator) of a text file, ``.gz`` included;
    invalid UTF-8 and unreadable files raise :class:`DataError` naming the file and line."""
    path = Path(path)
    _check_file(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(path, line_no, f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if line_no == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # byte-order mark
                line = line.rstrip("\r\n")
                if skip_blank and not line.strip():
                    continue
                yield line_no, line
    except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
        raise DataError(path, line_no + 1 if line_no else None, f"cannot read: {exc}") from None


def json_line(path: str | os.PathLike, line_no: int, line: str, kind: type = dict) -> Any:
    """One JSON value of type ``kind`` from line ``line_no`` of ``path``, or a :class:`DataError`."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(path, line_no, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(value, kind):
        what = {dict: "object", str: "string", list: "array"}.get(kind, kind.__name__)
        raise DataError(path, line_no, f"expected a JSON {what}, got {type(value).__name__}")
    return value


def iter_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_no, object)`` for every non-blank line of a JSONL file (file:line errors)."""
    path = Path(path)
    empty = True
    for line_no, line in iter_lines(path):
        empty = False
        yield line_no, json_line(path, line_no, line)
    if empty and not allow_empty:
        raise DataError(path, None, "file is empty")


# --------------------------------------------------------------------------- atomic writes


def _fresh_name(path: Path) -> Path:
    """An unused hidden name beside ``path``, for a temporary file or folder."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder (created if missing); when the block ends
    without an error the file written there is fsynced and moved over ``path``, otherwise removed.
    The file gets the permissions of an ordinary new file (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` that replaces ``path`` only once the block ends without an error.
    Text modes default to UTF-8 and ``\\n`` line ends."""
    if "b" not in mode:
        kwargs = {"encoding": "utf-8", "newline": "\n", **kwargs}
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_text(path: str | os.PathLike, text: str | bytes) -> Path:
    """Atomically write ``text`` (str as UTF-8, or bytes) to ``path``."""
    with open_atomic(path, "wb") as fh:
        fh.write(text.encode("utf-8") if isinstance(text, str) else text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``data`` as JSON (indented, newline-terminated)."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl(rows: Iterable[Any], path: str | os.PathLike) -> int:
    """Atomically write one JSON object a line (non-ASCII kept as is); returns the number of lines."""
    n = 0
    with open_atomic(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def save_npy(path: str | os.PathLike, array: Any) -> Path:
    """Atomically write ``array`` in NumPy's ``.npy`` format (no pickles)."""
    import numpy as np

    with open_atomic(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return Path(path)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename folder src to dst; an existing dst is moved aside first and removed afterwards."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path`` (the permissions of an ordinary new folder);
    when the block ends without an error its files are fsynced and it becomes ``path``, otherwise
    it is removed.

    An existing ``path`` is replaced (:func:`replace_dir`); with ``keep_existing`` a ``path`` that
    appeared meanwhile (another process won the race to build the same cache entry) is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_name(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if not keep_existing:
            replace_dir(tmp, path)
        else:
            try:
                os.replace(tmp, path)
            except OSError:  # a non-empty folder is there: keep it
                if not path.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
