"""One joint SELF + NEXT pass on stock Hugging Face models equals two standalone prompted passes."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from llara.modeling.arch import get_arch, joint_forward_kwargs, single_forward_kwargs
from llara.modeling.embed import gather_positions
from llara.modeling.masks import additive_mask, build_joint_batch, build_single_batch, sliding_window_blocked
from tiny import make_model, make_tokenizer

ATOL = 1e-5
CASES = [
    (arch, attn)
    for arch in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
    for attn in ("eager", "sdpa")
    if not (arch == "gemma2" and attn == "sdpa")  # the Gemma2 class refuses sdpa (soft-capping)
]
# Tiny windows so that the sliding layers really cut the context of the slots.
WINDOWED = {
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
}
TEXTS = [
    '" paris is the capital of france',
    '" the river',
    '" dense retrieval with a large language model : the query and the passage are encoded as '
    "one vector each , then the index is searched",
    '" blood cell study',
]


@functools.lru_cache(maxsize=None)
def tokenizer():
    return make_tokenizer(with_slots=True)


@functools.lru_cache(maxsize=None)
def model(arch: str, attn: str, windowed: bool = False):
    kw = WINDOWED[arch] if windowed else {}
    return make_model(arch, vocab_size=len(tokenizer()) + 3, attn=attn, **kw)


def suffix(text: str, first_slot: int) -> tuple[list[int], list[int]]:
    """Suffix ids and the positions of its slot tokens, found by the tokenizer, not hard-coded."""
    tok = tokenizer()
    slots = "".join(f"<s{i}>" for i in range(first_slot, first_slot + 8))
    ids = tok(text + slots, add_special_tokens=False).input_ids
    slot_ids = set(tok.convert_tokens_to_ids([f"<s{i}>" for i in range(first_slot, first_slot + 8)]))
    return ids, [j for j, t in enumerate(ids) if t in slot_ids]


SELF = suffix('", summarize the above passage within eight words: ', 1)
NEXT = suffix('", predict the following passage within eight words: ', 9)


def texts(which=TEXTS) -> list[list[int]]:
    return [tokenizer()(t).input_ids for t in which]


def pad_id() -> int:
    return tokenizer().pad_token_id


def joint_hidden(m, ids, **kw):
    batch = build_joint_batch(ids, SELF[0], NEXT[0], pad_id(), self_slot_index=SELF[1], next_slot_index=NEXT[1], **kw)
    with torch.no_grad():
        out = m.model(**joint_forward_kwargs(m, batch)).last_hidden_state
    return batch, out


def single_hidden(m, ids, which):
    batch = build_single_batch(ids, which[0], pad_id(), slot_index=which[1])
    with torch.no_grad():
        out = m.model(**single_forward_kwargs(m, batch)).last_hidden_state
    return batch, out


def assert_joint_equals_standalone(m):
    ids = texts()
    jb, jh = joint_hidden(m, ids)
    sb, sh = single_hidden(m, ids, SELF)
    nb, nh = single_hidden(m, ids, NEXT)
    torch.testing.assert_close(gather_positions(jh, jb.self_slots), gather_positions(sh, sb.slots), atol=ATOL, rtol=0)
    torch.testing.assert_close(gather_positions(jh, jb.next_slots), gather_positions(nh, nb.slots), atol=ATOL, rtol=0)
    S, N = len(SELF[0]), len(NEXT[0])
    for i, t in enumerate(ids):
        T = len(t)
        torch.testing.assert_close(jh[i, :T], sh[i, :T], atol=ATOL, rtol=0)  # text tokens
        torch.testing.assert_close(jh[i, T : T + S], sh[i, T : T + S], atol=ATOL, rtol=0)  # whole SELF suffix
        torch.testing.assert_close(jh[i, T + S : T + S + N], nh[i, T : T + N], atol=ATOL, rtol=0)  # whole NEXT suffix
    return jb, jh


@pytest.mark.parametrize("arch,attn", CASES)
def test_joint_equals_standalone_passes(arch, attn):
    m = model(arch, attn)
    jb, _ = assert_joint_equals_standalone(m)
    assert len(set(jb.lengths.tolist())) > 1 and jb.input_ids.size(1) > max(jb.lengths)  # padding present


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_sliding_windows_follow_position_ids(arch):
    m = model(arch, "eager", windowed=True)
    assert get_arch(arch).sliding in ("config", "layer_types")
    assert_joint_equals_standalone(m)
    # Negative control: one plain window-less tensor (what a naive caller would pass) must differ,
    # so the check above really exercises the windows.
    ids = texts()
    jb, _ = joint_hidden(m, ids)
    with torch.no_grad():
        naive = m.model(input_ids=jb.input_ids, attention_mask=jb.attention_mask, position_ids=jb.position_ids)
        good = m.model(**joint_forward_kwargs(m, jb))
    assert not torch.allclose(
        gather_positions(naive.last_hidden_state, jb.next_slots),
        gather_positions(good.last_hidden_state, jb.next_slots),
        atol=1e-3,
    )


def test_causal_lm_wrapper_passes_the_mask_through():
    m = model("llama", "sdpa")
    ids = texts()
    jb = build_joint_batch(ids, SELF[0], NEXT[0], pad_id(), self_slot_index=SELF[1], next_slot_index=NEXT[1])
    nb = build_single_batch(ids, NEXT[0], pad_id(), slot_index=NEXT[1])
    with torch.no_grad():
        joint = m(**joint_forward_kwargs(m, jb)).logits
        alone = m(**single_forward_kwargs(m, nb)).logits
    torch.testing.assert_close(
        gather_positions(joint, jb.next_slots), gather_positions(alone, nb.slots), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "gemma3_text"])
def test_eager_equals_sdpa(arch):
    ids = texts()
    jb, eager = joint_hidden(model(arch, "eager"), ids)
    _, sdpa = joint_hidden(model(arch, "sdpa"), ids)
    valid = jb.valid
    torch.testing.assert_close(eager[valid], sdpa[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("gemma2", "eager")])
def test_independent_of_batch_neighbours(arch, attn):
    m = model(arch, attn)
    ids = texts()
    jb, full = joint_hidden(m, ids)
    order = [2, 0, 3, 1]
    pb, perm = joint_hidden(m, [ids[k] for k in order], pad_to_multiple_of=16)
    for row, k in enumerate(order):
        alone_b, alone = joint_hidden(m, [ids[k]], pad_to_multiple_of=None)  # no padding at all
        n = int(jb.lengths[k])
        torch.testing.assert_close(full[k, :n], alone[0, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(perm[row, :n], alone[0, :n], atol=ATOL, rtol=0)
        assert torch.equal(pb.self_slots[row], jb.self_slots[k]) and torch.equal(alone_b.next_slots[0], jb.next_slots[k])


def test_mask_blocks_exactly_next_to_self():
    S, N = len(SELF[0]), len(NEXT[0])
    ids = [[1, 7, 8], [1, 7, 8, 9, 10, 11, 12], []]
    jb = build_joint_batch(ids, SELF[0], NEXT[0], 0, self_slot_index=SELF[1], next_slot_index=NEXT[1])
    B, L = jb.input_ids.shape
    assert L % 8 == 0 and jb.attention_mask.shape == (B, 1, L, L) and jb.attention_mask.dtype == torch.float32
    mask = jb.attention_mask[:, 0]
    assert torch.isfinite(mask).all() and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    for i, t in enumerate(ids):
        T, n = len(t), len(t) + S + N
        assert jb.lengths[i] == n
        assert jb.input_ids[i, :n].tolist() == t + SELF[0] + NEXT[0] and (jb.input_ids[i, n:] == 0).all()
        assert jb.position_ids[i, :n].tolist() == list(range(T + S)) + list(range(T, T + N))
        assert jb.text_mask[i].tolist() == [True] * T + [False] * (L - T)
        assert jb.input_ids[i, jb.self_slots[i]].tolist() == [SELF[0][j] for j in SELF[1]]
        assert jb.input_ids[i, jb.next_slots[i]].tolist() == [NEXT[0][j] for j in NEXT[1]]
        for q in range(L):
            for k in range(L):
                expected = k <= q and k < n and not (T + S <= q < n and T <= k < T + S)
                assert (mask[i, q, k] == 0) == expected, (i, q, k)
            assert (mask[i, q] == 0).any()
    # exactly the NEXT->SELF block differs from a plain causal padding mask
    plain = additive_mask(jb.valid, None, torch.float32)[:, 0]
    diff = (plain == 0) & (mask != 0)
    assert torch.equal(diff, jb.blocked & (plain == 0))
    assert int(diff.sum()) == len(ids) * N * S


def test_additive_mask_rows_never_empty_and_dtype_safe():
    valid = torch.tensor([[False, True, True, False]])  # a left-padded row: query 0 has no valid key
    blocked = torch.zeros(1, 4, 4, dtype=torch.bool)
    blocked[0, 2, :] = True  # a query that may see nothing
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = additive_mask(valid, blocked, dtype)[0, 0]
        assert m.dtype == dtype and torch.isfinite(m).all()
        assert ((m == 0).sum(-1) >= 1).all()
        assert m[0, 0] == 0 and m[2, 2] == 0 and m[2, 1] != 0 and m[1, 1] == 0 and m[1, 0] != 0


def test_sliding_window_blocked_uses_positions():
    pos = torch.tensor([[0, 1, 2, 3, 2, 3]])
    blocked = sliding_window_blocked(pos, 2)[0]
    assert blocked[3, 1] and not blocked[3, 2] and not blocked[5, 3] and blocked[5, 1]


def test_forward_kwargs_in_model_dtype():
    m = make_model("qwen2", attn="sdpa", **WINDOWED["qwen2"]).to(torch.bfloat16)
    jb = build_joint_batch(texts()[:2], SELF[0], NEXT[0], pad_id(), self_slot_index=SELF[1], next_slot_index=NEXT[1])
    kw = joint_forward_kwargs(m, jb)
    assert set(kw["attention_mask"]) == {"full_attention", "sliding_attention"}
    for mask in kw["attention_mask"].values():
        assert mask.dtype == torch.bfloat16 and torch.isfinite(mask).all()
    with torch.no_grad():
        assert torch.isfinite(m.model(**kw).last_hidden_state).all()


def test_unsupported_setups_are_refused():
    jb = build_joint_batch([[1, 2]], SELF[0], NEXT[0], 0, self_slot_index=SELF[1], next_slot_index=NEXT[1])
    param = torch.nn.Parameter(torch.zeros(1))

    def fake(model_type, attn, **cfg):
        return SimpleNamespace(
            config=SimpleNamespace(model_type=model_type, _attn_implementation=attn, **cfg),
            parameters=lambda: iter([param]),
        )

    with pytest.raises(KeyError, match="no LLaRA architecture"):
        joint_forward_kwargs(fake("not_a_model", "sdpa"), jb)
    with pytest.raises(ValueError, match="flash_attention_2"):
        joint_forward_kwargs(fake("llama", "flash_attention_2"), jb)
    with pytest.raises(ValueError, match="eager"):
        joint_forward_kwargs(fake("gemma3_text", "sdpa", attn_logit_softcapping=50.0), jb)
    with pytest.raises(ValueError, match="bidirectional"):
        joint_forward_kwargs(fake("gemma3_text", "eager", use_bidirectional_attention=True), jb)
    with pytest.raises(ValueError, match="outside"):
        build_joint_batch([[1]], SELF[0], NEXT[0], 0, self_slot_index=[99], next_slot_index=NEXT[1])


@pytest.mark.parametrize("arch", sorted({a for a, attn in CASES if attn == "sdpa"}))
def test_fp32_attention_of_cpu_bf16_training_keeps_the_joint_mask(arch):
    """bf16 training on a CPU may run the attention in fp32 (``precision.cpu_fp32_attention``): the
    joint pass's 4D mask then reaches the fp32 kernel cast up, and the slot states stay within bf16
    rounding of the fp32 pass; a mask lost on the way would move them by far more. (Without tiny
    sliding windows, which would hide a lost mask from the slots.)"""
    from llara.modeling.precision import cpu_fp32_attention

    m = model(arch, "sdpa")
    ids = texts()
    jb, ref = joint_hidden(m, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_fp32_attention():
        _, low = joint_hidden(m, ids)
    slots = torch.cat([jb.self_slots, jb.next_slots], 1)
    got, want = gather_positions(low.float(), slots), gather_positions(ref, slots)
    err = (got - want).abs().max()
    assert err < 0.02 * want.abs().max()  # measured 0.1-1.1% (gemma3_text's the most)
    # Negative control: the same ids with a plain causal mask and positions move the slots far more.
    plain = m.model(input_ids=jb.input_ids).last_hidden_state.detach()
    assert (gather_positions(plain, slots) - want).abs().max() > 5 * err
