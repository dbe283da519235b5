"""The layers :func:`llara.training.lora.apply_lora` swaps into peft's LoRA model, for speed and memory
on every device and especially on a CPU (``benchmarks/results/cpu_train_fp32.md``):

* :class:`FusedLoraLinear` (made by :func:`_fused_lora_linear_class`): each adapter's product
  accumulates into its frozen projection's output (:class:`_AddAdapter`), and the adapters of
  projections that read one input (q, k, v; gate, up) share one dropout mask and one product with
  their stacked A matrices (:class:`_InputGroup`);
* :class:`~llara.training.lora_dropout.CpuDropoutLinear` (:mod:`llara.training.lora_dropout`, with
  the CPU dropout both paths use): an adapter's dropout inside its A projection, for the cases that
  run peft's own forward;
* ``RowsTrainableTokens`` (:func:`_rows_trainable_tokens_class`): the slot rows without a copy of the
  embedding matrix per forward.

Same parameters and state-dict keys as peft's layers; :func:`swap_layers` installs them.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from .lora_dropout import CpuDropoutLinear, dropped_rank_product

__all__ = ["swap_layers"]


class _AddAdapter(torch.autograd.Function):
    """``result += scaling * h @ B.T`` in place: an adapter's second product accumulates into its frozen
    projection's output (``result``, which nothing saved for backward); ``h`` is the rank-r product of
    the (dropped) input and ``A`` (``lora_dropout._DroppedProjection``, or a slice of its input group's).

    peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: two more passes over the
    projection's output in forward (a product and a sum, each a new tensor) and one in backward. Here
    the GEMM adds (``addmm_``: no pass of its own) and the scale multiplies the small ``B``; backward
    keeps ``h`` (rank r) and ``B``. Both share ``result``'s dtype (the caller casts)."""

    @staticmethod
    def forward(ctx, result, h, weight_b, scaling: float):
        h2 = h.reshape(-1, h.shape[-1])
        result.view(-1, result.shape[-1]).addmm_(h2, weight_b.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(h2, weight_b)
        ctx.h_shape, ctx.scaling = h.shape, scaling
        return result

    @staticmethod
    def backward(ctx, grad):
        h2, weight_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_h = (g @ (weight_b * ctx.scaling)).view(ctx.h_shape)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h2).mul_(ctx.scaling)
        return grad, grad_h, grad_b, None


class _InputGroup:
    """Adapted projections of one module that read the same input tensor (a LLaMA layer's q, k and v,
    or gate and up: ``ArchSpec.shared_input_projections``). The first of them to run draws one dropout
    mask and computes one product with their stacked ``A`` matrices for all of them; the others take
    their rank-r slice when they are called with that very tensor (same object, unchanged), and compute
    their own otherwise, so a model that feeds them different inputs gets what peft computes.

    Against peft: one dropout mask per input instead of one per adapter, as peft itself does where a
    model fuses q, k and v into one projection (each adapter still sees its input dropped at rate p);
    one GEMM of r x members columns instead of a thin one per adapter, and one masked input and one
    input gradient per group. A LLaMA layer's seven adapters draw four masks instead of seven."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._pending: dict[int, torch.Tensor] = {}  # id(member) -> its slice of the last group product
        self._key: tuple | None = None  # (weakref to the input, its version, dtype, grad mode, p)

    def __getstate__(self):  # copies and pickles of the model carry the members, not a pending product
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])

    def rank_product(self, member: nn.Module, x: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor | None:
        """``member``'s rank-r product of ``x``, or None (then it computes its own, as for a tensor made
        under ``torch.inference_mode``, which keeps no version counter to tell a change by)."""
        if x.is_inference():
            return None
        key = (x._version, dtype, torch.is_grad_enabled(), p)
        if self._key is not None and self._key[0]() is x and self._key[1:] == key and id(member) in self._pending:
            h = self._pending.pop(id(member))
            if not self._pending:
                self._key = None
            return h
        adapters = [m._fused_adapter((), {}) for m in self.members]
        if any(a is None or _dropout_p(a[0]) != p for a in adapters):
            return None
        h = dropped_rank_product(x.to(dtype), torch.cat([a[0].weight.to(dtype) for a in adapters]), p)
        slices = h.split([a[0].weight.shape[0] for a in adapters], dim=-1)
        self._pending = {id(m): s for m, s in zip(self.members, slices) if m is not member}
        self._key = (weakref.ref(x), *key) if self._pending else None
        return slices[self.members.index(member)]


def _dropout_p(lora_a: nn.Module) -> float:
    """The dropout rate the fused path applies before an A projection (0 in eval)."""
    return lora_a.p if lora_a.training and isinstance(lora_a, CpuDropoutLinear) else 0.0


def _whole(weight: torch.Tensor) -> bool:
    """Whether a weight is here in full: DeepSpeed ZeRO-3 partitions it (``ds_id``, an empty tensor) and
    gathers it only inside its own module's forward, which the fused path does not call."""
    return getattr(weight, "ds_id", None) is None and weight.numel() > 0


@functools.cache
def _fused_lora_linear_class():
    """peft's LoRA ``Linear`` whose forward runs each plain adapter as :class:`_AddAdapter` (made on
    first use: peft is imported lazily)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """One vanilla adapter over a frozen ``nn.Linear`` (llara's LoRA): the adapter's product
        accumulates into the base projection's output (:class:`_AddAdapter`); its rank-r product comes
        from its :class:`_InputGroup` where it has one. Anything else (adapters
        disabled, merged, several active, DoRA or another variant, per-example adapter names, a bias on
        the adapter, a trainable or non-``nn.Linear`` base) runs peft's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = self._fused_adapter(args, kwargs)
            if fused is None:
                return super().forward(x, *args, **kwargs)
            lora_a, lora_b, scaling = fused
            result = self.base_layer(x)
            dtype = result.dtype  # the base's, or autocast's
            p = _dropout_p(lora_a)
            group = self.__dict__.get("_llara_input_group")
            with torch.autocast(x.device.type, enabled=False):
                h = group.rank_product(self, x, dtype, p) if group is not None else None
                if h is None:
                    h = dropped_rank_product(x.to(dtype), lora_a.weight.to(dtype), p)
                return _AddAdapter.apply(result, h, lora_b.weight.to(dtype), float(scaling))

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


def _group_inputs(peft_model: nn.Module, shared_inputs) -> int:
    """Joins the fused adapters of each module named in one of ``shared_inputs`` (tuples of leaf names
    of projections that read the same input) into an :class:`_InputGroup`; returns how many groups."""
    fused, groups = _fused_lora_linear_class(), 0
    for module in peft_model.modules():
        for names in shared_inputs:
            members = [m for n in names if type(m := getattr(module, n, None)) is fused]
            if len(members) > 1:
                group = _InputGroup(members)
                for m in members:
                    m.__dict__["_llara_input_group"] = group
                groups += 1
    return groups


def swap_layers(peft_model: nn.Module, shared_inputs=()) -> dict[str, int]:
    """Installs this module's layers in a peft LoRA model (in place); returns how many of each.
    ``shared_inputs``: tuples of leaf names of projections that read the same input
    (``ArchSpec.shared_input_projections``): their adapters share one mask and one A product."""
    return {"dropout_in_projection": _dropout_into_projections(peft_model),
            "fused_adapters": _fuse_adapters(peft_model),
            "input_groups": _group_inputs(peft_model, shared_inputs),
            "rows_trainable_tokens": _row_trainable_tokens(peft_model)}
