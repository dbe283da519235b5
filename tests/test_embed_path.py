"""One path from text to vector: what training embeds is what the Encoder, the index and the
searcher serve, for a custom template that does not normalise; padding is the same everywhere."""
import json

import numpy as np
import pytest
import torch
import yaml
from tiny import WORDS, make_model, make_tokenizer

from llara.cli import main
from llara.modeling.embed import normalize, pack, pool, tokenize
from llara.modeling.masks import pad_right
from llara.modeling.encoder import Encoder
from llara.modeling.loading import load_model
from llara.prompts import encode_side, get_template
from llara.modeling.embed import embed
from llara.training.contrastive import ContrastiveCollator, Group, contrastive_loss

TEXT_WORDS = [w for w in WORDS if w.isalpha()]
# queries: prompt + EOS state; passages: mean of the text states; no L2 normalisation
RAW = {"name": "raw-dot", "normalize": False,
       "query": {"prefix": "query :", "suffix": " the next sentence :", "pooling": "last", "append_eos": True},
       "passage": {"prefix": "passage :", "pooling": "mean", "append_eos": True}}


def _groups(n=8, seed=0):
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(TEXT_WORDS, size=k))  # noqa: E731
    return [Group(words(4), [words(int(rng.integers(6, 14)))], [words(int(rng.integers(3, 16))) for _ in range(3)])
            for _ in range(n)]


def test_pad_right_pads_on_the_right_to_a_multiple():
    ids, mask = pad_right([[5, 6, 7], [8], []], pad_id=0, multiple=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert pad_right([[1]], 9, min_length=3)[0].tolist() == [[1, 9, 9]]


def test_pack_weights_each_side_and_pool_reads_them():
    tok = make_tokenizer()
    t = get_template("eos")
    sides = [encode_side(tok, get_template(n).passage) for n in ("eos", "mean")]  # same ids, two poolings
    built, truncated = tokenize(tok, sides[0], ["fish breathe water", "dense model"], 4)  # BOS text EOS
    assert truncated == 1 and [len(ids) for ids, _, _ in built] == [4, 4]
    b = pack(built, sides, tok.pad_token_id, multiple=8)
    assert b.input_ids.shape == (2, 8) and b.pool.shape == (2, 2, 8) and b.attention_mask.sum() == 8
    torch.testing.assert_close(b.pool.sum(-1), torch.ones(2, 2))
    hidden = torch.randn(2, 8, 4)
    torch.testing.assert_close(pool(b.pool, hidden)[0], hidden[:, 3])  # eos: the last real token
    torch.testing.assert_close(pool(b.pool, hidden)[1], hidden[:, 1:3].mean(1))  # mean: the text
    batch = b.side_batch(t, 0)
    assert batch["normalize"].tolist() == [True, True]
    assert normalize(hidden[:, 0], torch.tensor([True, False]))[1].equal(hidden[1, 0])


def test_contrastive_loss_is_a_plain_dot_product_without_unit_norm():
    q, p = torch.randn(2, 5) * 3, torch.randn(4, 5) * 7  # far from unit norm
    scores = q @ p.T / 0.5
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 2]))
    assert contrastive_loss(q, p, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_trained_and_served_vectors_match_for_an_unnormalised_template(tmp_path):
    base = Encoder(make_model("llama"), make_tokenizer(), "eos", show_progress=False).save(tmp_path / "base")
    template = tmp_path / "raw.yaml"
    template.write_text(yaml.safe_dump(RAW))
    groups = _groups()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": g.query, "pos": g.pos, "neg": g.neg}) + "\n" for g in groups))
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(base), "--data", str(train), "--template", str(template),
                 "--output", str(out), "--batch-size", "4", "--group-size", "2", "--max-query-length", "24",
                 "--max-passage-length", "40", "--max-steps", "2", "--no-progress", "--lr", "1e-2"]) == 0
    final = out / "final"

    # training's embedding of the trained weights (eval mode: no dropout), through the training collator
    model, tok, _ = load_model(str(final), causal_lm=True, device="cpu", dtype="float32")
    model.eval()
    tmpl = get_template(str(template))
    batch = ContrastiveCollator(tok, tmpl, group_size=1, max_query_length=24, max_passage_length=40)(groups)
    with torch.no_grad():
        q_train, p_train = embed(model, batch["query"]).numpy(), embed(model, batch["passage"]).numpy()
    assert not np.allclose(np.linalg.norm(q_train, axis=1), 1.0, atol=1e-2)
    assert not np.allclose(np.linalg.norm(p_train, axis=1), 1.0, atol=1e-2)

    # the Encoder loads the checkpoint's own template and lengths
    enc = Encoder.from_pretrained(str(final), device="cpu", show_progress=False)
    assert enc.template.normalize is False and enc.template.name == "raw-dot"
    queries, passages = [g.query for g in groups], [g.pos[0] for g in groups]
    np.testing.assert_allclose(enc.encode_queries(queries), q_train, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.encode_corpus([{"text": p} for p in passages]), p_train, rtol=1e-4, atol=1e-5)

    # the index and the searcher serve the same dot products
    from llara.retrieval.index import build_index
    from llara.retrieval.searcher import Searcher

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": p}) + "\n" for i, p in enumerate(passages)))
    index = build_index(enc, corpus, tmp_path / "index", model_spec=str(final), shard_size=5)
    searcher = Searcher.from_index(index, device="cpu")
    assert searcher.encoder.template.normalize is False
    hits = searcher.search(queries[:3], k=len(passages), mode="dense")
    for qi, row in enumerate(hits):
        got = {h.doc_id: h.score for h in row}
        want = {f"d{i}": float(q_train[qi] @ p_train[i]) for i in range(len(passages))}
        assert got.keys() == want.keys()
        for d in want:
            assert got[d] == pytest.approx(want[d], rel=1e-4, abs=1e-4)
