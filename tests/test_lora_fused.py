"""The fused adapter path: apply_lora swaps peft's LoRA ``Linear`` for one whose adapter product
accumulates into the base projection's output (``_AdapterDelta``). Same values and gradients as peft's
own forward (same dropout draws), no pass of its own over the projection's output, only the input,
the 1-byte mask and the rank-r product kept for backward, and peft's forward wherever the fused path
does not apply."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import llara.training.lora_layers as lora
from llara.training.lora import apply_lora

peft_layer = pytest.importorskip("peft.tuners.lora.layer")


def _model(p: float, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = apply_lora(LlamaForCausalLM(cfg), r=4, alpha=8, dropout=p, trainable_token_ids=[5, 6])
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


def test_apply_lora_swaps_every_adapted_projection():
    model = _model(0.1)
    layers = _adapters(model)
    assert len(layers) == 2 * 7
    assert all(type(m) is lora._fused_lora_linear_class() for m in layers)
    assert all(m._fused_adapter((), {}) is not None for m in layers)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_same_values_and_gradients_as_peft_in_fp32(p, monkeypatch):
    model = _model(p)
    ids = torch.randint(0, 100, (3, 7))
    out, grads = _step(model, ids, fused=True)
    ref_out, ref_grads = _step(model, ids, fused=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    if p:  # dropout really ran: a step without it differs
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids, output_hidden_states=True).hidden_states[-1], out)


def test_bf16_autocast_is_no_further_from_fp32_than_peft(monkeypatch):
    model = _model(0.0)
    ids = torch.randint(0, 100, (3, 7))
    ref_out, ref_grads = _step(model, ids, fused=False, monkeypatch=monkeypatch)

    def errors(out, grads):
        rel = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
                  for n in grads)
        return (out - ref_out).abs().max().item(), rel

    fused = errors(*_step(model, ids, fused=True, autocast=True))
    peft_way = errors(*_step(model, ids, fused=False, autocast=True, monkeypatch=monkeypatch))
    assert 0 < fused[0] <= 1.25 * peft_way[0] and fused[1] <= 1.25 * peft_way[1]


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


def test_saves_the_input_the_mask_and_the_rank_r_product_only():
    model, layer, x = _one_projection(True, 0.1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert out.shape == (2, 10, 64)
    held = {x.untyped_storage().data_ptr()} | {q.untyped_storage().data_ptr() for q in model.parameters()}
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in held]
    # peft keeps a dropped fp32 copy of x (and B's input); here: the 1-byte mask and the rank-r product
    assert sorted((str(t.dtype), tuple(t.shape)) for t in activations) == [
        ("torch.bool", (2, 10, 32)), ("torch.float32", (20, 4))], [(t.dtype, t.shape) for t in activations]


def test_gradients_of_the_fused_function_by_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(3, 5, 6) > 0.3

    def f(x, a, b):
        return lora._AdapterDelta.apply(x @ w.t(), x, keep, 1 / 0.7, a, b, 0.5)

    assert torch.autograd.gradcheck(f, (x, a, b))
    reference = x @ w.t() + 0.5 * ((x * keep / 0.7) @ a.t()) @ b.t()
    torch.testing.assert_close(f(x, a, b), reference)
    assert torch.autograd.gradcheck(lambda x, a, b: lora._AdapterDelta.apply(x @ w.t(), x, None, 1.0, a, b, 2.0),
                                    (x, a, b))


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
