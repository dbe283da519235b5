"""`llara check-index` and the light check that `search`/`serve --no-verify` run on open: a changed
id file is an error naming it, never wrong doc ids served silently."""
from __future__ import annotations

import json
import shutil

import pytest
from tiny_index import index_setup

from llara.cli import main
from llara.io import DataError
from llara.retrieval.check import check_index
from llara.retrieval.store import open_index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return index_setup(tmp_path_factory.mktemp("check"), 23, 5)["ref"]


@pytest.fixture
def index(built, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(built, out)
    return out


def _search_ids(index, *flags):
    return main(["search", "--index", str(index), "fish in the river", "-k", "23", "--json", *flags])


def test_manifest_records_line_counts_and_the_check_passes(index):
    m = json.loads((index / "manifest.json").read_text())
    assert all(s["files"][r]["lines"] == s["rows"] for s in m["shards"] for r in ("ids", "titles"))
    r = check_index(index)
    assert (r["shards"], r["rows"], r["files"], r["complete"]) == (5, 23, 16, True)
    assert 0 < r["bytes_hashed"] < r["bytes"] / 10  # ids and titles only, not the embeddings
    assert check_index(index, full=True)["bytes_hashed"] == r["bytes"]


def test_cli_check_index_output(index, capsys):
    assert main(["check-index", "--index", str(index)]) == 0
    assert "23 passages in 5 shards (complete)" in capsys.readouterr().out
    assert main(["check-index", "--index", str(index), "--json", "--full"]) == 0
    assert json.loads(capsys.readouterr().out)["full"] is True


def test_changed_ids_with_no_verify_is_an_error_not_wrong_ids(index, capsys):
    assert _search_ids(index, "--no-verify") == 0
    before = json.loads(capsys.readouterr().out)["hits"]
    ids = index / "shards" / "ids-00001.txt"
    lines = ids.read_text().splitlines()
    assert lines[:2] == ["d5", "d6"]
    ids.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same size, same line count
    assert _search_ids(index, "--no-verify") == 2
    err = capsys.readouterr().err
    assert "ids-00001.txt" in err and "sha256 mismatch" in err and "changed after indexing" in err
    assert main(["check-index", "--index", str(index)]) == 2
    assert "ids-00001.txt" in capsys.readouterr().err
    assert before  # the unchanged index answered


def test_same_size_but_other_line_count_names_the_counts(index):
    ids = index / "shards" / "ids-00002.txt"
    ids.write_bytes(ids.read_bytes().replace(b"d10\n", b"d1\n\n"))
    with pytest.raises(DataError, match=r"ids-00002\.txt.*has 6 lines, the manifest says 5"):
        open_index(index, verify=False)
    with pytest.raises(DataError, match=r"ids-00002\.txt.*6 lines"):
        check_index(index)


def test_old_index_without_line_counts_still_opens_and_is_checked(index):
    m = json.loads((index / "manifest.json").read_text())
    for s in m["shards"]:
        for role in ("ids", "titles"):
            del s["files"][role]["lines"]
    (index / "manifest.json").write_text(json.dumps(m))
    assert len(open_index(index, verify=False)) == 23 and check_index(index)["rows"] == 23
    titles = index / "shards" / "titles-00004.jsonl"
    assert titles.read_bytes().count(b'""\n') == 1
    titles.write_bytes(titles.read_bytes().replace(b'""\n', b"\n\n\n"))  # same size, two more lines
    with pytest.raises(DataError, match=r"titles-00004\.jsonl.*has 5 lines, the manifest says 3"):
        check_index(index)


def test_light_check_skips_embedding_hashes_full_check_does_not(index, capsys):
    emb = index / "shards" / "emb-00000.npy"
    raw = bytearray(emb.read_bytes())
    raw[-1] ^= 0xFF
    emb.write_bytes(bytes(raw))
    assert check_index(index)["rows"] == 23  # a flipped float passes the light check (sizes agree)
    with pytest.raises(DataError, match=r"emb-00000\.npy.*sha256 mismatch"):
        check_index(index, full=True)
    (index / "index.faiss").write_bytes(b"x")
    assert main(["check-index", "--index", str(index)]) == 2
    assert "index.faiss" in capsys.readouterr().err


def test_npy_header_is_checked(index):
    import numpy as np

    emb = index / "shards" / "emb-00004.npy"
    size = emb.stat().st_size
    a = np.load(emb)
    np.save(emb, a.reshape(a.shape[1], a.shape[0]) if a.shape[0] != a.shape[1] else a.T)  # same bytes, other shape
    assert emb.stat().st_size == size
    with pytest.raises(DataError, match=r"emb-00004\.npy.*expected float32"):
        check_index(index)
