"""llara.io: the one atomic-write routine and its wrappers, JSON lines with file:line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llara.io import (
    DataError,
    atomic_dir,
    atomic_path,
    json_line,
    open_atomic,
    save_npy,
    write_json,
    write_jsonl,
    write_text,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with open_atomic(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_wrappers_write_through_one_routine(tmp_path):
    assert write_jsonl(({"i": i, "t": "é"} for i in range(3)), tmp_path / "sub" / "r.jsonl") == 3
    assert (tmp_path / "sub" / "r.jsonl").read_text(encoding="utf-8").splitlines()[1] == '{"i": 1, "t": "é"}'
    write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2]}
    save_npy(tmp_path / "e.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.load(tmp_path / "e.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    write_text(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "p.txt") as tmp:  # for writers that want a file name (FAISS, matplotlib)
        assert tmp.parent == tmp_path and tmp.name != "p.txt"
        tmp.write_text("x")
    assert (tmp_path / "p.txt").read_text() == "x"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0o600


def test_atomic_dir_replaces_or_keeps_and_cleans_up(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "config.json").write_text("1")
    with atomic_dir(out) as d:
        (d / "config.json").write_text("2")
    assert (out / "config.json").read_text() == "2"
    with atomic_dir(out, keep_existing=True) as d:  # another process built it first: keep theirs
        (d / "config.json").write_text("3")
    assert (out / "config.json").read_text() == "2"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "config.json").write_text("4")
            raise RuntimeError("killed")
    assert (out / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_line_names_file_line_and_problem(tmp_path):
    p = tmp_path / "titles.txt"
    assert json_line(p, 3, '"a title"', str) == "a title"
    with pytest.raises(DataError, match=r"titles.txt:4: malformed JSON"):
        json_line(p, 4, '"unterminated', str)
    with pytest.raises(DataError, match=r"titles.txt:5: expected a JSON string, got int"):
        json_line(p, 5, "7", str)
    with pytest.raises(DataError, match=r"titles.txt:6: expected a JSON object, got list"):
        json_line(p, 6, "[1]")
