"""The layers :func:`llara.training.lora.apply_lora` swaps into peft's LoRA model, for speed and memory
on every device and especially on a CPU (``benchmarks/results/cpu_train_fp32.md``):

* :class:`FusedLoraLinear` (made by :func:`_fused_lora_linear_class`): each adapter's product
  accumulates into its frozen projection's output (:class:`_AdapterDelta`);
* :class:`CpuDropoutLinear`: an adapter's dropout inside its A projection, with a 1-byte mask
  (:func:`cpu_keep_mask`) on a CPU, for the cases that run peft's own forward;
* ``RowsTrainableTokens`` (:func:`_rows_trainable_tokens_class`): the slot rows without a copy of the
  embedding matrix per forward.

Same parameters and state-dict keys as peft's layers; :func:`swap_layers` installs all three.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

__all__ = ["CpuDropoutLinear", "cpu_keep_mask", "swap_layers"]


def cpu_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask for ``x`` (bool, True = kept) and the scale of the kept values, for a CPU.

    A CPU draws dropout masks from one mt19937 number per element (``bernoulli_``), slower than
    the adapters' own matmuls: it was 29% of a LoRA fine-tuning step of the embedded model (batch
    8 x 2 passages, 96 tokens; ``benchmarks/results/cpu_train.md``). Here each 64-bit draw gives four
    16-bit numbers, each compared with a threshold: the drop probability is ``p`` rounded to a
    multiple of 1/65536, and the kept values are scaled by the exact inverse of the keep probability
    (unbiased, as ``nn.Dropout``). Masks follow torch's global generator (seeded, checkpointed); large
    ones are drawn from a faster generator seeded by it (:func:`_random_words`)."""
    drop = round(p * 65536)
    if drop >= 65536:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device), 0.0
    n = x.numel()
    words = _random_words((n + 3) // 4, x.device)
    return words.view(torch.int16)[:n].view(x.shape) >= drop - 32768, 65536 / (65536 - drop)


_FAST_WORDS = 1 << 15  # from here on numpy's SFC64 (torch's own draw is quicker below ~12k words: seeding SFC64 costs ~30 us)


def _random_words(n: int, device: torch.device) -> torch.Tensor:
    """``n`` uniform 64-bit words. torch draws random integers on a CPU from mt19937, one number after
    another on one thread: most of the dropout masks' cost in a LoRA step of the embedded model. A large
    draw on a CPU takes one seed from torch's global generator (so masks follow its seed and
    checkpointed state) and fills the words from numpy's SFC64 (the small fast generator of PractRand's
    author; numpy keeps its stream fixed for a given seed), on one thread: a whole 1536 x 576 mask in
    1.5 ms against 2.3 ms for torch's draw split over two threads, 1536 x 1536 in 2.7 against 4.5 ms."""
    if device.type != "cpu" or n < _FAST_WORDS:
        return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, device=device)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


