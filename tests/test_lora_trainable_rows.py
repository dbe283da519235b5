"""The slot rows' trainable-token layer after apply_lora (training/lora_layers.py: RowsTrainableTokens): the same
embeddings and the same gradients for the trainable rows as peft's own layer, without building a copy
of the whole embedding matrix per forward."""
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llara.training.lora import apply_lora
from llara.training.lora_layers import _rows_trainable_tokens_class


def _model(tie: bool):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(cfg), r=4, dropout=0.0, trainable_token_ids=[60, 61, 63])
    for name, p in model.named_parameters():  # give the deltas and adapters values of their own
        if "trainable_tokens_delta" in name or "lora_B" in name:
            nn.init.normal_(p)
    return model


def _layer(model):
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)
              and isinstance(m.base_layer, nn.Embedding)]
    assert len(layers) == 1
    return layers[0]


def test_same_values_and_gradients_as_peft_and_no_full_copy(monkeypatch):
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    copies = []
    real = torch.Tensor.index_copy
    monkeypatch.setattr(torch.Tensor, "index_copy", lambda *a, **k: copies.append(1) or real(*a, **k))
    for tie in (False, True):
        model = _model(tie).train()
        layer = _layer(model)
        assert type(layer) is _rows_trainable_tokens_class()
        ids = torch.tensor([[1, 60, 5, 63, 63, 2], [61, 7, 8, 9, 60, 0]])
        delta = dict(model.named_parameters())
        delta = next(p for n, p in delta.items() if "trainable_tokens_delta" in n)

        def run():
            delta.grad = None
            out = model(input_ids=ids).logits
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            return out.detach(), delta.grad.clone()

        copies.clear()
        ours = run()
        ours_copies = len(copies)
        layer.__class__ = TrainableTokensLayer  # peft's own forward
        peft = run()
        # tied: the LM head is peft's tied layer either way (one merged copy for the head)
        assert ours_copies == (1 if tie else 0) and len(copies) > ours_copies
        torch.testing.assert_close(ours[0], peft[0])
        torch.testing.assert_close(ours[1], peft[1])
        assert ours[1][[0, 1, 2]].abs().sum() > 0  # ids 60, 61, 63 all received gradient


def test_state_dict_and_merge_are_peft_s():
    model = _model(False)
    keys = [k for k in model.state_dict() if "trainable_tokens" in k]
    assert keys and all("trainable_tokens_delta.default" in k or "original" in k for k in keys)
    merged = model.merge_and_unload()
    assert isinstance(merged.get_input_embeddings(), nn.Embedding)
