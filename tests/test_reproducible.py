"""Byte-reproducible indexes: two clean builds of one corpus with one model write the same bytes into
every file, BM25 and manifest included, whatever the hash seed of the process that builds; a build
killed with SIGKILL after its first shard and finished with ``--resume`` equals an uninterrupted one.
``build-log.jsonl`` (timings) is the one file that differs, by design (docs/index-format.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_index import save_model, write_corpus

import llara
from llara.cli import main
from llara.retrieval.store import BUILD_LOG
from llara.training.logging_utils import read_log

SHARD_SIZE = 5
# The reference is built in a process with another hash seed than this one: bm25s numbers its
# vocabulary in the order of a Python set, which follows the seed.
CHILD_SEED = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"

KILLED_AFTER_FIRST_SHARD = """
import os, signal, sys
from llara.modeling.encoder import Encoder
from llara.retrieval.index import LocalEngine, build_index

corpus, out, model, shard_size = sys.argv[1:5]
encoder = Encoder.from_pretrained(model, show_progress=False)

def engine(jobs):  # kill -9 once the second shard is encoded, before it is written: no cleanup runs
    for number, result in enumerate(LocalEngine(encoder)(jobs)):
        if number == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield result

build_index(encoder, corpus, out, model_spec=model, shard_size=int(shard_size), engine=engine)
"""


def _child_env() -> dict:
    src = str(Path(llara.__file__).resolve().parents[1])  # this checkout's llara, not an installed one
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "PYTHONHASHSEED": CHILD_SEED, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _index_args(setup: dict, out: Path, *extra: str) -> list[str]:
    return ["index", "--corpus", str(setup["corpus"]), "--output", str(out), "--model", str(setup["model"]),
            "--shard-size", str(SHARD_SIZE), *extra]


def _files(index_dir: Path) -> dict[str, bytes]:
    """Every file of the index folder by relative path, the build log left out."""
    return {str(p.relative_to(index_dir)): p.read_bytes() for p in sorted(index_dir.rglob("*"))
            if p.is_file() and p.name != BUILD_LOG}


def _differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    setup = {"model": save_model(root / "model"), "corpus": write_corpus(root / "corpus.jsonl", n=23),
             "ref": root / "ref"}
    proc = subprocess.run([sys.executable, "-m", "llara.cli", *_index_args(setup, setup["ref"])], env=_child_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return setup


def test_two_clean_builds_are_byte_identical(setup, tmp_path):
    out = tmp_path / "again"
    assert main(_index_args(setup, out)) == 0
    ref, got = _files(setup["ref"]), _files(out)
    assert {"manifest.json", "index.faiss", "shards/emb-00004.npy", "shards/ids-00004.txt", "shards/titles-00004.jsonl",
            "bm25/vocab.index.json", "bm25/data.csc.index.npy", "bm25/indices.csc.index.npy"} <= set(ref)
    assert _differing(ref, got) == []
    manifest = json.loads(ref["manifest.json"])
    assert manifest["complete"] and manifest["bm25"]["documents"] == 23
    assert all("seconds" not in s for s in manifest["shards"])  # timings live in the build log
    for d in (setup["ref"], out):
        assert [row["shard"] for row in read_log(d / BUILD_LOG)] == list(range(5))


def test_killed_build_resumed_equals_an_uninterrupted_one(setup, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_SHARD, str(setup["corpus"]), str(out),
                           str(setup["model"]), str(SHARD_SIZE)], env=_child_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["number"] for s in partial["shards"]] == [0]
    assert not (out / "index.faiss").exists() and not (out / "bm25").exists()

    assert main(_index_args(setup, out, "--resume")) == 0
    assert _differing(_files(setup["ref"]), _files(out)) == []
    # shard 0 from the killed run, 1-4 from the resumed one: nothing encoded twice
    assert [row["shard"] for row in read_log(out / BUILD_LOG)] == list(range(5))
