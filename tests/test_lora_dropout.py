"""The adapters' CPU dropout (training/lora_dropout.py): the mask has nn.Dropout's distribution from a quarter of
the random draws, seeded; apply_lora moves it into every adapter's A projection (CpuDropoutLinear), whose
output and gradients equal peft's dropout-then-linear with the same mask, and whose backward keeps the
1-byte mask and the dropped input, not the input besides them."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import llara.training.lora_dropout as lora
from llara.training.lora import apply_lora
from llara.training.lora_dropout import CpuDropoutLinear, cpu_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_scale_and_mean(p):
    x = torch.ones(400, 1000)
    keep, scale = cpu_keep_mask(x, p)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert abs(1 - keep.float().mean().item() - p) < 0.005  # 400k elements: sd of the rate ~0.0008
    assert scale == 1 / (1 - round(p * 65536) / 65536)
    assert abs((x * keep * scale).mean().item() - 1.0) < 0.01  # unbiased, as nn.Dropout
    # masks are not the same in every row (the four numbers of one draw land in different places)
    assert len({tuple(r) for r in keep[:50].tolist()}) == 50


def test_large_masks_follow_the_global_seed_small_ones_are_torchs_own_draw():
    x = torch.ones(512, 1024)  # 131k words: over the threshold of the fast generator
    assert x.numel() // 4 >= lora._FAST_WORDS
    torch.manual_seed(5)
    a, _ = cpu_keep_mask(x, 0.1)
    torch.manual_seed(5)
    b, _ = cpu_keep_mask(x, 0.1)
    c, _ = cpu_keep_mask(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)  # follows the seed; the next draw differs
    for half in (a[:256], a[256:]):  # uniform over the mask, at the asked rate (sd ~0.0008)
        assert abs(1 - half.float().mean().item() - 0.1) < 0.005
    small = torch.ones(64, 100)  # 1,600 words: torch's own draw from the global generator
    torch.manual_seed(7)
    keep, _ = cpu_keep_mask(small, 0.1)
    torch.manual_seed(7)
    words = torch.randint(-(2**63), 2**63 - 1, (1600,), dtype=torch.int64)
    assert torch.equal(keep, words.view(torch.int16).view(64, 100) >= round(0.1 * 65536) - 32768)


def _layer(p: float, in_f: int = 33, out_f: int = 5) -> CpuDropoutLinear:
    layer = nn.Linear(in_f, out_f, bias=False)
    layer.__class__ = CpuDropoutLinear
    layer.p = p
    return layer.train()


@pytest.mark.parametrize("autocast", [False, True])
def test_output_and_gradients_equal_dropout_then_linear(autocast):
    layer = _layer(0.1)
    x = torch.randn(3, 7, 33, requires_grad=True)  # an element count that is not a multiple of 4
    grad = torch.randn(3, 7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        keep, scale = cpu_keep_mask(x, 0.1)  # the same draws
        x2 = x.detach().clone().requires_grad_()
        w2 = layer.weight.detach().clone().requires_grad_()
        y2 = nn.functional.linear(x2 * keep * scale, w2)
    assert y.dtype == y2.dtype
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, y2, **tol)
    (y.float() * grad).sum().backward()
    (y2.float() * grad).sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, w2.grad, **tol)
    assert torch.equal(x.grad != 0, keep.expand_as(x.grad) & (x2.grad != 0))  # flows through kept elements only


def test_seeded_and_plain_in_eval():
    layer = _layer(0.1)
    x = torch.randn(7, 33)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), a)
    assert not torch.equal(layer(x), a)  # a new mask
    plain = nn.functional.linear(x, layer.weight)
    assert torch.equal(layer.eval()(x), plain)
    off = _layer(0.0)
    assert torch.equal(off(x), nn.functional.linear(x, off.weight))


def test_backward_keeps_the_dropped_input_and_the_mask_not_the_input_too():
    """What autograd saves for backward: a fresh input's dropped fp32 copy and a bool mask, not the input
    besides them; a view (which the op that made its base may keep, as SDPA keeps its output) is kept
    itself with the mask (its dropped copy is recomputed in backward). peft's nn.Dropout then nn.Linear
    saves the mask and a float copy for each adapter."""

    def saved(fn, x):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = (str(t.dtype), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x).sum().backward()
        return seen

    x = torch.randn(8, 96, 576, requires_grad=True)
    fused = _layer(0.1, 576, 64)
    weight = fused.weight.untyped_storage().data_ptr()
    fresh = x * 1.0
    kept = saved(fused, fresh)
    kept.pop(weight, None)
    assert fresh.untyped_storage().data_ptr() not in kept
    assert sorted(kept.values()) == [("torch.bool", x.numel()), ("torch.float32", 4 * x.numel())]
    view = x.view(-1, 576).view(8, 96, 576)
    kept = saved(fused, view)
    kept.pop(weight, None)
    assert kept == {x.untyped_storage().data_ptr(): ("torch.float32", 4 * x.numel()),
                    **{k: v for k, v in kept.items() if v[0] == "torch.bool"}} and len(kept) == 2
    peft_way = nn.Sequential(nn.Dropout(0.1), nn.Linear(576, 64, bias=False)).train()
    assert sum(n for _, n in saved(peft_way, x * 1.0).values()) >= 5 * x.numel()  # a float copy and a mask


def test_apply_lora_moves_every_adapter_dropout_into_its_projection():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(cfg), r=4, dropout=0.1)
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(type(m.lora_A["default"]) is CpuDropoutLinear and m.lora_A["default"].p == 0.1 for m in layers)
    assert all(type(m.lora_dropout["default"]) is nn.Identity for m in layers)
    assert all("lora_A.default.weight" in k for k in model.state_dict() if ".lora_A." in k)
    for m in layers:  # B starts at zero: give the adapters an effect
        nn.init.normal_(m.lora_B["default"].weight)
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)  # no dropout in eval


def _mask_rate_in_child(_):
    torch.manual_seed(1)
    keep, _ = cpu_keep_mask(torch.ones(512, 1024), 0.1)
    return 1 - keep.float().mean().item()


def test_large_masks_in_a_forked_child():
    """The second half of a large mask is drawn on a helper thread; a forked child (a data-loader worker)
    has no copy of that thread and makes its own."""
    import multiprocessing

    cpu_keep_mask(torch.ones(512, 1024), 0.1)  # the parent's helper thread exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        rate = pool.map(_mask_rate_in_child, [0])[0]
    assert abs(rate - 0.1) < 0.005
    torch.manual_seed(1)
    assert _mask_rate_in_child(0) == rate  # the same draws in the child as here
