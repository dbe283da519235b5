"""A small corpus and a saved tiny model, for index, search and service tests."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from tiny import WORDS, make_model, make_tokenizer

from llara.modeling.encoder import Encoder

TEXT_WORDS = [w for w in WORDS if w.isalpha()]


def write_corpus(path: Path, n: int = 23, seed: int = 0) -> Path:
    """``n`` documents with ids d0..d{n-1}, texts of 3-40 words, titles on every other document."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            doc = {"_id": f"d{i}", "text": " ".join(rng.choices(TEXT_WORDS, k=rng.randint(3, 40)))}
            if i % 2 == 0:
                doc["title"] = " ".join(rng.choices(TEXT_WORDS, k=3))
            fh.write(json.dumps(doc) + "\n")
    return path


def make_encoder(**kw) -> Encoder:
    return Encoder(make_model(), make_tokenizer(), "eos", show_progress=False, **kw)


def save_model(out_dir: Path) -> Path:
    """A llara checkpoint directory that ``Encoder.from_pretrained`` loads (template ``eos``)."""
    return make_encoder().save(out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: on Linux, get SIGTERM when the test process dies, so that no server outlives a
    killed test run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_server(index_dir: "Path | None", log_path: Path, *extra: str, startup_s: float = 120,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``llara serve`` on a free loopback port in its own process (``index_dir`` None: give ``--model``
    in ``extra``); returns (process, base url) once /ready answers 200. The caller terminates it.
    ``env``: more environment variables for the server."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    port = free_port()
    where = ["--index", str(index_dir)] if index_dir is not None else []
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "llara.cli", "serve", *where, "--port", str(port), *extra],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while True:
        assert server.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            server.wait(timeout=10)
            raise AssertionError(f"server did not start in {startup_s} s: {Path(log_path).read_text()}")
        time.sleep(0.2)


def index_setup(root: Path, n: int, shard_size: int, **kw) -> dict:
    """A saved tiny model, a corpus of ``n`` documents, the model loaded back and a Flat index of the corpus
    (``kw``: more ``build_index`` arguments)."""
    from llara.retrieval.index import build_index

    model_dir = save_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n=n)
    encoder = Encoder.from_pretrained(str(model_dir), show_progress=False)
    ref = build_index(encoder, corpus, root / "ref", model_spec=str(model_dir), shard_size=shard_size, **kw)
    return {"root": root, "model": model_dir, "corpus": corpus, "encoder": encoder, "ref": ref}
