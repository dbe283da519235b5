"""Hostile data through the CLI: text that looks like Rich markup is printed as it is (no
MarkupError traceback, no vanishing "[doc1]"), every error ends in one plain line and an exit code,
and every ``--help`` renders."""
from __future__ import annotations

import json

import pytest
from tiny_index import save_model

from llara.cli import build_parser, main

MARKUP = "[/bold]"  # rich.errors.MarkupError when printed as markup
VANISHING = "[doc1]"  # silently dropped when printed as markup


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return captured.err


@pytest.mark.parametrize("command", _subcommands())
def test_every_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llara {command}") and "--" in out
    assert "option_strings" not in out and "%(" not in out  # a stray % formats argparse's internals


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in _subcommands())


def _dataset(root, doc_ids, texts, qid="q1"):
    (root / "qrels").mkdir(parents=True)
    _jsonl(root / "corpus.jsonl", [{"_id": d, "title": t, "text": t} for d, t in zip(doc_ids, texts)])
    _jsonl(root / "queries.jsonl", [{"_id": qid, "text": texts[0]}])
    (root / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\n{qid}\t{doc_ids[0]}\t1\n")
    return root


@pytest.mark.parametrize("bad_id", [MARKUP, VANISHING])
def test_evaluate_error_keeps_markup_like_ids(tmp_path, capsys, bad_id):
    ds = _dataset(tmp_path / "ds", [bad_id, bad_id], ["the fish", "the river"])
    rc = main(["evaluate", "--method", "bm25", "--dataset", str(ds), "--output", str(tmp_path / "o")])
    assert rc == 2
    err = _error_line(capsys)
    assert f"duplicate _id '{bad_id}'" in err and "corpus.jsonl:2" in err


def test_evaluate_prints_markup_like_names_and_paths(tmp_path, capsys):
    ds = _dataset(tmp_path / f"{VANISHING}set", [MARKUP, VANISHING], [f"{MARKUP} fish", "river"], qid=MARKUP)
    out_dir = tmp_path / f"out{VANISHING}"
    assert main(["evaluate", "--method", "bm25", "--dataset", str(ds), "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{VANISHING}set" in out and f"out{VANISHING}" in out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model(tmp_path_factory.mktemp("model") / "m"))


def test_index_error_and_search_output_keep_markup(tmp_path, capsys, model_dir):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"_id": VANISHING, "text": "a"}, {"_id": VANISHING, "text": "b"}])
    rc = main(["index", "--model", model_dir, "--corpus", bad, "--output", str(tmp_path / "bad-idx"), "--no-cache"])
    assert rc == 2
    assert f"duplicate _id '{VANISHING}'" in _error_line(capsys)

    corpus = _jsonl(tmp_path / "c.jsonl", [{"_id": VANISHING, "title": MARKUP, "text": "fish in the river"},
                                           {"_id": MARKUP, "title": VANISHING, "text": "the capital city"}])
    idx = tmp_path / f"idx{VANISHING}"
    assert main(["index", "--model", model_dir, "--corpus", corpus, "--output", str(idx), "--no-cache"]) == 0
    assert str(idx) in capsys.readouterr().out
    assert main(["search", "--index", str(idx), f"{MARKUP} fish", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{MARKUP} fish" in out and VANISHING in out and out.count(MARKUP) >= 3  # title, id, query
    assert main(["search", "--index", str(tmp_path / f"missing{VANISHING}"), "fish"]) == 2
    assert f"missing{VANISHING}" in _error_line(capsys)
    assert main(["search", "--index", str(idx), "fish", "--faiss-params", MARKUP]) == 2  # FAISS's RuntimeError
    err = _error_line(capsys)
    assert f"invalid FAISS parameters '{MARKUP}'" in err and ".cpp" not in err
    assert main(["check-index", "--index", str(idx)]) == 0
    assert str(idx) in capsys.readouterr().out
    assert main(["serve", "--index", str(idx), "--port", "99999"]) == 2
    assert "port must be 0-65535" in _error_line(capsys)


def test_mine_errors_keep_markup(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", ["d1", "d2"], ["the fish", "the river"])
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(f"query-id\tcorpus-id\tscore\n{MARKUP}\td1\t1\n")
    rc = main(["mine", "--method", "bm25", "--corpus", str(ds / "corpus.jsonl"), "--queries",
               str(ds / "queries.jsonl"), "--qrels", str(qrels), "--output", str(tmp_path / "t.jsonl")])
    assert rc == 2
    assert f"query id '{MARKUP}'" in _error_line(capsys)
    bad = _jsonl(tmp_path / "c.jsonl", [{"_id": MARKUP, "text": "a"}, {"_id": MARKUP, "text": "b"}])
    rc = main(["mine", "--method", "bm25", "--corpus", bad, "--train", str(tmp_path / "t.jsonl"),
               "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert f"duplicate _id '{MARKUP}'" in _error_line(capsys)


def _train_args(cmd, model_dir, data, out):
    return [cmd, "--model", model_dir, "--data", data, "--output", str(out), "--max-steps", "1", "--batch-size",
            "2", "--no-progress"]


def test_pretrain_errors_keep_markup_and_existing_run_needs_resume(tmp_path, capsys, model_dir):
    passages = _jsonl(tmp_path / "p.jsonl", [{"doc": MARKUP, "idx": 0, "text": "fish in the river"},
                                             {"doc": "other", "idx": 0, "text": "the capital city"},
                                             {"doc": MARKUP, "idx": 1, "text": "the river"}])
    rc = main(_train_args("pretrain", model_dir, passages, tmp_path / "run"))
    assert rc == 2
    err = _error_line(capsys)
    assert f"doc '{MARKUP}' appears again" in err and "p.jsonl:3" in err

    missing = str(tmp_path / f"{VANISHING}missing.txt")
    assert main(_train_args("pretrain", model_dir, missing, tmp_path / "run2")) == 2
    assert f"{VANISHING}missing.txt" in _error_line(capsys)

    run = tmp_path / "run3"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    text = tmp_path / "t.txt"
    text.write_text("the fish in the river . the capital city .\n")
    assert main(_train_args("pretrain", model_dir, str(text), run)) == 2
    err = _error_line(capsys)
    assert "holds checkpoints of an earlier run" in err and "--resume" in err


def test_finetune_errors_keep_markup(tmp_path, capsys, model_dir):
    data = _jsonl(tmp_path / f"{VANISHING}train.jsonl", [{"query": MARKUP, "pos": MARKUP}])
    rc = main(_train_args("finetune", model_dir, data, tmp_path / "ft"))
    assert rc == 2
    err = _error_line(capsys)
    assert f"{VANISHING}train.jsonl:1" in err and "'pos' must be a non-empty list" in err


def test_finetune_rejects_a_group_without_negatives_before_loading_the_model(tmp_path, capsys, model_dir, monkeypatch):
    import llara.training.finetune as ft

    monkeypatch.setattr(ft, "load_model", lambda *a, **kw: pytest.fail("the model loaded before the data was checked"))
    data = _jsonl(tmp_path / "train.jsonl", [{"query": "a", "pos": ["x"], "neg": ["y"]},
                                             {"query": "rutabaga", "pos": ["z"], "neg": []}])
    assert main(_train_args("finetune", model_dir, data, tmp_path / "ft") + ["--group-size", "2"]) == 2
    err = " ".join(_error_line(capsys).split())
    assert "train.jsonl:2" in err and "'neg' is empty, but --group-size 2" in err
    assert not (tmp_path / "ft").exists()


def test_unexpected_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import llara.cli.commands as cli

    def boom(args):
        raise RuntimeError(f"bug with {MARKUP}")

    monkeypatch.setattr(cli, "cmd_check_index", boom)
    assert main(["check-index", "--index", str(tmp_path)]) == 1
    err = _error_line(capsys)
    assert f"unexpected RuntimeError: bug with {MARKUP}" in err and "-v" in err
