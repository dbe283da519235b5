"""``llara index --engine ray`` on a local Ray cluster with 2 CPU workers: the same shards, checksums and
manifest as the single-process path, and resumable shard by shard."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_index import index_setup

ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")

from llara.cli import main  # noqa: E402
from llara.retrieval.index import build_index  # noqa: E402
from llara.retrieval.store import open_index  # noqa: E402
from llara.retrieval.ray_engine import RayEngine  # noqa: E402
from llara.training.logging_utils import read_log  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    setup = index_setup(tmp_path_factory.mktemp("ray"), n=50, shard_size=8)
    return {**setup, "single": setup["ref"]}


def assert_same_index(a, b):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb  # same shards, rows, checksums, tokens, FAISS file, BM25 files, settings
    ia, ib = open_index(a), open_index(b)
    assert ia.ids == ib.ids and ia.titles == ib.titles
    np.testing.assert_allclose(ia.embeddings(), ib.embeddings(), rtol=0, atol=1e-6)


def test_ray_index_equals_single_process(cluster, setup):
    out = build_index(setup["encoder"], setup["corpus"], setup["root"] / "ray", model_spec=str(setup["model"]),
                      shard_size=8, engine=RayEngine.from_encoder(setup["encoder"], str(setup["model"]), workers=2))
    assert_same_index(setup["single"], out)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 7


class Interrupted(Exception):
    pass


def test_ray_index_resumes_after_an_interruption(cluster, setup):
    out = setup["root"] / "resumed"
    engine = RayEngine.from_encoder(setup["encoder"], str(setup["model"]), workers=2)

    def three_then_crash(jobs):
        for i, result in enumerate(engine(jobs)):
            if i == 3:
                raise Interrupted
            yield result

    with pytest.raises(Interrupted):
        build_index(setup["encoder"], setup["corpus"], out, model_spec=str(setup["model"]), shard_size=8,
                    engine=three_then_crash)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 3
    # The CLI finishes it on Ray: the remaining shards only.
    rc = main(["index", "--engine", "ray", "--workers", "2", "--resume", "--corpus", str(setup["corpus"]),
               "--output", str(out), "--model", str(setup["model"]), "--shard-size", "8"])
    assert rc == 0
    assert_same_index(setup["single"], out)
    kept = {s["number"] for s in partial["shards"]}
    encoded = [row["shard"] for row in read_log(out / "build-log.jsonl")]
    assert sorted(encoded) == list(range(7)) and set(encoded[:3]) == kept  # the resume encoded the other 4 only
