"""The last layer's position-wise work at the read positions only (llara.modeling.read_rows): the read
states and the gradients equal the full pass's on every registered family, the last layer's MLP and
output projection really see the read rows only, nothing is sliced under gradient checkpointing, the
hooks never outlive the call, and the batches carry the positions their pooling reads."""
import pytest
import torch
from tiny import make_model, make_tokenizer

from llara.modeling.embed import base_model, embed, hidden_states, pack
from llara.modeling.packing import pack_texts
from llara.modeling import read_rows as read_rows_module
from llara.modeling.read_rows import _pays, flat_positions, read_rows, rows_read_by
from llara.prompts import encode_side, get_template
from llara.training.lora import apply_lora

ARCHS = [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("gemma", "sdpa"), ("gemma2", "eager"),
         ("gemma3_text", "sdpa")]


@pytest.fixture(autouse=True)
def slice_every_module(monkeypatch):
    """The tiny models' modules are too small for slicing to pay (read_rows._pays): slice them all,
    to check the mechanics; test_slicing_only_where_the_products_saved_outweigh_the_copies checks the rule."""
    monkeypatch.setattr(read_rows_module, "COPY_COST", 0)


def packed_batch(vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = []
    for n in (9, 5, 12, 3, 7, 12, 4):  # rows 12, 12, 9+3, 7+5 and 4 with a tail of 8
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        texts.append((ids, [n - 2, n - 1], True))  # each text pools its last two positions
    return pack_texts(texts, pad_id=3, multiple=4)


def rows_seen(model):
    """Records the rows (positions) the position-wise modules of the first and last layers compute."""
    seen = {}
    for i in (0, -1):
        layer = base_model(model).layers[i]
        for name, m in (("mlp", layer.mlp), ("o_proj", layer.self_attn.o_proj)):
            rows = seen.setdefault(f"{name}{i}", [])
            m.register_forward_hook(lambda m, a, o, rows=rows: rows.append(a[0].shape[:-1].numel()))
    return seen


@pytest.mark.parametrize("arch,attn", ARCHS)
def test_read_states_equal_the_full_pass_and_only_read_rows_are_computed(arch, attn):
    model = make_model(arch, vocab_size=100, attn=attn)
    b = packed_batch()
    seen = rows_seen(model)
    with torch.no_grad():
        full = hidden_states(model, b["input_ids"], position_ids=b["position_ids"])
        part = hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"], live=b["live"])
    read, live, positions = b["read"], b["live"], b["input_ids"].numel()
    assert (len(read), len(live), positions) == (14, 52, 60)
    assert seen == {"mlp0": [positions, len(live)], "o_proj0": [positions, len(live)],
                    "mlp-1": [positions, len(read)], "o_proj-1": [positions, len(read)]}
    flat_full, flat_part = full.reshape(positions, -1), part.reshape(positions, -1)
    torch.testing.assert_close(flat_part[read], flat_full[read], rtol=1e-5, atol=1e-6)
    unread = torch.ones(positions, dtype=torch.bool)
    unread[read] = False
    assert not torch.allclose(flat_part[unread], flat_full[unread])  # not the model's states there
    # the padded path (the attention mask hides the pad, on the right): its pad rows are not live either
    ids, mask = b["input_ids"], torch.ones_like(b["input_ids"])
    mask[-1, 4:] = 0  # the last row's tail
    assert flat_positions(mask).tolist() == live.tolist()
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(model, ids, mask, read=read, live=live).reshape(positions, -1)[read],
                                   hidden_states(model, ids, mask).reshape(positions, -1)[read], rtol=1e-5, atol=1e-6)
    assert seen["mlp0"][-2:] == [len(live), positions] and seen["mlp-1"][-2:] == [len(read), positions]


