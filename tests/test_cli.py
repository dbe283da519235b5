"""The CLI, called in-process."""
import json

import pytest
from tiny import make_model, make_tokenizer

from llara.cli import main
from llara.modeling.encoder import Encoder


@pytest.fixture
def tiny_ckpt(tmp_path):
    enc = Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False,
                  max_query_length=32, max_passage_length=64)
    return str(enc.save(tmp_path / "ckpt"))


def test_evaluate_bm25_writes_metrics_and_run(adi_dir, tmp_path, capsys):
    assert main(["evaluate", "--method", "bm25", "--dataset", str(adi_dir), "--output", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "adi" / "bm25" / "metrics.json").read_text())
    assert m["dataset"] == "adi" and m["model"] == "bm25" and m["num_queries"] == 35 and m["num_docs"] == 82
    assert set(m["metrics"]) == {"ndcg@10", "recall@100", "mrr@10", "map@100"}
    assert 0.3 < m["metrics"]["ndcg@10"] < 0.7
    run_lines = (tmp_path / "out" / "adi" / "bm25" / "run.trec").read_text().splitlines()
    assert run_lines[0].split()[1] == "Q0" and run_lines[0].split()[3] == "1"
    assert "ndcg@10" in capsys.readouterr().out


def test_evaluate_dense_several_templates_and_datasets(adi_dir, tiny_ckpt, tmp_path, capsys):
    other = tmp_path / "mini"
    (other / "qrels").mkdir(parents=True)
    (other / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "paris", "text": "the capital of france"}\n'
        '{"_id": "d2", "title": "", "text": "fish breathe water"}\n'
    )
    (other / "queries.jsonl").write_text('{"_id": "q1", "text": "capital of france"}\n')
    (other / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", tiny_ckpt, "--dataset", str(adi_dir), "--dataset", str(other),
               "--method", "dense", "--method", "bm25", "--template", "llara", "--template", "mean",
               "--output", str(out), "--no-cache"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["dataset"], r["template"]) for r in summary] == [
        ("adi", "llara"), ("adi", "mean"), ("adi", "bm25"), ("mini", "llara"), ("mini", "mean"), ("mini", "bm25")]
    for r in summary:
        assert 0.0 <= r["metrics"]["ndcg@10"] <= 1.0
    dense = json.loads((out / "adi" / "ckpt__llara" / "metrics.json").read_text())
    assert dense["settings"]["max_passage_length"] == 64  # read back from the checkpoint
    table = capsys.readouterr().out
    assert "ckpt:llara" in table and "ckpt:mean" in table and "bm25" in table


def test_bad_dataset_gives_file_line_and_reason(tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "qrels").mkdir(parents=True)
    (bad / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n')
    (bad / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (bad / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    rc = main(["evaluate", "--method", "bm25", "--dataset", str(bad), "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "corpus.jsonl:2" in err


def test_unknown_template_is_a_clear_error(adi_dir, tiny_ckpt, tmp_path, capsys):
    rc = main(["evaluate", "--model", tiny_ckpt, "--dataset", str(adi_dir), "--template", "nope",
               "--output", str(tmp_path / "o"), "--no-cache"])
    assert rc == 2
    assert "unknown template" in capsys.readouterr().err


@pytest.mark.parametrize("succeeds", [True, False])
def test_the_command_tears_down_a_process_group_it_ran_under(adi_dir, tmp_path, succeeds):
    """Under accelerate launch / torchrun the process group is up while the command runs; the CLI destroys
    it once the command is over, whether the command succeeded or failed."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dataset = str(adi_dir) if succeeds else str(tmp_path / "missing")
        rc = main(["evaluate", "--method", "bm25", "--dataset", dataset, "--output", str(tmp_path / "out")])
        assert (rc == 0) is succeeds
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
