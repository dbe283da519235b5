"""Wrong usage is caught before any work: each command's config checks its input in ``__post_init__``,
so a wrong flag gives one ``error:`` line (exit 2) before a model loads, and leaves nothing behind
(no output directory, no training log)."""
from __future__ import annotations

import json
import socket

import pytest
from tiny_index import save_model, write_corpus

from llara.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import llara.modeling.encoder as encoder
    import llara.retrieval.searcher as searcher
    import llara.training.pretrain as pretrain

    def loaded(*a, **kw):
        pytest.fail("a model loaded before the input was checked")

    monkeypatch.setattr(encoder.Encoder, "from_pretrained", loaded)
    monkeypatch.setattr(searcher.Searcher, "from_index", loaded)
    monkeypatch.setattr(pretrain, "load_model", loaded)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("idx")
    corpus = write_corpus(root / "corpus.jsonl", n=5)
    assert main(["index", "--model", model_dir, "--corpus", str(corpus), "--output", str(root / "index")]) == 0
    return root / "index"


@pytest.mark.parametrize("command", [
    ["index", "--corpus", "CORPUS", "--output", "OUT"],
    ["evaluate", "--dataset", "DATASET", "--output", "OUT"],
    ["mine", "--corpus", "CORPUS", "--train", "TRAIN", "--output", "OUT/train.jsonl"],
    ["pretrain", "--data", "CORPUS", "--output", "OUT", "--max-steps", "1"],
    ["export", "/nonexistent", "OUT"],
])
def test_a_model_that_does_not_exist_is_named(command, tmp_path, capsys, no_model_loads, adi_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=3)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"query": "a", "pos": ["b"]}) + "\n")
    subs = {"CORPUS": str(corpus), "OUT": str(tmp_path / "out"), "DATASET": str(adi_dir), "TRAIN": str(train),
            "OUT/train.jsonl": str(tmp_path / "out" / "train.jsonl")}
    argv = [subs.get(a, a) for a in command] + ([] if command[0] == "export" else ["--model", "/nonexistent"])
    assert main(argv) == 2
    assert "no such model: /nonexistent" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_not_in_the_cache_offline_is_named(tmp_path, capsys, no_model_loads):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=3)
    argv = ["index", "--model", "nobody/no-such-model", "--corpus", str(corpus), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "no such model: nobody/no-such-model" in err and "Hugging Face cache" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-batch-tokens", "-5"], "--max-batch-tokens must be >= 1"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--max-query-length", "0"], "--max-query-length must be >= 1"),
    (["--alpha", "1.5"], "alpha must be a number in [0, 1]"),
    (["--template", "eos", "--template", "mean"], "an index has one template"),
    (["--template", "no-such-template"], "no-such-template"),
    (["--shard", "3/2"], "0 <= i < n"),
])
def test_index_ranges_are_checked_first(flags, message, tmp_path, capsys, model_dir, no_model_loads):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=3)
    out = tmp_path / "out"
    assert main(["index", "--model", model_dir, "--corpus", str(corpus), "--output", str(out), *flags]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("content,message", [
    (None, "no such corpus file"),
    ("", "file is empty"),
    ("\n\n", "file is empty"),
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', ":2: "),
    ('{"_id": "a", "text": "x"}\n[1, 2]\n', ":2: "),
    ('{"_id": "a"}\n', "missing field 'text'"),
    ('{"text": "x"}\n', "missing field '_id'"),
    ('{"_id": "a", "text": 3}\n', "field 'text' must be a string"),
    ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "duplicate _id 'a'"),
    ('{"_id": "", "text": "x"}\n', "field '_id' is empty"),
])
def test_a_bad_corpus_leaves_no_output_directory(content, message, tmp_path, capsys, model_dir, no_model_loads):
    corpus = tmp_path / "corpus.jsonl"
    if content is not None:
        corpus.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["index", "--model", model_dir, "--corpus", str(corpus), "--output", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_a_corpus_directory_is_not_a_corpus_file(tmp_path, capsys, model_dir, no_model_loads):
    assert main(["index", "--model", model_dir, "--corpus", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "it is a directory" in _one_error_line(capsys)


def test_pretrain_on_missing_data_leaves_no_training_log(tmp_path, capsys, model_dir, no_model_loads):
    out = tmp_path / "run"
    argv = ["pretrain", "--model", model_dir, "--data", str(tmp_path / "missing.jsonl"), "--output", str(out),
            "--max-steps", "1"]
    assert main(argv) == 2
    assert "missing.jsonl: no such data file" in _one_error_line(capsys)
    assert not out.exists()


def test_finetune_on_bad_json_leaves_no_run_directory(tmp_path, capsys, model_dir, no_model_loads):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "a", "pos": ["b"], "neg": ["c"]}\n{"query": \n', encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", "--model", model_dir, "--data", str(data), "--output", str(out), "--max-steps", "1"]) == 2
    assert "train.jsonl:2" in _one_error_line(capsys)
    assert not out.exists()


def test_serve_on_a_busy_port_fails_before_loading(built_index, capsys, no_model_loads):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--index", str(built_index), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in _one_error_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-pending", "4", "--max-batch", "8"], "--max-pending (4) must be >= --max-batch (8)"),
    (["--body-timeout", "0"], "--body-timeout must be > 0"),
    (["--port", "70000"], "--port must be 0-65535"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1"),
])
def test_serve_limits_are_checked_first(flags, message, built_index, capsys, no_model_loads):
    assert main(["serve", "--index", str(built_index), *flags]) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_search_an_empty_query_fails_like_the_service(query, built_index, capsys, no_model_loads):
    assert main(["search", "--index", str(built_index), "fish", query]) == 2
    assert "query 2 is empty (only whitespace)" in _one_error_line(capsys)