class _DroppedProjection(torch.autograd.Function):
    """``(x * keep * scale) @ weight.T`` that keeps ``x`` (the adapted layer's input, which the step
    holds anyway) and the 1-byte mask for backward instead of the dropped fp32 copy of ``x``: backward
    recomputes the masked input for the weight's gradient. The scale multiplies the small weight (and
    the weight's gradient), not the activations."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, keep, scale: float):
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return nn.functional.linear(x * _bytes(keep), weight * scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ (weight * ctx.scale).to(grad.dtype)).mul_(_bytes(keep)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g = grad.reshape(-1, grad.shape[-1])
            masked = (x * _bytes(keep)).reshape(-1, x.shape[-1]).to(g.dtype)
            grad_w = (g.t() @ masked).to(weight.dtype).mul_(ctx.scale)
        return grad_x, grad_w, None, None


class CpuDropoutLinear(nn.Linear):
    """An adapter's A projection with its input dropout inside (peft's ``lora_A`` after
    :func:`apply_lora`, which sets the adapter's own ``lora_dropout`` to identity).

    On a CPU in training it draws the mask with :func:`cpu_keep_mask` (a quarter of the random draws)
    and keeps only that 1-byte mask and the layer's input for backward. peft's ``lora_A(dropout(x))``
    keeps, for each of a layer's seven adapters, its own fp32 dropped copy of the input besides the
    mask: on ``llara recipe``'s step of the embedded model in fp32 that step peaked at 8.6 GB, 6.4 GB
    without dropout, 7.5 GB with this layer (``benchmarks/results/cpu_train_fp32.md``). Same parameters and
    state-dict keys as ``nn.Linear``; elsewhere (eval, other devices, a bias) it is
    ``nn.Dropout`` then ``nn.Linear``, as peft runs it. Where the adapter runs fused
    (:func:`_fused_lora_linear_class`, the usual case) its ``p`` is read there and this forward is not
    called; it serves peft's own forward (merged, disabled, several adapters)."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        if x.device.type != "cpu" or self.bias is not None:
            return super().forward(nn.functional.dropout(x, self.p, True))
        keep, scale = cpu_keep_mask(x, self.p)
        return _DroppedProjection.apply(x, self.weight, keep, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def _bytes(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (a view): a float tensor times uint8 runs vectorised, times bool through a
    scalar cast loop, 4x slower on an AVX2 CPU (0.21 against 0.80 ms for 1536 x 576)."""
    return keep.view(torch.uint8)


class _AdapterDelta(torch.autograd.Function):
    """``result += scaling * ((x * keep * drop_scale) @ A.T) @ B.T`` in place, one adapter of a LoRA
    projection (``result`` is the frozen base projection's output, which nothing saved for backward).

    peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: two more passes over the
    projection's output in forward (a product and a sum, each a new tensor) and one in backward, and
    with dropout an fp32 dropped copy of ``x`` kept per adapter. Here the second product accumulates
    into ``result`` (``addmm_``: the GEMM adds, no pass of its own) and the scales multiply the small
    ``A`` and ``B`` (r rows or columns), never the activations. ``keep`` (bool, from
    :func:`cpu_keep_mask`) or None (no dropout, or ``x`` already dropped); backward keeps ``x``, the
    1-byte mask and the rank-r product, and recomputes the masked input for ``A``'s gradient. All tensors
    share one dtype (the caller casts): nothing is cast inside."""

    @staticmethod
    def _masked(x, keep):
        """The (tokens, in) input with the dropped elements zeroed (unscaled), or ``x`` itself."""
        x2 = x.reshape(-1, x.shape[-1])
        return x2 if keep is None else x2 * _bytes(keep).reshape(x2.shape)

    @staticmethod
    def _scaled_a(weight_a, drop_scale: float):
        return weight_a if drop_scale == 1.0 else weight_a * drop_scale

    @staticmethod
    def forward(ctx, result, x, keep, drop_scale: float, weight_a, weight_b, scaling: float):
        h = _AdapterDelta._masked(x, keep) @ _AdapterDelta._scaled_a(weight_a, drop_scale).t()  # (tokens, r)
        result.view(-1, result.shape[-1]).addmm_(h, weight_b.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, keep, h, weight_a, weight_b)
        ctx.drop_scale, ctx.scaling = drop_scale, scaling
        return result

    @staticmethod
    def backward(ctx, grad):
        x, keep, h, weight_a, weight_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = g @ (weight_b * ctx.scaling)  # (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_h @ _AdapterDelta._scaled_a(weight_a, ctx.drop_scale)
            if keep is not None:
                grad_x.mul_(_bytes(keep).reshape(grad_x.shape))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[4]:
            grad_a = grad_h.t() @ _AdapterDelta._masked(x, keep)
            if ctx.drop_scale != 1.0:
                grad_a.mul_(ctx.drop_scale)
        if ctx.needs_input_grad[5]:
            grad_b = (g.t() @ h).mul_(ctx.scaling)
        return grad, grad_x, None, None, grad_a, grad_b, None


def _whole(weight: torch.Tensor) -> bool:
    """Whether a weight is here in full: DeepSpeed ZeRO-3 partitions it (``ds_id``, an empty tensor) and
    gathers it only inside its own module's forward, which the fused path does not call."""
    return getattr(weight, "ds_id", None) is None and weight.numel() > 0


@functools.cache
def _fused_lora_linear_class():
    """peft's LoRA ``Linear`` whose forward runs each plain adapter as :class:`_AdapterDelta` (made on
    first use: peft is imported lazily)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """One vanilla adapter over a frozen ``nn.Linear`` (llara's LoRA): the adapter's product
        accumulates into the base projection's output (:class:`_AdapterDelta`). Anything else (adapters
        disabled, merged, several active, DoRA or another variant, per-example adapter names, a bias on
        the adapter, a trainable or non-``nn.Linear`` base) runs peft's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = self._fused_adapter(args, kwargs)
            if fused is None:
                return super().forward(x, *args, **kwargs)
            lora_a, lora_b, scaling = fused
            result = self.base_layer(x)
            dtype = result.dtype  # the base's, or autocast's
            p = lora_a.p if lora_a.training and isinstance(lora_a, CpuDropoutLinear) else 0.0
            keep, drop_scale = None, 1.0
            if p and x.device.type == "cpu":
                keep, drop_scale = cpu_keep_mask(x, p)
            elif p:
                x = nn.functional.dropout(x, p, True)
            with torch.autocast(x.device.type, enabled=False):
                return _AdapterDelta.apply(result, x.to(dtype), keep, drop_scale, lora_a.weight.to(dtype),
                                           lora_b.weight.to(dtype), float(scaling))

        def _fused_adapter(self, args, kwargs):
            names = self.active_adapters
            if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
                    or type(self.base_layer) is not nn.Linear or self.base_layer.weight.requires_grad):
                return None
            name = names[0]
            if name not in self.lora_A or name in self.lora_variant or type(self.lora_dropout[name]) is not nn.Identity:
                return None
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            if lora_a.bias is not None or lora_b.bias is not None or not (_whole(lora_a.weight) and _whole(lora_b.weight)):
                return None
            return lora_a, lora_b, self.scaling[name]

    return FusedLoraLinear


def _fuse_adapters(peft_model: nn.Module) -> int:
    """Swaps peft's LoRA ``Linear`` layers for :func:`_fused_lora_linear_class`; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            module.__class__ = _fused_lora_linear_class()
            swapped += 1
    return swapped


def _dropout_into_projections(peft_model: nn.Module) -> int:
    """Moves each adapter's dropout into its A projection (:class:`CpuDropoutLinear`, same ``p``, same
    weight); returns how many."""
    swapped = 0
    for module in peft_model.modules():
        drops, projections = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(projections, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            a = projections[name] if name in projections else None
            if type(drop) is nn.Dropout and type(a) is nn.Linear:
                a.__class__ = CpuDropoutLinear
                a.p = float(drop.p)
                drops[name] = nn.Identity()
                swapped += 1
    return swapped


@functools.cache
def _rows_trainable_tokens_class():
    """peft's ``TrainableTokensLayer`` whose forward over an embedding reads the trainable rows from their
    deltas instead of building the whole merged matrix (made on first use: peft is imported lazily)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    class RowsTrainableTokens(TrainableTokensLayer):
        """peft builds ``weight.index_copy(rows, deltas)``, a copy of the whole embedding matrix
        (49k x 576 for the embedded model, 113 MB; 262 MB for a 7B model's), on every forward, and its
        dense gradient on every backward, to train 16 slot rows. Here the frozen matrix is looked up
        as it is and the positions holding a trainable token take their row from the deltas: the same
        values and the same gradients for the deltas. Anything else (several adapters, merged, a tied
        LM head, max_norm, sparse) runs peft's own forward."""

        def forward_adapters(self, x, active_adapters, *args, **kwargs):
            base = self.base_layer
            if (self.disable_adapters or self.merged or len(active_adapters) != 1 or args or kwargs
                    or type(base) is not nn.Embedding or base.max_norm is not None or base.sparse
                    or self._get_embed_scale() is not None):
                return super().forward_adapters(x, active_adapters, *args, **kwargs)
            name = active_adapters[0]
            lookup = self._row_lookup(name, base.weight.shape[0], x.device)
            slot = lookup[x]  # (...,): the delta row of each position, -1 elsewhere
            emb = nn.functional.embedding(x, base.weight, padding_idx=base.padding_idx)
            rows = self.trainable_tokens_delta[name].to(emb.dtype)[slot.clamp(min=0)]
            return torch.where((slot >= 0).unsqueeze(-1), rows, emb)

        def _row_lookup(self, name: str, vocab: int, device: torch.device) -> torch.Tensor:
            cache = self.__dict__.setdefault("_llara_row_lookup", {})
            key = (name, str(device))
            if key not in cache:
                lookup = torch.full((vocab,), -1, dtype=torch.long)
                index = torch.as_tensor(list(self.token_indices[name]), dtype=torch.long)
                lookup[index] = torch.arange(len(index))
                cache[key] = lookup.to(device)
            return cache[key]

    return RowsTrainableTokens


def _row_trainable_tokens(peft_model: nn.Module) -> int:
    """Swaps peft's trainable-token layers over an input embedding for :func:`_rows_trainable_tokens_class`;
    returns how many."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    swapped = 0
    for module in peft_model.modules():
        if type(module) is TrainableTokensLayer and type(module.base_layer) is nn.Embedding:
            module.__class__ = _rows_trainable_tokens_class()
            swapped += 1
    return swapped


def swap_layers(peft_model: nn.Module) -> dict[str, int]:
    """Installs this module's layers in a peft LoRA model (in place); returns how many of each."""
    return {"dropout_in_projection": _dropout_into_projections(peft_model),
            "fused_adapters": _fuse_adapters(peft_model),
            "rows_trainable_tokens": _row_trainable_tokens(peft_model)}
