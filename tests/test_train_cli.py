"""`llara pretrain` and `llara finetune` end to end on a tiny model, then `llara evaluate` on the result."""
import json

import pytest
from tiny import WORDS, make_model, make_tokenizer

from llara.cli import main
from llara.modeling.encoder import Encoder


@pytest.fixture
def tiny_dir(tmp_path):
    return str(Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False).save(tmp_path / "base"))


def _text_file(path, docs=6):
    import random

    rng = random.Random(0)
    words = [w for w in WORDS if w.isalpha()]
    blocks = []
    for _ in range(docs):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))) + " ." for _ in range(6)]
        blocks.append(" ".join(sents))
    path.write_text("\n\n".join(blocks) + "\n")
    return str(path)


def test_pretrain_resume_and_evaluate(tiny_dir, tmp_path, adi_dir):
    data = _text_file(tmp_path / "docs.txt")
    out = tmp_path / "run"
    common = ["pretrain", "--model", tiny_dir, "--data", data, "--output", str(out), "--batch-size", "2",
              "--chunk-tokens", "12", "--min-chunk-tokens", "2", "--no-progress", "--save-every", "2", "--lr", "1e-3"]
    assert main(common + ["--max-steps", "3"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert {"loss", "ebae", "ebar", "lm", "tokens_per_s"} <= set(log[0])
    assert (out / "loss.png").stat().st_size > 1000
    cfg = json.loads((out / "final" / "llara.json").read_text())
    assert cfg["template"]["name"] == "llara" and cfg["pretrain_loss"]["bow_scale"] == 0.1

    assert main(common + ["--max-steps", "5", "--resume"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5]

    res = tmp_path / "eval"
    assert main(["evaluate", "--model", str(out / "final"), "--dataset", str(adi_dir), "--output", str(res),
                 "--no-cache"]) == 0
    m = json.loads((res / "summary.json").read_text())[0]
    assert m["template"] == "llara" and 0 <= m["metrics"]["ndcg@10"] <= 1


def test_mine_then_finetune_with_grad_cache(tiny_dir, tmp_path, adi_dir):
    train = tmp_path / "train.jsonl"
    assert main(["mine", "--method", "bm25", "--corpus", str(adi_dir / "corpus.jsonl"), "--queries",
                 str(adi_dir / "queries.jsonl"), "--qrels", str(adi_dir / "qrels" / "test.tsv"),
                 "--window", "2", "20", "--negatives", "3", "--output", str(train)]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", "--model", tiny_dir, "--data", str(train), "--output", str(out), "--batch-size", "4",
                 "--group-size", "3", "--grad-cache-chunk", "5", "--max-passage-length", "48", "--max-steps", "2",
                 "--lora", "--lora-r", "4", "--no-progress", "--lr", "1e-3"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(e["loss"] > 0 for e in log)
    cfg = json.loads((out / "final" / "llara.json").read_text())
    assert cfg["finetune"]["group_size"] == 3 and cfg["template"]["name"] == "llara"
    enc = Encoder.from_pretrained(str(out / "final"), show_progress=False, device="cpu")
    assert enc.encode(["fish"], "query").shape == (1, 32)


def test_demo_evaluates_adapts_and_evaluates_again(tiny_dir, tmp_path, adi_dir, capsys, monkeypatch):
    from llara.data.beir import load_beir
    from llara.evaluation.metrics import evaluate_run, read_trec_run
    from llara.retrieval.fusion import FusionConfig, fuse

    encodes = []
    real = Encoder.encode_multi
    monkeypatch.setattr(Encoder, "encode_multi", lambda self, *a, **kw: encodes.append(1) or real(self, *a, **kw))
    out = tmp_path / "demo"
    args = ["demo", "--model", tiny_dir, "--dataset", str(adi_dir), "--output", str(out), "--adapt-steps", "2",
            "--adapt-batch-size", "2", "--adapt-chunk-tokens", "16", "--max-passage-length", "48", "--no-cache"]
    assert main(args) == 0
    assert len(encodes) == 4  # queries + corpus before and after adaptation; the hybrid encodes nothing
    text = capsys.readouterr().out
    assert "before adaptation" in text and "nDCG@10 of the LLaRA slots" in text
    assert "hybrid of BM25 and the adapted slots" in text
    rows = json.loads((out / "summary.json").read_text())
    assert {(r["model"], r["template"]) for r in rows} >= {("bm25", "bm25"), ("adapted", "llara")}
    hybrid = [r for r in rows if r["retrieval"] == "hybrid"]
    assert len(hybrid) == 1 and hybrid[0]["settings"]["fusion"] == FusionConfig().to_dict()
    dense_dir = next(d for d in (out / "after" / "adi").iterdir() if not d.name.startswith("hybrid"))
    fused = fuse(read_trec_run(dense_dir / "run.trec"), read_trec_run(out / "before" / "adi" / "bm25" / "run.trec"),
                 k=100)
    assert hybrid[0]["metrics"]["ndcg@10"] == pytest.approx(evaluate_run(load_beir(adi_dir).qrels, fused)["ndcg@10"])
    assert "hybrid: BM25 + adapted slots" in (out / "summary.md").read_text()
    assert all(r["dataset"] == "adi" for r in rows)
    assert "| ndcg@10 |" in (out / "summary.md").read_text()
    assert (out / "adapt" / "loss.png").is_file() and (out / "adapt" / "final" / "llara.json").is_file()
    steps = [json.loads(x)["step"] for x in (out / "adapt" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # a second run resumes the finished adaptation instead of training again
    assert main(args) == 0
    steps = [json.loads(x)["step"] for x in (out / "adapt" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
