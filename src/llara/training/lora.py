"""LoRA through ``peft``, with the slot-token embedding rows kept trainable.

LoRA alone leaves newly added tokens (LLaRA's ``<s1>``..``<s16>``) at their initial embedding, since
the embedding matrix is frozen. The caller passes the ids of the tokens that must train:

* ``trainable_tokens="indices"`` (default): peft's ``trainable_token_indices`` trains only those rows
  of the input embedding (a small delta tensor, saved with the adapter);
* ``trainable_tokens="embedding"``: the whole input embedding becomes a ``modules_to_save`` copy.

The layers it swaps into peft's model for speed and memory (fused adapters, the CPU dropout, the slot
rows) are in :mod:`llara.training.lora_layers`. Targets are found from the model itself: every
``nn.Linear`` inside the decoder layers (for LLaMA, Mistral, Qwen2: q, k, v, o, gate, up, down
projections, the authors' choice), never from a hub id.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..modeling.arch import ARCHITECTURES
from .lora_layers import swap_layers

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_NAME",
    "apply_lora",
    "find_projection_names",
    "input_embedding_name",
    "is_peft_model",
    "merged_state_dict",
]

ADAPTER_NAME = "default"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the longest ``nn.ModuleList`` in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of decoder layers found")
    return list(max(lists, key=len))


def find_projection_names(model: nn.Module) -> list[str]:
    """Leaf names of the ``nn.Linear`` modules inside the decoder layers, in model order.

    For LLaMA: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'].
    The LM head and embeddings are outside the layers, so they are never returned.
    """
    names: dict[str, None] = {}
    for layer in _decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and name:
                names[name.rsplit(".", 1)[-1]] = None
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear projections inside the decoder layers")
    return list(names)


def input_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name
    raise ValueError("the input embedding is not a submodule of the model")


def apply_lora(
    model: nn.Module,
    *,
    r: int = 64,
    alpha: float = 16.0,
    dropout: float = 0.1,
    target_modules: Sequence[str] | None = None,
    trainable_token_ids: Sequence[int] | None = None,
    trainable_tokens: str = "indices",
    dtype: torch.dtype = torch.float32,
):
    """Wrap a Hugging Face model with LoRA adapters; returns a ``peft.PeftModel``.

    trainable_token_ids: token ids whose input-embedding rows must train (e.g. the 16 slot tokens);
    with ``trainable_tokens="embedding"`` the whole input embedding trains instead.
    dtype: of the adapter weights and trainable token rows. fp32 (default) keeps small AdamW
    updates; bf16 beside a bf16 base keeps the whole step in one dtype (no casts of weights or of
    the adapted projections' inputs), at the cost of updates below bf16's resolution (~0.4%).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else find_projection_names(model)
    ids = sorted({int(i) for i in trainable_token_ids or ()})
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"trainable token ids {bad} are outside the embedding matrix ({vocab} rows)")
    kwargs = {}
    if ids and trainable_tokens == "indices":
        kwargs["trainable_token_indices"] = {input_embedding_name(model): ids}
    elif ids and trainable_tokens == "embedding":
        kwargs["modules_to_save"] = [input_embedding_name(model).rsplit(".", 1)[-1]]
    elif ids:
        raise ValueError(f"unknown trainable_tokens mode {trainable_tokens!r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        **kwargs,
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME,
                                    autocast_adapter_dtype=dtype == torch.float32)
    spec = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    swap_layers(peft_model, spec.shared_input_projections if spec else ())
    # Trainable tensors in ``dtype`` (peft creates them in the base's or in fp32). In fp32, AdamW
    # updates of ~1e-5 survive; the forward casts them to the base dtype.
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d alpha=%g dropout=%g on %s; %d trainable token rows (%s); %d / %d parameters train",
                r, alpha, dropout, targets, len(ids), trainable_tokens, n_train, n_all)
    return peft_model


def merged_state_dict(peft_model, adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The state dict of the base Hugging Face model with the adapter folded in, without touching
    the live model (``merge_and_unload`` would rewrite it in place).

    LoRA layers give ``W + scale * B @ A``; trainable tokens give the embedding with their rows
    replaced; ``modules_to_save`` give their trained copy. Keys are the plain model's keys.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    wrapped: list[str] = []

    def under(name: str) -> bool:
        return any(name == w or name.startswith(w + ".") for w in wrapped)

    for name, module in base.named_modules():
        if not name or under(name):
            continue
        if isinstance(module, LoraLayer):
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise ValueError("merging DoRA adapters is not supported")
            layer = module.get_base_layer()
            sd = {k: v.detach() for k, v in layer.state_dict().items()}
            if adapter in module.lora_A and not module.merged:
                w = sd["weight"]
                sd["weight"] = (w.float() + module.get_delta_weight(adapter).float()).to(w.dtype)
        elif isinstance(module, TrainableTokensWrapper):
            layer = module.token_adapter
            sd = {k: v.detach() for k, v in layer.get_base_layer().state_dict().items()}
            if adapter in layer.trainable_tokens_delta and not layer.merged:
                sd["weight"] = layer.get_merged_weights([adapter]).detach()
        elif isinstance(module, TrainableTokensLayer):  # pragma: no cover - reached through the wrapper
            continue
        elif isinstance(module, ModulesToSaveWrapper):
            src = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module
            sd = {k: v.detach() for k, v in src.state_dict().items()}
        else:
            continue
        wrapped.append(name)
        out.update({f"{name}.{k}": v for k, v in sd.items()})
    for k, v in base.state_dict().items():
        if not under(k.rsplit(".", 1)[0]) and "lora_" not in k:
            out[k] = v.detach()
    return out
