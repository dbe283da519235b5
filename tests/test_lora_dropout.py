"""The adapters' CPU dropout (training/lora.py: CpuFastDropout): the same distribution as nn.Dropout,
a quarter of the random draws, seeded, and swapped into every adapter by apply_lora."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llara.training.lora import CpuFastDropout, apply_lora


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_scale_and_mean(p):
    drop = CpuFastDropout(p).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005  # 400k elements: sd of the rate ~0.0008
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - round(p * 65536) / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased, as nn.Dropout
    # masks are not the same in every row (the four numbers of one draw land in different places)
    assert len({tuple(r) for r in kept[:50].tolist()}) == 50


def test_seeded_eval_and_gradients():
    drop = CpuFastDropout(0.1).train()
    x = torch.randn(7, 33, requires_grad=True)  # an element count that is not a multiple of 4
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad != 0, a != 0)  # the gradient flows through the kept elements only
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CpuFastDropout(0.0).train()(x), x)


def test_apply_lora_swaps_every_adapter_dropout():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = apply_lora(LlamaForCausalLM(cfg), r=4, dropout=0.1)
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert len(drops) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(type(d) is CpuFastDropout and d.p == 0.1 for d in drops)
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
