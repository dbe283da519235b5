"""Hard-negative mining: rank window, positives excluded, no duplicates, margin guard, CLI."""
import json

import pytest
from tiny import make_model, make_tokenizer

from llara.cli import main
from llara.io import DataError
from llara.modeling.encoder import Encoder
from llara.retrieval.mining import MiningConfig, positives_from_train_jsonl, sample_negatives


def _run(n=50):
    return {"q": {f"d{i}": float(n - i) for i in range(n)}}  # d0 ranked first


def test_negatives_come_from_the_window_and_exclude_positives():
    neg = sample_negatives(_run(), {"q": {"d12", "d3"}}, MiningConfig(window=(10, 20), num_negatives=50))["q"]
    assert "d12" not in neg and "d3" not in neg
    assert sorted(neg, key=lambda d: int(d[1:])) == [f"d{i}" for i in range(9, 20) if i != 12]
    assert len(set(neg)) == len(neg)


def test_sampling_is_seeded_and_sized():
    cfg = MiningConfig(window=(1, 50), num_negatives=5, seed=3)
    a = sample_negatives(_run(), {"q": {"d0"}}, cfg)["q"]
    assert a == sample_negatives(_run(), {"q": {"d0"}}, cfg)["q"] and len(a) == 5 and "d0" not in a
    assert a != sample_negatives(_run(), {"q": {"d0"}}, MiningConfig(window=(1, 50), num_negatives=5, seed=4))["q"]


def test_a_short_window_is_topped_up_with_random_documents():
    """A rare query term: BM25 returns 3 documents, the window 2-20 holds 2 of them; 3 more come from the corpus."""
    run = {"q": {"p": 3.0, "a": 2.0, "b": 1.0}, "full": _run()["q"]}
    corpus = [f"d{i}" for i in range(50)] + ["p", "a", "b"]
    cfg = MiningConfig(window=(2, 20), num_negatives=5, seed=1)
    out = sample_negatives(run, {"q": {"p"}, "full": {"d0"}}, cfg, fill_from=corpus)
    assert {"a", "b"} <= set(out["q"]) and len(out["q"]) == 5 and "p" not in out["q"]
    assert len(set(out["q"])) == 5
    # a full window is not touched, and without a corpus nothing is added
    assert out["full"] == sample_negatives(run, {"full": {"d0"}}, cfg)["full"]
    assert sorted(sample_negatives(run, {"q": {"p"}}, cfg)["q"]) == ["a", "b"]


def test_margin_guard_drops_near_positive_scores():
    run = {"q": {"p": 10.0, "a": 9.9, "b": 9.0, "c": 5.0}}
    neg = sample_negatives(run, {"q": {"p"}}, MiningConfig(window=(1, 4), num_negatives=10, margin=0.5))["q"]
    assert sorted(neg) == ["b", "c"]
    # with an explicit positive score (e.g. a positive the retriever did not return)
    neg = sample_negatives(run, {"q": {"zz"}}, MiningConfig(window=(1, 4), num_negatives=10, margin=0.5), {"q": 9.2})["q"]
    assert neg == ["c"]  # threshold 9.2 - 0.5: p, a and b are all too close


def test_window_validation():
    with pytest.raises(ValueError):
        MiningConfig(window=(0, 10))


def test_train_jsonl_positives_matched_by_text(tmp_path):
    corpus = {"a": {"title": "", "text": "fish breathe water"}, "b": {"title": "t", "text": "paris"}}
    p = tmp_path / "train.jsonl"
    p.write_text('{"query": "x", "pos": ["fish breathe water", "t paris", "unknown"]}\n')
    queries, pos, unmatched = positives_from_train_jsonl(p, corpus)
    assert pos == {"q1": {"a", "b"}} and unmatched == 1
    p.write_text('{"query": "x"}\n')
    with pytest.raises(DataError, match="train.jsonl:1"):
        positives_from_train_jsonl(p, corpus)


@pytest.mark.parametrize("method", ["bm25", "dense"])
def test_cli_mine_on_adi(adi_dir, tmp_path, method):
    out = tmp_path / "train.jsonl"
    args = ["mine", "--method", method, "--corpus", str(adi_dir / "corpus.jsonl"), "--queries",
            str(adi_dir / "queries.jsonl"), "--qrels", str(adi_dir / "qrels" / "test.tsv"),
            "--window", "3", "30", "--negatives", "4", "--output", str(out)]
    if method == "dense":
        enc = Encoder(make_model(), make_tokenizer(), "eos", show_progress=False)
        args += ["--model", str(enc.save(tmp_path / "m")), "--no-cache"]
    assert main(args) == 0
    qrels = {}
    for line in (adi_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, set()).add(d)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(qrels)
    for r in rows:
        assert set(r["pos_ids"]) == qrels[r["query_id"]]
        assert not set(r["neg_ids"]) & qrels[r["query_id"]]
        assert len(set(r["neg_ids"])) == len(r["neg_ids"]) <= 4
        assert len(r["neg"]) == len(r["neg_ids"]) and isinstance(r["query"], str)


def test_shipped_squad_pairs_load_and_resolve():
    from llara.data.shipped import PAIRS_DIR
    from llara.data.beir import load_corpus, load_qrels, load_queries

    d = PAIRS_DIR / "squad"
    corpus, queries = load_corpus(d / "corpus.jsonl.gz"), load_queries(d / "queries.jsonl.gz")
    qrels = load_qrels(d / "qrels" / "train.tsv.gz")
    assert (len(corpus), len(queries), len(qrels)) == (2067, 10570, 10570)
    assert all(q in queries and set(rel) <= set(corpus) for q, rel in qrels.items())
    assert "CC BY-SA 4.0" in (d / "README.md").read_text()


def test_cli_mine_pairs_conflicts_with_explicit_files(adi_dir, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["mine", "--pairs", "squad", "--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(out)]) == 2
    assert "--pairs replaces" in capsys.readouterr().err
    assert main(["mine", "--output", str(out)]) == 2
    assert not out.exists()
