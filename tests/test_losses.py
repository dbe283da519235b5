"""Losses against brute-force loops; target filtering on in-process tokenizers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llara.data.targets import bow_targets, target_filter
from llara.modeling.embed import gather_positions
from llara.training.losses import (
    bow_loss_authors,
    bow_loss_paper,
    causal_lm_loss,
    info_nce,
    llara_pretrain_loss,
    slot_logits,
)
from tiny import make_tokenizer

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- brute force


def loop_authors(logits: torch.Tensor, rows: list[list[int]]) -> float:
    """logits (B, K, V); rows: target ids per row (duplicates allowed)."""
    losses = []
    for b, ids in enumerate(rows):
        uniq = sorted(set(ids))
        if not uniq:
            continue
        V = logits.size(2)
        pooled = [max(float(logits[b, k, v]) for k in range(logits.size(1))) for v in range(V)]
        lse = math.log(sum(math.exp(z) for z in pooled))
        losses.append(-sum(pooled[t] - lse for t in uniq) / len(uniq))
    return sum(losses) / len(losses) if losses else 0.0


def loop_paper(emb: torch.Tensor, weight: torch.Tensor, rows: list[list[int]]) -> float:
    losses = []
    for b, ids in enumerate(rows):
        if not ids:
            continue
        z = [float(emb[b].double() @ weight[v].double()) for v in range(weight.size(0))]
        lse = math.log(sum(math.exp(x) for x in z))
        losses.append(-sum(z[t] - lse for t in ids) / len(ids))
    return sum(losses) / len(losses) if losses else 0.0


def random_rows(B: int, V: int, max_len: int, empty: tuple[int, ...] = ()) -> list[list[int]]:
    rows = []
    for b in range(B):
        n = 0 if b in empty else int(torch.randint(1, max_len + 1, ()))
        rows.append(torch.randint(0, V, (n,)).tolist())
    return rows


def pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, T) ids and mask, keeping duplicates, padding with a random valid id."""
    T = max(1, max(len(r) for r in rows))
    ids = torch.randint(0, 5, (len(rows), T))
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = True
    return ids, mask


# --------------------------------------------------------------------------- targets and logits


def test_bow_targets_unique_filtered_padded():
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    ids, mask = bow_targets([[5, 3, 5, 7, 7], [], [3, 3], torch.tensor([9, 1])], 10, keep, pad_id=0)
    assert ids.shape == mask.shape == (4, 2)
    assert ids[0].tolist() == [5, 7] and mask[0].tolist() == [True, True]
    assert not mask[1].any() and not mask[2].any()
    assert ids[3].tolist() == [9, 1]
    ids, mask = bow_targets([[5, 5, 2]], 10, unique=False)
    assert ids[mask].tolist() == [5, 5, 2]
    with pytest.raises(ValueError):
        bow_targets([[10]], 10)


