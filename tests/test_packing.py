"""Sequence packing: the row layout, packed embeddings and gradients equal padded ones (llama, mistral,
qwen2; slots, last-token and mean pooling), the model check, the collator's passes and GradCache over
packed chunks, and `llara finetune` with and without packing."""
import json
import random

import pytest
import torch
import transformers.masking_utils as masking_utils
from tiny import make_model, make_tokenizer

from llara.cli import main
from llara.modeling.embed import embed
from llara.modeling.loading import ensure_slot_tokens
from llara.modeling.packing import best_fit_rows, pack_texts, packed_positions, packing_supported, plain_or_packed
from llara.prompts import get_template
from llara.training.contrastive import ContrastiveCollator, Group, contrastive_loss, grad_cache_step

WORDS = "the capital of france is paris fish water river city plant cell blood heart brain".split()


def groups(n=6, seed=0):
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [Group(sent(rng.randint(2, 6)), [sent(rng.randint(4, 30))], [sent(rng.randint(3, 30)) for _ in range(4)])
            for _ in range(n)]


def setup(arch="llama", template="llara"):
    tok = make_tokenizer()
    model = make_model(arch, seed=1)
    ensure_slot_tokens(tok, model, get_template(template).slot_tokens)
    return model, tok


def collate(tok, template, gs, **kw):
    return ContrastiveCollator(tok, template, group_size=3, max_query_length=32, max_passage_length=64, **kw)(gs)


# ------------------------------------------------------------------------------ layout
def test_best_fit_rows_places_every_text_once_within_the_width():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    rows = best_fit_rows(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 40) * 1.25  # best-fit decreasing: close to the bound
    assert best_fit_rows(lengths, 40) == rows  # deterministic
    assert best_fit_rows([5, 3, 5, 2, 5], 5) == [[0], [2], [4], [1, 3]]
    with pytest.raises(ValueError, match="text 1 has 6 tokens"):
        best_fit_rows([2, 6], 5)
    with pytest.raises(ValueError, match="has 0 tokens"):
        best_fit_rows([0], 5)


