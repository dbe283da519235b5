"""Each layer's position-wise work only at the rows that matter.

An embedding reads the final states at a few positions of each text (LLaRA's eight slots, or the last
token): the last layer's output everywhere else is computed and thrown away. Pad positions (a packed
row's free tail, the right padding of a batch) are computed in every layer, and nothing attends to
them. A layer's attention must still read all its real positions, but what comes after it acts on each
position alone: the output projection and the MLP (``ArchSpec.position_wise_modules``), 84% of a
LLaMA layer's products. Here they run at the real tokens' rows in every layer and at the read rows in
the last: a forward pre-hook gathers their input rows, a forward hook scatters their output back into
zeros of the full shape, so the stock model code runs unchanged and its residual adds and norms see
the shapes they expect.

At real positions the states are those of the full pass up to the last layer, and at the read
positions the final states are (same products on the same rows; the tests compare them, with their
gradients, on the tiny models); elsewhere they are not the model's and must not be read. A layer
checkpointed in training is never sliced: its recomputation in backward runs without these hooks, and
GradCache's two passes over a chunk (one without gradients) must draw the same dropout masks, so both
run it whole. On ``llara recipe``'s step of the embedded model (30 layers; 8 slots read of each ~80
tokens; 4% of the packed positions pad) a LoRA training step runs 3.7% faster
(``benchmarks/results/cpu_train_fp32.md``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["flat_positions", "read_rows", "rows_read_by"]


def rows_read_by(index: Tensor, weight: Tensor | None = None) -> Tensor:
    """The flat positions a pooling reads, sorted and unique: ``index`` holds flat positions, and with
    ``weight`` (same shape) only those of a non-zero weight count. Built on the host with the batch
    (on a GPU the unique would make the host wait)."""
    if weight is not None:
        index = index[weight != 0]
    return torch.unique(index.reshape(-1))


def flat_positions(mask: Tensor) -> Tensor:
    """The flat positions where ``mask`` (B, L) is non-zero, sorted: a padding mask's real tokens, or
    the positions any pooling weight reads."""
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


def _layers(base: nn.Module) -> list[nn.Module]:
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


@contextmanager
def read_rows(base: nn.Module, positions: int, read: Tensor | None = None, live: Tensor | None = None
              ) -> Iterator[None]:
    """Within this block a forward of ``base`` (the decoder stack, ``embed.base_model``) over
    ``positions`` = batch x length positions runs the position-wise modules of its layers
    (``ArchSpec.position_wise_modules``) at the rows that matter only: those of the last layer at
    ``read`` (flat positions the caller reads, unique), those of the layers before at ``live`` (the
    flat positions of real tokens: no pad). Either may be None (every position); both on the model's
    device. The final states at positions outside ``read`` are then not the model's, and neither are
    the states of pad positions: nothing may attend to them (packed rows' tails, masked padding)."""
    from .arch import ARCHITECTURES

    layers = _layers(base)
    config = getattr(base, "config", None)
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    width = getattr(config, "hidden_size", 0)
    plan = []
    if layers and spec is not None:
        for i, layer in enumerate(layers):
            rows = read if (i == len(layers) - 1 and read is not None) else live
            if rows is None or rows.numel() >= positions or (getattr(layer, "gradient_checkpointing", False)
                                                             and layer.training):
                continue
            for name in spec.position_wise_modules:
                try:
                    module = layer.get_submodule(name)
                except AttributeError:
                    continue
                if _pays(module, positions - rows.numel(), positions, width):
                    plan.append((module, rows))
    handles = []
    try:
        for module, rows in plan:
            gather, scatter = _hooks(rows, positions)
            handles.append(module.register_forward_pre_hook(gather))
            handles.append(module.register_forward_hook(scatter))
        yield
    finally:
        for h in handles:
            h.remove()


COPY_COST = 50
"""Multiply-adds of a module's products per element its gather and scatter copy, where the two cost
about the same: an estimate for the 2-core AVX2 EPYC of ``benchmarks/results/cpu_train_fp32.md``
(~6 passes over a (positions, width) tensor in forward and backward against products at ~170
GFLOP/s), checked there on the recipe's step: with it 0.3-1.2% faster than slicing every module
(``benchmarks/read_rows_step.py 9 0.1 cost``)."""


def _pays(module: nn.Module, dropped: int, positions: int, width: int) -> bool:
    """Whether running ``module`` at ``positions - dropped`` rows saves more than its gather and scatter
    cost: the products saved (its parameters x the rows dropped) against ``COPY_COST`` x the elements
    copied (its input and output, ``width`` each, at every position). The last layer's output
    projection and MLP pay with 90% of their rows unread; with a packed step's ~5% of pad rows the
    embedded model's MLP pays (it breaks even at ~2%) and its output projection does not (~14-17%)."""
    params = sum(p.numel() for p in module.parameters())
    return dropped > 0 and dropped * params >= COPY_COST * positions * 2 * width


def _hooks(rows: Tensor, positions: int):
    """A forward pre-hook that gathers a module's input rows and a forward hook that scatters its
    output back into zeros of the full shape."""
    lead = {}

    def gather(module, args):
        x = args[0] if len(args) == 1 else None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[:-1].numel() != positions:
            return None
        lead[module] = x.shape[:-1]
        return (x.reshape(positions, x.shape[-1]).index_select(0, rows).unsqueeze(0),)

    def scatter(module, args, out):
        shape = lead.pop(module, None)
        if shape is None:
            return None
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(module).__name__} is listed in ArchSpec.position_wise_modules but "
                            f"returns {type(out).__name__}, not one tensor")
        flat = out.reshape(rows.numel(), out.shape[-1])
        full = torch.zeros(positions, flat.shape[-1], dtype=flat.dtype, device=flat.device)
        return full.index_copy_(0, rows, flat).view(*shape, flat.shape[-1])

    return gather, scatter
