"""Input checks shared by the command configs (:mod:`llara.cli.configs`): ranges, files that must
exist and parse, a BEIR directory, an index directory, a free port. Each raises ``ValueError`` in
the user's terms (the flag or the file, and what is wrong)."""
from __future__ import annotations

import errno
import socket
from pathlib import Path

from ..io import iter_jsonl
from ..retrieval.store import MANIFEST, iter_corpus, read_manifest


def positive(**values) -> None:
    """ValueError naming the first flag whose value (not None) is below 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def not_negative(**values) -> None:
    for name, v in values.items():
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")


def existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such {what}" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def check_jsonl(path: str, what: str) -> None:
    """The JSONL file exists, and every line parses (``DataError`` naming ``file:line``); not empty."""
    if not sum(1 for _ in iter_jsonl(existing_file(path, what))):  # every line, not just the first
        raise ValueError(f"{path}: empty {what}")


def check_corpus(path: str) -> None:
    """A BEIR corpus.jsonl: exists, every record parses and has an id and a text, ids are unique."""
    existing_file(path, "corpus file (a BEIR corpus.jsonl)")
    if not sum(1 for _ in iter_corpus(path)):  # every record, not just the first
        raise ValueError(f"{path}: empty corpus (no passages)")


def check_beir_dir(path: str, split: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{path}: no such dataset directory (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/)")
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (p / need).is_file():
            raise ValueError(f"{path}: not a BEIR dataset for split {split!r} (no {need})")


def check_index_dir(path: str) -> None:
    """An index directory whose manifest parses (the rest is checked when it is opened)."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise ValueError(f"{path}: no index here (no {MANIFEST}; build one with 'llara index')")
    read_manifest(p)


def check_port_free(host: str, port: int) -> None:
    """The service could bind ``host:port`` now (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another service?); choose another --port") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
