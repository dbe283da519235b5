"""The fused adapter path: apply_lora swaps peft's LoRA ``Linear`` for one whose adapter product
accumulates into the base projection's output (``_AddAdapter``), and joins the adapters of projections
that read one input (q, k, v; gate, up) into a group with one dropout mask and one A product
(``_InputGroup``). Same values and gradients as peft's own forward given those masks, no pass of its
own over the projection's output, only the input, the 1-byte mask and the rank-r product kept for
backward, and peft's forward wherever the fused path does not apply."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import llara.training.lora_dropout as dropout
import llara.training.lora_layers as lora
from llara.training.lora import apply_lora

peft_layer = pytest.importorskip("peft.tuners.lora.layer")


_ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}  # qwen2: q, k and v have a bias


def _model(p: float, seed: int = 0, arch: str = "llama"):
    torch.manual_seed(seed)
    config_class, model_class = _ARCHS[arch]
    cfg = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100)
    model = apply_lora(model_class(cfg), r=4, alpha=8, dropout=p, trainable_token_ids=[5, 6])
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters something to add
            nn.init.normal_(param, std=0.1)
    return model.train()


def _adapters(model):
    return [m for m in model.modules() if isinstance(m, peft_layer.Linear)]


def _step(model, ids, *, fused: bool, autocast: bool = False, monkeypatch=None):
    cls = lora._fused_lora_linear_class()
    if not fused:
        monkeypatch.setattr(cls, "_fused_adapter", lambda self, args, kwargs: None)
    torch.manual_seed(1)  # the same dropout draws on both paths
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    out.float().pow(2).mean().backward()
    if not fused:
        monkeypatch.undo()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach().float(), grads


# peft draws one mask per adapter in a LLaMA layer's call order (q, k, v, o, gate, up, down); the fused
# path one per input: q/k/v, o, gate/up, down. Which fused draw each of peft's replays:
_PEFT_TO_FUSED = [0, 0, 0, 1, 2, 2, 3]


def test_apply_lora_swaps_every_adapted_projection():
    model = _model(0.1)
    layers = _adapters(model)
    assert len(layers) == 2 * 7
    assert all(type(m) is lora._fused_lora_linear_class() for m in layers)
    assert all(m._fused_adapter((), {}) is not None for m in layers)
    for block in model.base_model.model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        groups = {n: m.__dict__.get("_llara_input_group") for n, m in (
            ("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
            ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
        assert groups["q"] is groups["k"] is groups["v"] and groups["q"].members == [attn.q_proj, attn.k_proj, attn.v_proj]
        assert groups["gate"] is groups["up"] and groups["gate"] is not groups["q"]
        assert groups["o"] is None and groups["down"] is None


@pytest.mark.parametrize(("p", "arch"), [(0.0, "llama"), (0.1, "llama"), (0.1, "mistral"), (0.1, "qwen2")])
def test_same_values_and_gradients_as_peft_given_the_shared_masks(p, arch, monkeypatch):
    """In float64 (the two paths sum in different orders, which fp32 rounds differently): the fused path
    equals peft's forward run with the masks the fused path drew, q/k/v and gate/up sharing theirs."""
    model = _model(p, arch=arch).double()
    ids = torch.randint(0, 100, (3, 7))
    drawn = []

    def record(x, q):
        drawn.append(real(x, q))
        return drawn[-1]

    real = dropout.cpu_keep_mask
    monkeypatch.setattr(dropout, "cpu_keep_mask", record)
    out, grads = _step(model, ids, fused=True)
    monkeypatch.undo()
    assert len(drawn) == (2 * 4 if p else 0)  # four masks per layer, not seven
    replay = iter([drawn[4 * (i // 7) + _PEFT_TO_FUSED[i % 7]] for i in range(2 * 7)] if p else [])
    with monkeypatch.context() as m:
        m.setattr(dropout, "cpu_keep_mask", lambda x, q: next(replay))
        ref_out, ref_grads = _step(model, ids, fused=False, monkeypatch=monkeypatch)
    assert next(replay, None) is None  # peft drew (and was given) all fourteen
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, msg=name)
    if p:  # dropout really ran: a step without it differs
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float(), out)


def test_fp32_within_rounding_of_peft(monkeypatch):
    model = _model(0.0)
    ids = torch.randint(0, 100, (3, 7))
    out, grads = _step(model, ids, fused=True)
    ref_out, ref_grads = _step(model, ids, fused=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in grads:
        scale = ref_grads[name].abs().max()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-2 * float(scale), msg=name)


def test_bf16_autocast_is_no_further_from_fp32_than_peft(monkeypatch):
    model = _model(0.0)
    ids = torch.randint(0, 100, (3, 7))
    ref_out, ref_grads = _step(model, ids, fused=False, monkeypatch=monkeypatch)

    def errors(out, grads):
        rel = [((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
               for n in grads]
        return (out - ref_out).abs().max().item(), sum(rel) / len(rel), max(rel)

    fused = errors(*_step(model, ids, fused=True, autocast=True))
    peft_way = errors(*_step(model, ids, fused=False, autocast=True, monkeypatch=monkeypatch))
    # bf16 rounds the two paths' different sums differently: the same error, give or take a quarter
    # on average (one tensor's worst case varies more: a half)
    assert 0 < fused[0] <= 1.25 * peft_way[0] and fused[1] <= 1.25 * peft_way[1] and fused[2] <= 1.5 * peft_way[2], (fused, peft_way)


class _Ops(TorchDispatchMode):
    """Records (op name, output shape) of every aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.ops.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def _one_projection(fused: bool, p: float = 0.1):
    """The first layer's MLP gate projection (32 -> 64) of a LoRA model, and an input for it."""
    model = _model(p)
    layer = next(m for m in _adapters(model) if m.base_layer.out_features == 64)
    if not fused:
        layer.__class__ = peft_layer.Linear
    x = torch.randn(2, 10, 32, requires_grad=True)
    return model, layer, x


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_pass_over_the_projection_output(p):
    """peft adds ``lora_B(...) * scaling`` to the base output: a product and a sum over the (tokens, out)
    output in forward and a product in backward. The fused path has none: the GEMM accumulates."""
    counts = {}
    for fused in (True, False):
        _, layer, x = _one_projection(fused, p)
        with _Ops() as rec:
            layer(x).sum().backward()
        counts[fused] = [op for op, shape in rec.ops if shape[-1:] == (64,) and op in ("mul", "add", "add_", "mul_")]
    assert counts[True] == []
    assert len(counts[False]) >= 3  # peft: * scaling, +, and the product's backward


@pytest.mark.parametrize("name", ["down_proj", "gate_proj"])
@pytest.mark.parametrize("view", [False, True])
def test_saves_one_input_copy_the_mask_and_the_rank_r_product_only(name, view):
    """down_proj has an adapter of its own; gate_proj's group (gate, up) computes both adapters' rank-r
    products at once (and keeps their stacked A, r x 2 rows). A fresh input (what a norm or the MLP's
    product hands over, which nothing else keeps) is kept as its dropped copy, not besides it; a view
    (o_proj's input is a view of SDPA's output, which SDPA keeps) is kept itself, and its dropped copy
    recomputed in backward."""
    model = _model(0.1)
    layer = getattr(model.base_model.model.model.layers[0].mlp, name)
    x = torch.randn(2, 10, layer.in_features, requires_grad=True)
    x_in = x.view(20, layer.in_features).view(2, 10, layer.in_features) if view else x * 1.0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x_in)
    assert out.shape == (2, 10, layer.out_features)
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    # peft keeps, per adapter, a dropped fp32 copy of x, the mask and B's input; here one of each
    expected = [("torch.bool", (2, 10, layer.in_features)), ("torch.float32", (2, 10, layer.in_features)),
                ("torch.float32", (20, 4))]
    if name == "gate_proj":
        expected.insert(2, ("torch.float32", (8, 32)))  # the group's stacked A
    assert sorted((str(t.dtype), tuple(t.shape)) for t in activations) == expected, [(t.dtype, t.shape) for t in activations]
    copy = next(t for t in activations if t.dtype == torch.float32 and t.shape == x.shape)
    assert (copy.untyped_storage().data_ptr() == x_in.untyped_storage().data_ptr()) is view
    out.sum().backward()  # both ways give the same gradients (the finite-difference test checks the values)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_of_the_fused_functions_by_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64)
    w2 = torch.randn(4, 6, dtype=torch.float64)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    a2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(3, 5, 6) > 0.3

    def one(x, a, b):
        return lora._AddAdapter.apply(x @ w.t(), dropout._DroppedProjection.apply(x, a, keep, 1 / 0.7), b, 0.5)

    def group(x, a, a2, b, b2):  # two adapters of one input: one mask, one product with the stacked A
        h = dropout._DroppedProjection.apply(x, torch.cat([a, a2]), keep, 1 / 0.7)
        return (lora._AddAdapter.apply(x @ w.t(), h[..., :2], b, 0.5),
                lora._AddAdapter.apply(x @ w2.t(), h[..., 2:], b2, 2.0))

    assert torch.autograd.gradcheck(one, (x, a, b))
    torch.testing.assert_close(one(x, a, b), x @ w.t() + 0.5 * ((x * keep / 0.7) @ a.t()) @ b.t())
    assert torch.autograd.gradcheck(group, (x, a, a2, b, b2))
    y, y2 = group(x, a, a2, b, b2)
    torch.testing.assert_close(y2, x @ w2.t() + 2.0 * ((x * keep / 0.7) @ a2.t()) @ b2.t())
    assert torch.autograd.gradcheck(lambda x, a, b: lora._AddAdapter.apply(x @ w.t(), x @ a.t(), b, 2.0), (x, a, b))


def _attention(p: float):
    model = _model(p)
    return model, model.base_model.model.model.layers[0].self_attn


def test_a_group_member_called_with_another_tensor_computes_its_own(monkeypatch):
    """The group's product serves only calls with the very tensor it was computed from (same object,
    unchanged); other calls compute their own, so the values are always those of the tensor given."""
    model, attn = _attention(0.0)
    calls = []
    real = lora.dropped_rank_product
    monkeypatch.setattr(lora, "dropped_rank_product", lambda x, a, p: calls.append(a.shape[0]) or real(x, a, p))
    x, x2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)

    def expected(layer, x):  # peft's own forward
        with monkeypatch.context() as m:
            m.setattr(type(layer), "_fused_adapter", lambda self, args, kwargs: None)
            return layer(x)

    with torch.no_grad():
        outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        assert calls == [12]  # one product for the three adapters (r 4 each)
        for layer, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
            torch.testing.assert_close(out, expected(layer, x))
        calls.clear()
        q, k = attn.q_proj(x), attn.k_proj(x2)  # another tensor: k computes its own (and a new group's)
        assert calls == [12, 12]
        torch.testing.assert_close(q, expected(attn.q_proj, x))
        torch.testing.assert_close(k, expected(attn.k_proj, x2))
        calls.clear()
        attn.q_proj(x)
        x.add_(1.0)  # changed in place after the group's product
        k = attn.k_proj(x)
        assert calls == [12, 12]
        torch.testing.assert_close(k, expected(attn.k_proj, x))
        calls.clear()
        x3 = torch.randn(2, 5, 32)
        attn.q_proj(x3), attn.k_proj(x3), attn.v_proj(x3)
        assert calls == [12] and attn.q_proj.__dict__["_llara_input_group"]._key is None  # nothing pending


def test_inference_mode_runs_each_adapter_alone():
    """Tensors made under inference_mode keep no version counter: each adapter computes its own."""
    model = _model(0.1).eval()
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_a_copy_of_the_model_groups_its_own_layers():
    model, attn = _attention(0.1)
    with torch.no_grad():
        attn.q_proj(torch.randn(1, 3, 32))  # k's and v's slices pending
    clone = copy.deepcopy(model)
    group = clone.base_model.model.model.layers[0].self_attn.q_proj.__dict__["_llara_input_group"]
    cattn = clone.base_model.model.model.layers[0].self_attn
    assert group.members == [cattn.q_proj, cattn.k_proj, cattn.v_proj] and group._key is None
    assert all(m is not n for m, n in zip(group.members, (attn.q_proj, attn.k_proj, attn.v_proj)))


def test_peft_forward_where_the_fused_path_does_not_apply():
    model = _model(0.0)
    ids = torch.randint(0, 100, (2, 5))
    layer = _adapters(model)[0]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert layer._fused_adapter((), {}) is None
            plain = model(input_ids=ids).logits
        model.merge_adapter()
        assert layer._fused_adapter((), {}) is None
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    layer.lora_A["default"].weight.ds_id = 3  # a ZeRO-3 partitioned weight is gathered by its module only
    assert layer._fused_adapter((), {}) is None