def test_slot_logits_and_gather():
    B, L, K, H, V = 2, 7, 3, 5, 11
    hidden = torch.randn(B, L, H)
    weight, bias = torch.randn(V, H), torch.randn(V)
    pos = torch.tensor([[1, 4, 6], [0, 2, 3]])
    states = gather_positions(hidden, pos)
    assert torch.equal(states[1, 2], hidden[1, 3])
    out = slot_logits(states, weight, bias, softcap=2.0)
    assert out.shape == (B, K, V)
    for b in range(B):
        for k in range(K):
            ref = 2.0 * torch.tanh((weight @ hidden[b, pos[b, k]] + bias) / 2.0)
            torch.testing.assert_close(out[b, k], ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- bag-of-words losses


def test_bow_loss_authors_matches_loop():
    B, K, V = 5, 8, 40
    logits = torch.randn(B, K, V) * 3
    rows = random_rows(B, V, 12, empty=(2,))
    ids, mask = pad_rows(rows)  # duplicates kept: the loss dedupes itself
    got = bow_loss_authors(logits, ids, mask)
    assert got.dtype == torch.float32
    assert abs(got.item() - loop_authors(logits, rows)) < ATOL


def test_bow_loss_authors_ignores_duplicates():
    B, K, V = 3, 8, 30
    logits = torch.randn(B, K, V)
    rows = [[4, 4, 4, 9], [1, 2, 1, 2, 3], [7]]
    with_dups = bow_loss_authors(logits, *pad_rows(rows))
    deduped = bow_loss_authors(logits, *bow_targets(rows, V))
    once = bow_loss_authors(logits, *pad_rows([[4, 9], [1, 2, 3], [7]]))
    torch.testing.assert_close(with_dups, deduped, atol=ATOL, rtol=0)
    torch.testing.assert_close(with_dups, once, atol=ATOL, rtol=0)


def test_rows_without_targets_are_skipped():
    B, K, V = 4, 8, 25
    logits = torch.randn(B, K, V, requires_grad=True)
    rows = [[1, 2], [], [3, 4, 5], []]
    full = bow_loss_authors(logits, *bow_targets(rows, V))
    kept = bow_loss_authors(logits[[0, 2]], *bow_targets([rows[0], rows[2]], V))
    torch.testing.assert_close(full, kept, atol=ATOL, rtol=0)
    none = bow_loss_authors(logits, *bow_targets([[], [], [], []], V))
    assert torch.isfinite(none) and none.item() == 0.0
    none.backward()
    assert torch.isfinite(logits.grad).all()
    emb, weight = torch.randn(B, 6), torch.randn(V, 6)
    full_p = bow_loss_paper(emb, weight, *bow_targets(rows, V, unique=False))
    kept_p = bow_loss_paper(emb[[0, 2]], weight, *bow_targets([rows[0], rows[2]], V, unique=False))
    torch.testing.assert_close(full_p, kept_p, atol=ATOL, rtol=0)


def test_bow_loss_paper_matches_loop():
    B, H, V = 4, 6, 30
    emb, weight = torch.randn(B, H), torch.randn(V, H)
    rows = random_rows(B, V, 9, empty=(1,))
    rows[0] = rows[0] + rows[0][:2]  # multiplicity counts in the paper's form
    got = bow_loss_paper(emb, weight, *pad_rows(rows))
    assert abs(got.item() - loop_paper(emb, weight, rows)) < ATOL
    # with unique targets and one slot, the two forms agree
    ids, mask = bow_targets(rows, V)
    a = bow_loss_authors(slot_logits(emb[:, None], weight), ids, mask)
    p = bow_loss_paper(emb, weight, ids, mask)
    torch.testing.assert_close(a, p, atol=ATOL, rtol=0)


def test_bow_gradients_reach_weight_and_hidden():
    B, K, H, V = 3, 8, 6, 20
    hidden = torch.randn(B, K, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids, mask = bow_targets(random_rows(B, V, 5), V)
    bow_loss_authors(slot_logits(hidden, weight), ids, mask).backward()
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    emb = torch.randn(B, H, requires_grad=True)
    weight.grad = None
    bow_loss_paper(emb, weight, ids, mask).backward()
    assert emb.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_bow_loss_bf16_logits_reduce_in_fp32():
    logits = torch.randn(2, 8, 50) * 5
    ids, mask = bow_targets([[1, 2, 3], [4]], 50)
    ref = bow_loss_authors(logits, ids, mask)
    low = bow_loss_authors(logits.bfloat16(), ids, mask)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.1


# --------------------------------------------------------------------------- causal LM loss


def lm_inputs(B=3, L=12, H=8, V=23):
    hidden = torch.randn(B, L, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    input_ids = torch.randint(0, V, (B, L))
    text_mask = torch.zeros(B, L, dtype=torch.bool)
    text_mask[0, 2:9] = True
    text_mask[1, 0:5] = True  # position 0 is never a target
    text_mask[2, 4:12] = True
    return hidden, weight, input_ids, text_mask


def reference_lm(hidden, weight, input_ids, text_mask):
    logits = hidden @ weight.T  # (B, L, V): fine at test size
    labels = input_ids.masked_fill(~text_mask, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, weight.size(0)), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 10_000])
@pytest.mark.parametrize("recompute", [True, False])
def test_causal_lm_loss_matches_cross_entropy(chunk_size, recompute):
    hidden, weight, input_ids, text_mask = lm_inputs()
    ref = reference_lm(hidden, weight, input_ids, text_mask)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    got = causal_lm_loss(hidden, input_ids, text_mask, weight, chunk_size=chunk_size, recompute=recompute)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    g_got = torch.autograd.grad(got, (hidden, weight))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert g_got[0].abs().sum() > 0 and g_got[1].abs().sum() > 0


def test_causal_lm_loss_recompute_saves_no_logits():
    B, L, H, V = 2, 64, 8, 500
    hidden = torch.randn(B, L, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    input_ids = torch.randint(0, V, (B, L))
    text_mask = torch.ones(B, L, dtype=torch.bool)

    def saved_numel(recompute: bool) -> int:
        sizes: list[int] = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(hidden, input_ids, text_mask, weight, chunk_size=16, recompute=recompute)
        return max(sizes)

    assert saved_numel(False) >= 16 * V  # each chunk's (16, V) logits kept for backward
    assert saved_numel(True) < 16 * V  # only inputs kept; logits recomputed chunk by chunk


def test_causal_lm_loss_without_text_is_zero():
    hidden, weight, input_ids, _ = lm_inputs()
    loss = causal_lm_loss(hidden, input_ids, torch.zeros_like(input_ids, dtype=torch.bool), weight)
    assert loss.item() == 0.0
    loss.backward()


# --------------------------------------------------------------------------- pretraining objective


def pretrain_inputs(B=3, L=30, H=8, V=40, K=8):
    hidden, weight, input_ids, _ = lm_inputs(B, L, H, V)
    text_mask = torch.zeros(B, L, dtype=torch.bool)
    text_mask[:, 1:10] = True
    self_pos = torch.arange(12, 12 + K).expand(B, K)
    next_pos = torch.arange(21, 21 + K).expand(B, K)
    self_t = bow_targets([input_ids[b, 1:10].tolist() for b in range(B)], V)
    next_t = bow_targets(random_rows(B, V, 6, empty=(1,)), V)
    return dict(
        hidden=hidden,
        lm_head_weight=weight,
        self_positions=self_pos,
        self_targets=self_t[0],
        self_target_mask=self_t[1],
        next_positions=next_pos,
        next_targets=next_t[0],
        next_target_mask=next_t[1],
        input_ids=input_ids,
        text_mask=text_mask,
    )


def test_llara_pretrain_loss_combines_components():
    kw = pretrain_inputs()
    h, w = kw["hidden"], kw["lm_head_weight"]
    ebae = bow_loss_authors(slot_logits(gather_positions(h, kw["self_positions"]), w), kw["self_targets"], kw["self_target_mask"])
    ebar = bow_loss_authors(slot_logits(gather_positions(h, kw["next_positions"]), w), kw["next_targets"], kw["next_target_mask"])
    lm = reference_lm(h, w, kw["input_ids"], kw["text_mask"])

    out = llara_pretrain_loss(**kw, chunk_size=5)
    assert set(out) >= {"loss", "ebae", "ebar", "lm"}
    torch.testing.assert_close(out["ebae"], ebae.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["ebar"], ebar.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["lm"], lm.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["loss"], 0.1 * (ebae + ebar) / 2 + lm, atol=ATOL, rtol=0)
    out["loss"].backward()
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0

    only_ebae = llara_pretrain_loss(**kw, use_ebar=False, lm_weight=0.0, bow_scale=1.0)
    torch.testing.assert_close(only_ebae["loss"], ebae, atol=ATOL, rtol=0)
    assert only_ebae["ebar"].item() == 0.0 and only_ebae["lm"].item() == 0.0
    only_ebar = llara_pretrain_loss(**kw, use_ebae=False, lm_weight=2.0)
    torch.testing.assert_close(only_ebar["loss"], 0.1 * ebar + 2.0 * lm, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        llara_pretrain_loss(**kw, use_ebae=False, use_ebar=False, lm_weight=0.0)


def test_llara_pretrain_loss_paper_form():
    kw = pretrain_inputs(K=1)
    h, w = kw["hidden"], kw["lm_head_weight"]
    ebae = bow_loss_paper(h[:, 12], w, kw["self_targets"], kw["self_target_mask"])
    ebar = bow_loss_paper(h[:, 21], w, kw["next_targets"], kw["next_target_mask"])
    out = llara_pretrain_loss(**kw, form="paper", bow_scale=1.0, bow_reduce="sum", lm_weight=0.0)
    torch.testing.assert_close(out["loss"], ebae + ebar, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- InfoNCE


def loop_info_nce(q, d, temperature, group_size, offset=0):
    total = 0.0
    for i in range(q.size(0)):
        s = [float(q[i].double() @ d[j].double()) / temperature for j in range(d.size(0))]
        m = max(s)
        p = [math.exp(x - m) for x in s]
        total += -math.log(p[offset + i * group_size] / sum(p))
    return total / q.size(0)


def test_info_nce_matches_loop():
    B, G, H = 4, 3, 16
    q = F.normalize(torch.randn(B, H), dim=-1)
    d = F.normalize(torch.randn(B * G, H), dim=-1)
    got = info_nce(q, d, temperature=0.05)
    assert abs(got.item() - loop_info_nce(q, d, 0.05, G)) < ATOL
    with pytest.raises(ValueError):
        info_nce(q, d[:-1])


def test_info_nce_offset_for_gathered_passages():
    B, G, H, world, rank = 3, 2, 8, 3, 1
    q = F.normalize(torch.randn(B, H), dim=-1)
    d_all = F.normalize(torch.randn(world * B * G, H), dim=-1)
    off = rank * B * G
    got = info_nce(q, d_all, temperature=0.1, group_size=G, offset=off)
    assert abs(got.item() - loop_info_nce(q, d_all, 0.1, G, off)) < ATOL
    with pytest.raises(ValueError):
        info_nce(q, d_all, offset=off)
    with pytest.raises(ValueError):
        info_nce(q, d_all, group_size=G, offset=world * B * G)


def test_info_nce_gradients():
    q = torch.randn(2, 8, requires_grad=True)
    d = torch.randn(6, 8, requires_grad=True)
    info_nce(q, d).backward()
    assert q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0


# --------------------------------------------------------------------------- target filter


def test_target_filter_tiny_tokenizer():
    tok = make_tokenizer(with_slots=True)
    keep = target_filter(tok, vocab_size=len(tok) + 11)
    assert keep.dtype == torch.bool and keep.shape == (len(tok) + 11,)
    ids = tok.convert_tokens_to_ids
    for w in ["the", "a", "of", "is", ",", ".", '"', "(", "-"]:
        assert not keep[ids(w)], w
    for i in tok.all_special_ids + [ids(f"<s{k}>") for k in range(1, 17)]:
        assert not keep[i]
    for w in ["retrieval", "paris", "water", "embedding", "brain", "7"]:
        assert keep[ids(w)], w
    assert not keep[len(tok) :].any()
    # usable as keep[target_ids]
    enc = torch.tensor(tok("the retrieval , of paris")["input_ids"])
    assert tok.convert_ids_to_tokens(enc[keep[enc]].tolist()) == ["retrieval", "paris"]
    # custom list, switches
    keep2 = target_filter(tok, stopwords=["water"], drop_punctuation=False)
    assert not keep2[ids("water")] and keep2[ids("the")] and keep2[ids(",")] and not keep2[ids("<s>")]


TEXT = (
    "The retrieval model reads the passage. The query and the document are encoded, "
    "and the embedding of the passage is compared with the embedding of the query. "
    "Paris is the capital of France; the river flows through the city. "
) * 20


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] + ["the query", "the passage"] * 20, trainer)  # bare 'the' at a start
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def test_target_filter_byte_level_bpe(bpe_tokenizer):
    tok = bpe_tokenizer
    keep = target_filter(tok)
    vocab = tok.get_vocab()
    for piece in ["Ġthe", "The", "ĠThe", "Ġof", "Ġand", "Ġis", ",", ".", ";"]:
        assert piece in vocab, piece
        assert not keep[vocab[piece]], piece
    # unmarked short stopwords are mostly sub-word pieces ('encod|ed') and bytes: kept by default
    for piece in ["the", "ed", "er", "a", "e"]:
        assert piece in vocab, piece
        assert keep[vocab[piece]], piece
    strict = target_filter(tok, bare_min_len=1)
    assert not strict[vocab["the"]] and not strict[vocab["ed"]] and not strict[vocab["Ġthe"]]
    for piece in ["Ġretrieval", "Ġpassage", "Ġembedding", "ĠParis", "ĠFrance"]:
        assert piece in vocab, piece
        assert keep[vocab[piece]], piece
    assert not keep[vocab["<|endoftext|>"]] and not keep[vocab["<|pad|>"]]
    # a typical EBAE target: only content tokens survive
    enc = tok(" the embedding of the query, and Paris.", add_special_tokens=False)["input_ids"]
    kept = [tok.convert_ids_to_tokens(i) for i in enc if keep[i]]
    assert "Ġthe" not in kept and "," not in kept and "." not in kept
    assert "Ġembedding" in kept and "ĠParis" in kept


def test_target_filter_sentencepiece_style_bpe():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    keep = target_filter(fast)
    vocab = fast.get_vocab()
    for piece in ["▁the", "▁The", "▁of", "▁and", ",", ".", "<unk>", "<s>", "</s>"]:
        assert piece in vocab, piece
        assert not keep[vocab[piece]], piece
    for piece in ["▁retrieval", "▁passage", "▁Paris"]:
        assert piece in vocab, piece
        assert keep[vocab[piece]], piece