def test_pack_texts_layout():
    texts = [([10, 11, 12], [2], True), ([20, 21, 22, 23, 24, 25], [4, 5], False), ([30, 31], [0, 1], True)]
    rows = pack_texts(texts, pad_id=0, multiple=4)
    # width 8 (6 rounded up to 4s): the 6-token text first, then the 2-token one beside it; the 3-token alone
    assert rows["input_ids"].tolist() == [[20, 21, 22, 23, 24, 25, 30, 31], [10, 11, 12, 0, 0, 0, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    flat = rows["input_ids"].reshape(-1)
    # each text's pooled positions point at its own tokens; shorter lists end in weight 0
    assert flat[rows["pool_index"]].tolist() == [[12, 20], [24, 25], [30, 31]]
    assert rows["pool_weight"].tolist() == [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    assert rows["normalize"].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="text 0: pooled positions"):
        pack_texts([([1, 2], [2], True)], 0)


def test_plain_or_packed_packs_each_side_alone_when_that_computes_fewer_positions():
    short = [([1] * 5, [4], True)] * 4
    long_ = [([2] * 24, [23], True)] * 3
    joint = plain_or_packed([short, long_], 0, 8)
    assert len(joint) == 1 and tuple(joint[0]["input_ids"].shape) == (4, 24)  # 5+5+5+5 fits beside nothing: one row
    wide_queries = [([1] * 13, [12], True)] * 4  # two do not fit in 24: one row each in a joint pass
    split = plain_or_packed([wide_queries, long_], 0, 8)
    assert [tuple(p["input_ids"].shape) for p in split] == [(4, 16), (3, 24)]
    assert packed_positions([13] * 4 + [24] * 3, 8) == 7 * 24 > 4 * 16 + 3 * 24


# ------------------------------------------------------------------------------ equal to padded rows
@pytest.mark.parametrize("arch,template", [("llama", "llara"), ("mistral", "llara"), ("qwen2", "llara"),
                                           ("llama", "eos"), ("llama", "mean")])
def test_packed_embeddings_and_gradients_equal_padded_ones(arch, template):
    model, tok = setup(arch, template)
    model.train()  # no dropout in the tiny configs: train mode changes nothing but is what training runs
    gs = groups()
    padded = collate(tok, template, gs)
    packed = collate(tok, template, gs, packing=True)
    passes = packed["passes"]
    assert sum(p["input_ids"].numel() for p in passes) < (padded["query"]["input_ids"].numel()
                                                          + padded["passage"]["input_ids"].numel())
    assert int(packed["num_tokens"]) == int(padded["query"]["attention_mask"].sum() + padded["passage"]["attention_mask"].sum())

    def loss_and_grads(q, p):
        model.zero_grad()
        loss = contrastive_loss(q, p, 0.05)
        loss.backward()
        return q.detach(), p.detach(), {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}

    ref = loss_and_grads(embed(model, padded["query"]), embed(model, padded["passage"]))
    both = torch.cat([embed(model, rows) for rows in passes])
    got = loss_and_grads(both[: packed["num_queries"]], both[packed["num_queries"] :])
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=2e-6, rtol=1e-5)
    assert got[2].keys() == ref[2].keys() and ref[2]
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------ the model check
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_packing_supported_on_stock_models(arch):
    model, tok = setup(arch)
    model.train()
    ids = tok("the capital of france is paris fish water", add_special_tokens=False)["input_ids"]
    assert packing_supported(model, ids)
    assert model.training  # the mode is restored


def test_packing_refused_when_the_model_lets_packed_texts_see_each_other(monkeypatch):
    model, tok = setup()
    ids = tok("the capital of france is paris fish water", add_special_tokens=False)["input_ids"]
    # What a transformers release without packed-sequence masks does: one causal mask over the whole row.
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_supported(model, ids)
    with pytest.raises(ValueError, match="at least 4"):
        packing_supported(model, ids[:3])


# ------------------------------------------------------------------------------ GradCache over packed chunks
def test_grad_cache_over_packed_chunks_equals_the_plain_packed_step():
    model, tok = setup()
    model.train()
    gs = groups(4)
    plain = collate(tok, "llara", gs, packing=True)
    chunked = collate(tok, "llara", gs, packing=True, grad_cache_chunk=3)
    assert [p["normalize"].size(0) for p in chunked["query"]] == [3, 1]
    assert [p["normalize"].size(0) for p in chunked["passage"]] == [3, 3, 3, 3]

    model.zero_grad()
    both = torch.cat([embed(model, rows) for rows in plain["passes"]])
    loss = contrastive_loss(both[:4], both[4:], 0.05)
    loss.backward()
    ref = {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}
    model.zero_grad()
    cached = grad_cache_step(model, chunked, 0.05, chunk_size=3)
    assert cached.item() == pytest.approx(loss.item(), rel=1e-5)
    for n, w in model.named_parameters():
        if w.grad is not None:
            torch.testing.assert_close(w.grad, ref[n], atol=2e-6, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------ llara finetune
def test_finetune_with_and_without_packing_trains_the_same(tmp_path, caplog):
    from llara.modeling.encoder import Encoder

    base = Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False).save(tmp_path / "base")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": g.query, "pos": g.pos, "neg": g.neg}) + "\n" for g in groups(8)))
    logs = {}
    for name, flag in (("packed", "--packing"), ("padded", "--no-packing")):
        caplog.clear()
        out = tmp_path / name
        assert main(["finetune", "--model", str(base), "--data", str(train), "--output", str(out), "--batch-size", "4",
                     "--group-size", "3", "--max-query-length", "32", "--max-passage-length", "64", "--max-steps", "2",
                     "--lora-dropout", "0", "--grad-cache-chunk", "0", "--no-progress", "--no-export", flag]) == 0
        assert ("packing on" in caplog.text) == (name == "packed")
        logs[name] = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(logs["packed"], logs["padded"]):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