def test_search_and_serve_name_a_missing_index(tmp_path, capsys, no_model_loads):
    for command in (["search", "--index", str(tmp_path / "nope"), "fish"], ["serve", "--index", str(tmp_path)]):
        assert main(command) == 2
        assert "no index here (no manifest.json" in _one_error_line(capsys)


def test_search_fusion_settings_only_in_hybrid_mode(built_index, capsys):
    """The rule lives on Searcher.plan, which the service calls too (tests/test_hybrid.py)."""
    assert main(["search", "--index", str(built_index), "fish", "--mode", "dense", "--alpha", "0.3"]) == 2
    assert "alpha: only for mode 'hybrid'" in _one_error_line(capsys)


def test_an_existing_index_needs_resume(built_index, tmp_path, capsys, model_dir, no_model_loads):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=3)
    assert main(["index", "--model", model_dir, "--corpus", str(corpus), "--output", str(built_index)]) == 2
    assert "already holds an index" in _one_error_line(capsys)


def test_mine_names_a_missing_qrels_file(tmp_path, capsys, model_dir, no_model_loads):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=3)
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q", "text": "fish"}\n')
    argv = ["mine", "--model", model_dir, "--corpus", str(corpus), "--queries", str(queries), "--qrels",
            str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "out" / "t.jsonl")]
    assert main(argv) == 2
    assert "missing.tsv: no such --qrels file" in _one_error_line(capsys)
    assert main(argv[:-4] + ["--window", "5", "2", "--train", str(queries), "--output", "x"]) == 2
    assert "rank window must satisfy 1 <= lo <= hi" in _one_error_line(capsys)


def test_demo_checks_its_dataset_and_steps(tmp_path, capsys, no_model_loads):
    assert main(["demo", "--dataset", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "not a BEIR dataset" in _one_error_line(capsys)
    assert main(["demo", "--adapt-steps", "-1", "--output", str(tmp_path / "out")]) == 2
    assert "adapt_steps must be >= 0" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
