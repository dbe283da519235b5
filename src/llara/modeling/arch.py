"""Everything that depends on the architecture, in one registry keyed by ``config.model_type``.

How transformers 5.x treats a mask handed to a stock decoder (read in ``masking_utils.py``):

* ``create_causal_mask`` / ``create_sliding_window_causal_mask`` return any 4D tensor *as-is*
  (``_preprocess_mask_arguments`` exits early on ``len(mask.shape) == 4``): no causal mask, no
  padding mask and no sliding window is added on top, and the dtype is not checked.
* eager attention does ``scores + mask``: the mask must be additive float. A boolean 4D mask is
  silently wrong there (True/False are added as 1/0, nothing is masked).
* sdpa passes the mask to ``torch.nn.functional.scaled_dot_product_attention``, which accepts a
  boolean (True = attend) or an additive float mask. We hand it the same additive float mask as
  eager, built directly in the compute dtype (casting an fp32 mask to bf16/fp16 turns
  ``finfo(fp32).min`` into ``-inf``).
* Models with per-layer mask types (qwen2, qwen3, gemma2, gemma3_text) accept a dict
  ``{layer_type: mask}``; given a plain tensor they use it for *every* layer, silently dropping the
  sliding windows. Models with one mask for all layers (mistral, phi3) apply their sliding window
  only through that mask, so a custom mask must contain it. Windows are measured on position ids
  (``sliding_window_blocked``) so the joint layout keeps the standalone windows.
* flash-attention kernels take 2D padding masks only and cannot express "NEXT may not see SELF":
  the joint pass refuses them (use eager or sdpa); ordinary single passes work with any kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .masks import JointBatch, SingleBatch, additive_mask, sliding_window_blocked


__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "get_arch",
    "joint_forward_kwargs",
    "register_arch",
    "single_forward_kwargs",
]

SLIDING_NONE = "none"                # no sliding-window layers
SLIDING_CONFIG = "config"            # one mask for all layers; all layers slide when config.sliding_window is set
SLIDING_LAYER_TYPES = "layer_types"  # config.layer_types names each layer's mask; forward accepts a dict


@dataclass(frozen=True)
class ArchSpec:
    """What differs between architectures for LLaRA's joint pass."""

    model_type: str
    sliding: str = SLIDING_NONE
    """How sliding windows are configured: SLIDING_NONE, SLIDING_CONFIG or SLIDING_LAYER_TYPES."""
    mask_mapping: bool = False
    """The base model's forward accepts ``{layer_type: 4D mask}`` instead of one tensor."""
    attn_implementations: tuple[str, ...] = ("eager", "sdpa")
    """Attention kernels that apply a custom 4D additive mask exactly."""
    softcap_attr: str | None = None
    """Config attribute of attention-logit soft-capping; sdpa refuses it, eager is then required."""
    shared_input_projections: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    """Leaf names of the projections in one module that the stock forward calls with the same input
    tensor: their LoRA adapters share one dropout mask and one product with their stacked A matrices
    (``llara.training.lora_layers``). Names a model lacks (phi3's fused ``qkv_proj``) group nothing;
    the grouping checks the tensor at run time, so a wrong entry costs speed, never correctness."""
    position_wise_modules: tuple[str, ...] = ("self_attn.o_proj", "mlp")
    """Dotted names, inside each decoder layer (``model.layers[i]``), of modules that the stock forward
    calls with one tensor (..., hidden) and that act on each position alone, returning one tensor:
    where a caller reads the final states at a few positions only, and where rows hold pad, they run
    at the rows that matter (``llara.modeling.read_rows``). Names a model lacks are skipped; a module
    that mixes positions must not be listed (the rows that matter would change)."""

    def __post_init__(self):
        if self.sliding not in (SLIDING_NONE, SLIDING_CONFIG, SLIDING_LAYER_TYPES):
            raise ValueError(f"unknown sliding mode {self.sliding!r}")
        if self.sliding == SLIDING_LAYER_TYPES and not self.mask_mapping:
            raise ValueError("per-layer-type sliding windows need a forward that accepts a mask dict")


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add an architecture. Check it with the joint-pass equivalence tests before relying on it."""
    if spec.model_type in ARCHITECTURES and not overwrite:
        raise ValueError(f"{spec.model_type!r} is already registered")
    ARCHITECTURES[spec.model_type] = spec
    return spec


# Prompt building never assumes a BOS token: it asks the tokenizer (Llama-2/3, Mistral and Gemma
# tokenizers add one, SmolLM2 (model_type llama) and Qwen do not).
for _spec in (
    ArchSpec("llama"),
    # config.sliding_window (4096 by default, None in later releases) applies to every layer through
    # the single mask, so a custom mask must carry it.
    ArchSpec("mistral", sliding=SLIDING_CONFIG),
    # Same mask handling as mistral; sliding_window is None in most configs.
    ArchSpec("phi3", sliding=SLIDING_CONFIG),
    # Sliding layers only with use_sliding_window (layers >= max_window_layers).
    ArchSpec("qwen2", sliding=SLIDING_LAYER_TYPES, mask_mapping=True),
    ArchSpec("qwen3", sliding=SLIDING_LAYER_TYPES, mask_mapping=True),  # as qwen2
    # Embeddings scaled by sqrt(hidden); default head_dim 256.
    ArchSpec("gemma"),
    # Alternating sliding/full layers; attention soft-capping, the model class refuses sdpa.
    ArchSpec("gemma2", sliding=SLIDING_LAYER_TYPES, mask_mapping=True, attn_implementations=("eager",),
             softcap_attr="attn_logit_softcapping"),
    # 5 sliding : 1 full layers, separate RoPE per layer type (both follow position_ids).
    # use_bidirectional_attention (EmbeddingGemma) is incompatible with LLaRA's causal masks.
    ArchSpec("gemma3_text", sliding=SLIDING_LAYER_TYPES, mask_mapping=True, softcap_attr="attn_logit_softcapping"),
):
    register_arch(_spec)
del _spec


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise KeyError(
            f"no LLaRA architecture entry for model_type {model_type!r}; known: {sorted(ARCHITECTURES)}. "
            "Add one with llara.modeling.arch.register_arch after checking the joint-pass tests."
        ) from None


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    # Under autocast the attention runs in the autocast dtype: build the mask in it directly.
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    return dtype, device


def _check_model(config, spec: ArchSpec) -> str:
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in spec.attn_implementations:
        raise ValueError(
            f"the joint pass needs a custom 4D mask, which {spec.model_type} applies exactly only with "
            f"attn_implementation in {spec.attn_implementations}, not {attn!r}"
        )
    if spec.softcap_attr and getattr(config, spec.softcap_attr, None) is not None and attn != "eager":
        raise ValueError(f"{spec.model_type} with {spec.softcap_attr} set needs eager attention, not {attn!r}")
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{spec.model_type} is configured for bidirectional attention; LLaRA needs a causal LM")
    return attn


def _layer_masks(config, spec: ArchSpec, batch: JointBatch, dtype: torch.dtype) -> torch.Tensor | dict:
    """The mask argument for the base model: one 4D tensor, or {layer_type: 4D tensor}."""

    def build(window: int | None) -> torch.Tensor:
        if window is None and batch.attention_mask.dtype == dtype:
            return batch.attention_mask
        blocked = batch.blocked
        if window is not None:
            blocked = blocked | sliding_window_blocked(batch.position_ids, window)
        return additive_mask(batch.valid, blocked, dtype)

    window = getattr(config, "sliding_window", None)
    if spec.sliding == SLIDING_NONE:
        return build(None)
    if spec.sliding == SLIDING_CONFIG:
        return build(window)
    masks = {}
    for layer_type in sorted(set(config.layer_types)):
        if layer_type == "full_attention":
            masks[layer_type] = build(None)
        elif layer_type == "sliding_attention":
            if window is None:
                raise ValueError(f"{spec.model_type} has sliding_attention layers but no sliding_window")
            masks[layer_type] = build(window)
        else:
            raise ValueError(f"{spec.model_type}: no joint-pass mask for layer type {layer_type!r}")
    return masks


def joint_forward_kwargs(model, batch: JointBatch) -> dict[str, Any]:
    """Keyword arguments for the stock model's forward (``model(**kw)`` or ``model.model(**kw)``) that
    run LLaRA's joint SELF + NEXT pass: input_ids, the custom mask in the form this architecture needs
    (in the compute dtype, with its sliding windows) and the restarted position ids."""
    config = model.config
    spec = get_arch(config.model_type)
    _check_model(config, spec)
    dtype, device = _model_dtype_device(model)
    batch = batch.to(device)
    return {
        "input_ids": batch.input_ids,
        "attention_mask": _layer_masks(config, spec, batch, dtype),
        "position_ids": batch.position_ids,
    }


def single_forward_kwargs(model, batch: SingleBatch) -> dict[str, Any]:
    """Keyword arguments for an ordinary right-padded pass: the model builds its own causal (and
    sliding-window) masks from the 2D padding mask, so any attention kernel works."""
    _, device = _model_dtype_device(model)
    return {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "position_ids": batch.position_ids.to(device),
    }
