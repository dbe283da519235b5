"""Persistent index: resume after a crash, checksums, FAISS vs brute force, parts + merge, Searcher, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_index import index_setup

from llara.cli import main
from llara.io import DataError
from llara.retrieval.index import build_index, merge_indexes
from llara.retrieval.store import parse_shard_spec
from llara.retrieval.searcher import Hit, Searcher
from llara.retrieval.store import iter_corpus, open_index

QUERIES = ["the retrieval of a passage", "fish in the river water", "capital city of france", "brain cell study"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return index_setup(tmp_path_factory.mktemp("index"), n=23, shard_size=5)


def _files(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((index_dir / "shards").iterdir())}


def _search(index_dir: Path, encoder, k=5):
    idx = open_index(index_dir)
    scores, rows = idx.search(encoder.encode(QUERIES, "query"), k)
    return [[idx.ids[r] for r in row] for row in rows], scores


def test_layout_and_manifest(setup):
    ref = setup["ref"]
    m = json.loads((ref / "manifest.json").read_text())
    assert m["complete"] and m["count"] == 23 and m["corpus_documents"] == 23 and m["dimension"] == 32
    assert [s["rows"] for s in m["shards"]] == [5, 5, 5, 5, 3]
    assert m["model"]["spec"] == str(Path(setup["model"]).resolve())
    assert m["model"]["template"]["name"] == "eos" and m["factory"] == "Flat"
    assert sorted(_files(ref)) == sorted(f"{kind}-{i:05d}.{ext}" for i in range(5)
                                         for kind, ext in (("emb", "npy"), ("ids", "txt"), ("titles", "jsonl")))
    assert not list(ref.rglob("*.tmp"))
    ids = (ref / "shards" / "ids-00001.txt").read_text().splitlines()
    assert ids == [f"d{i}" for i in range(5, 10)]
    titles = [json.loads(x) for x in (ref / "shards" / "titles-00000.jsonl").read_text().splitlines()]
    assert titles[1] == "" and titles[0] != ""
    emb = np.load(ref / "shards" / "emb-00000.npy", allow_pickle=False)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_killed_run_resumes_to_identical_index(setup, tmp_path, monkeypatch):
    encoder, out = setup["encoder"], tmp_path / "idx"
    calls = {"n": 0}
    real = encoder.encode

    def dying(texts, side, batch_size=None):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(texts, side, batch_size=batch_size)

    monkeypatch.setattr(encoder, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(encoder, setup["corpus"], out, model_spec=str(setup["model"]), shard_size=5)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [s["number"] for s in m["shards"]] == [0, 1]
    assert not (out / "index.faiss").exists()
    with pytest.raises(DataError, match="unfinished"):
        open_index(out)
    with pytest.raises(DataError, match="already holds an index"):
        build_index(encoder, setup["corpus"], out, model_spec=str(setup["model"]), shard_size=5)
    with pytest.raises(DataError, match="shard_size"):
        build_index(encoder, setup["corpus"], out, model_spec=str(setup["model"]), shard_size=4, resume=True)

    calls["n"] = -100  # no more deaths
    build_index(encoder, setup["corpus"], out, model_spec=str(setup["model"]), shard_size=5, resume=True)
    assert calls["n"] == -100 + 3  # only the three unfinished shards were encoded again
    assert _files(out) == _files(setup["ref"])
    assert (out / "index.faiss").read_bytes() == (setup["ref"] / "index.faiss").read_bytes()
    got, got_scores = _search(out, real.__self__)
    want, want_scores = _search(setup["ref"], real.__self__)
    assert got == want
    np.testing.assert_array_equal(got_scores, want_scores)


def test_truncated_or_corrupt_shard_is_named(setup, tmp_path):
    import shutil

    out = tmp_path / "idx"
    shutil.copytree(setup["ref"], out)
    emb = out / "shards" / "emb-00002.npy"
    data = emb.read_bytes()
    emb.write_bytes(data[:-7])
    with pytest.raises(DataError, match=r"emb-00002\.npy.*truncated"):
        open_index(out)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    emb.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"emb-00002\.npy.*sha256 mismatch"):
        open_index(out)
    open_index(out, verify=False)  # sizes only: a flipped byte passes
    ids = out / "shards" / "ids-00003.txt"
    ids.write_text(ids.read_text()[:-3])
    with pytest.raises(DataError, match=r"ids-00003\.txt"):
        open_index(out, verify=False)
    # resume re-encodes the damaged shards and gives back the original bytes
    build_index(setup["encoder"], setup["corpus"], out, model_spec=str(setup["model"]), shard_size=5, resume=True)
    assert _files(out) == _files(setup["ref"])


def test_flat_search_equals_brute_force(setup):
    idx = open_index(setup["ref"])
    d = idx.embeddings()
    q = setup["encoder"].encode(QUERIES, "query")
    scores, rows = idx.search(q, 7)
    sims = q @ d.T
    for i in range(len(QUERIES)):
        top = np.argsort(-sims[i], kind="stable")[:7]
        np.testing.assert_allclose(scores[i], sims[i, top], atol=1e-5)
        np.testing.assert_allclose(sims[i, rows[i]], sims[i, top], atol=1e-5)  # ties may swap
    assert idx.search(q, 100)[1].shape == (len(QUERIES), 23)  # k clipped to the index size


def test_parts_and_merge_equal_single_run(setup, tmp_path):
    kw = dict(model_spec=str(setup["model"]), shard_size=5)
    parts = [build_index(setup["encoder"], setup["corpus"], tmp_path / f"part{i}", shard=(i, 2), **kw)
             for i in range(2)]
    numbers = [[s["number"] for s in json.loads((p / "manifest.json").read_text())["shards"]] for p in parts]
    assert numbers == [[0, 2, 4], [1, 3]]
    with pytest.raises(DataError, match="merge the parts"):
        open_index(parts[0])
    with pytest.raises(DataError, match=r"parts \[1\] of 2 are missing"):
        merge_indexes(parts[:1], tmp_path / "bad")
    merged = merge_indexes(parts, tmp_path / "merged")
    assert _files(merged) == _files(setup["ref"])
    assert (merged / "index.faiss").read_bytes() == (setup["ref"] / "index.faiss").read_bytes()
    assert _search(merged, setup["encoder"])[0] == _search(setup["ref"], setup["encoder"])[0]


def test_trained_factories(setup, tmp_path):
    enc, kw = setup["encoder"], dict(model_spec=str(setup["model"]), shard_size=10)
    ivf = open_index(build_index(enc, setup["corpus"], tmp_path / "ivf", factory="IVF2,Flat", **kw))
    ivf.set_params("nprobe=2")  # all lists: exact
    flat = open_index(setup["ref"])
    q = enc.encode(QUERIES, "query")
    np.testing.assert_allclose(ivf.search(q, 5)[0], flat.search(q, 5)[0], atol=1e-5)
    assert json.loads((tmp_path / "ivf" / "manifest.json").read_text())["faiss"]["trained_on"] == 23
    hnsw = open_index(build_index(enc, setup["corpus"], tmp_path / "hnsw", factory="HNSW8", **kw))
    assert len(hnsw) == 23
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        build_index(enc, setup["corpus"], tmp_path / "bad", factory="NoSuchIndex", **kw)


def test_searcher_from_index(setup):
    s = Searcher.from_index(setup["ref"])
    hits = s.search(QUERIES, k=3, mode="dense")
    assert len(hits) == len(QUERIES) and all(len(h) == 3 for h in hits)
    assert all(isinstance(h, Hit) for h in hits[0])
    idx = open_index(setup["ref"])
    titles = dict(zip(idx.ids, idx.titles))
    sims = setup["encoder"].encode(QUERIES, "query") @ idx.embeddings().T
    for i, row in enumerate(hits):
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        np.testing.assert_allclose([h.score for h in row], np.sort(sims[i])[::-1][:3], atol=1e-5)
        assert all(h.title == titles[h.doc_id] for h in row)
    assert s.search("capital city", k=2)[0] == s.search(["capital city"], k=2)[0]
    assert s.search([], k=2) == []


@pytest.mark.parametrize("line,reason", [
    ('{"_id": "x", "text": "a"', "malformed JSON"),
    ('{"text": "a"}', "missing field '_id'"),
    ('{"_id": "d0", "text": "a"}', "duplicate _id 'd0' \\(first seen on line 1\\)"),
    ('{"_id": "a\\nb", "text": "a"}', "field '_id' 'a.*b' contains a line break"),
    ('{"_id": "x", "text": 3}', "field 'text' must be a string"),
])
def test_bad_corpus_line_is_named(tmp_path, line, reason):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "d0", "text": "a"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"corpus\.jsonl:3: {reason}"):
        list(iter_corpus(path))


def test_parse_shard_spec():
    assert parse_shard_spec("1/4") == (1, 4) and parse_shard_spec(None) is None
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard_spec(bad)


def test_cli_index_and_search(setup, tmp_path, capsys, adi_dir):
    out = tmp_path / "adi-index"
    rc = main(["index", "--model", str(setup["model"]), "--corpus", str(adi_dir / "corpus.jsonl"),
               "--output", str(out), "--shard-size", "40"])
    assert rc == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == 82
    capsys.readouterr()
    assert main(["search", "--index", str(out), "computer retrieval", "library", "-k", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["query"] for x in lines] == ["computer retrieval", "library"]
    assert all(len(x["hits"]) == 3 and set(x["hits"][0]) == {"doc_id", "score", "title"} for x in lines)
    assert main(["search", "--index", str(out), "computer retrieval"]) == 0  # table output
    assert main(["index", "--model", str(setup["model"]), "--corpus", str(adi_dir / "corpus.jsonl"),
                 "--output", str(out)]) == 2  # exists, no --resume
    assert "already holds an index" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "nowhere"), "q"]) == 2
    # a same-size change to a shard: caught by its sha256, unless --no-verify skips the hashing
    emb = sorted((out / "shards").glob("emb-*.npy"))[0]
    raw = bytearray(emb.read_bytes())
    raw[-1] ^= 0xFF
    emb.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["search", "--index", str(out), "library"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert main(["search", "--index", str(out), "library", "--no-verify", "--json"]) == 0


def test_cli_parts_resume_and_merge(setup, tmp_path, capsys):
    base = ["--model", str(setup["model"]), "--corpus", str(setup["corpus"]), "--shard-size", "5"]
    for i in range(2):
        assert main(["index", *base, "--output", str(tmp_path / f"p{i}"), "--shard", f"{i}/2"]) == 0
    assert main(["index", *base, "--output", str(tmp_path / "p0"), "--shard", "0/2", "--resume"]) == 0
    assert main(["merge", "--output", str(tmp_path / "all"), str(tmp_path / "p0"), str(tmp_path / "p1")]) == 0
    assert _files(tmp_path / "all") == _files(setup["ref"])
    capsys.readouterr()
    assert main(["merge", "--output", str(tmp_path / "x"), str(tmp_path / "p0")]) == 2
    assert "parts [1] of 2 are missing" in capsys.readouterr().err
    assert main(["index", *base, "--output", str(tmp_path / "y"), "--shard", "2/2"]) == 2
    assert "0 <= i < n" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_cli_index_with_a_token_budget_gives_the_same_vectors(setup, tmp_path, capsys):
    """--max-batch-tokens alone (no row limit) batches by padded tokens; the vectors are the same."""
    out = tmp_path / "budget"
    assert main(["index", "--model", str(setup["model"]), "--corpus", str(setup["corpus"]), "--shard-size", "5",
                 "--output", str(out), "--max-batch-tokens", "300", "--no-bm25"]) == 0
    ref = open_index(setup["ref"])
    got = open_index(out)
    assert got.ids == ref.ids
    for a, b in zip(sorted((out / "shards").glob("emb-*.npy")), sorted((setup["ref"] / "shards").glob("emb-*.npy"))):
        np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-5)
    capsys.readouterr()
    assert main(["index", "--model", str(setup["model"]), "--corpus", str(setup["corpus"]),
                 "--output", str(tmp_path / "small"), "--max-batch-tokens", "8"]) == 2
    assert "max_batch_tokens=8 is below one passage of max length" in capsys.readouterr().err