def test_gradients_through_the_read_rows_equal_the_full_pass():
    model = apply_lora(make_model("llama", vocab_size=100), r=4, alpha=8, dropout=0.0,
                       trainable_token_ids=[5, 6]).train()
    b = packed_batch()
    grads = []
    for sliced in (False, True):
        batch = b if sliced else {k: v for k, v in b.items() if k not in ("read", "live")}
        e = embed(model, batch)
        (e.square().sum() + e[:, 0].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_nothing_is_sliced_under_gradient_checkpointing():
    model = make_model("llama", vocab_size=100)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    b = packed_batch()
    seen = rows_seen(model)
    out = hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"], live=b["live"])
    out.reshape(-1, out.shape[-1])[b["read"]].sum().backward()  # recomputes the layers in backward
    positions = b["input_ids"].numel()
    assert set(seen["mlp-1"]) == set(seen["mlp0"]) == {positions}
    with torch.no_grad():  # nor without gradients (GradCache's first pass must match its second)
        hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"], live=b["live"])
    assert set(seen["mlp-1"]) == set(seen["mlp0"]) == {positions}
    model.eval()  # checkpointing applies in training only
    with torch.no_grad():
        hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"], live=b["live"])
    assert (seen["mlp0"][-1], seen["mlp-1"][-1]) == (len(b["live"]), len(b["read"]))


def test_hooks_are_removed_after_the_call_even_on_an_error():
    model = make_model("llama", vocab_size=100)
    base, b = base_model(model), packed_batch()
    layer = base.layers[-1]
    with pytest.raises(RuntimeError, match="boom"):
        with read_rows(base, b["input_ids"].numel(), b["read"], b["live"]):
            assert layer.mlp._forward_hooks and layer.mlp._forward_pre_hooks and base.layers[0].mlp._forward_hooks
            raise RuntimeError("boom")
    assert not layer.mlp._forward_hooks and not layer.mlp._forward_pre_hooks
    assert not layer.self_attn.o_proj._forward_hooks and not base.layers[0].mlp._forward_hooks


def test_a_listed_module_that_returns_no_tensor_is_an_error(monkeypatch):
    model = make_model("llama", vocab_size=100)
    b = packed_batch()
    monkeypatch.setattr(base_model(model).layers[-1].mlp, "forward", lambda x: (x, None))
    with pytest.raises(TypeError, match="position_wise_modules"), torch.no_grad():
        hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"])


def test_batches_carry_the_positions_their_pooling_reads():
    index = torch.tensor([[7, 3, 0], [3, 9, 0]])
    weight = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert rows_read_by(index, weight).tolist() == [3, 7, 9]  # sorted, unique, padding entries left out
    b = packed_batch()
    assert b["read"].tolist() == rows_read_by(b["pool_index"], b["pool_weight"]).tolist()
    assert len(b["read"]) == 14 and b["live"].tolist() == torch.nonzero(b["position_ids"].view(-1) >= 0).squeeze(1)[
        :52].tolist()
    # padded batches (the Encoder's): every position any template side pools
    tok = make_tokenizer()
    sides = [encode_side(tok, get_template("eos").passage), encode_side(tok, get_template("mean").passage)]
    built = [sides[0].build(tok.encode(t, add_special_tokens=False), 32) for t in ("the capital of france", "paris")]
    p = pack(built, sides, pad_id=3, multiple=8)
    expect = torch.nonzero(p.pool.ne(0).any(0).reshape(-1)).squeeze(1)
    assert p.read.tolist() == expect.tolist() and 0 < len(p.read) < p.input_ids.numel()
    assert p.live.tolist() == torch.nonzero(p.attention_mask.view(-1)).squeeze(1).tolist() and len(p.live) < p.input_ids.numel()
    assert p.to("cpu").read.tolist() == p.read.tolist() and p.to("cpu").live.tolist() == p.live.tolist()


def test_slicing_only_where_the_products_saved_outweigh_the_copies(monkeypatch):
    class MLP(torch.nn.Module):  # the embedded model's shapes (SmolLM2-135M), no memory (meta device)
        def __init__(self):
            super().__init__()
            self.up, self.gate = (torch.nn.Linear(576, 1536, bias=False, device="meta") for _ in range(2))
            self.down = torch.nn.Linear(1536, 576, bias=False, device="meta")
    monkeypatch.undo()  # the shipped COPY_COST, not the fixture's 0
    mlp, o_proj = MLP(), torch.nn.Linear(576, 576, bias=False, device="meta")
    positions, read, pad = 1920, 192, 92  # the recipe's packed step: 8 slots of 24 texts read, 92 pad
    assert _pays(mlp, positions - read, positions, 576) and _pays(o_proj, positions - read, positions, 576)
    assert _pays(mlp, pad, positions, 576) and not _pays(o_proj, pad, positions, 576)
    assert not _pays(mlp, 0, positions, 576) and not _pays(mlp, 30, positions, 576)  # 1.6%: under break-even
    # and in a forward: with the cost rule the tiny model's modules stay whole but the last MLP
    model = make_model("llama", vocab_size=100)
    b, seen = packed_batch(), rows_seen(model)
    with torch.no_grad():
        hidden_states(model, b["input_ids"], position_ids=b["position_ids"], read=b["read"], live=b["live"])
    positions = b["input_ids"].numel()
    assert seen == {"mlp0": [positions], "o_proj0": [positions], "mlp-1": [len(b["read"])], "o_proj-1": [positions]}
