"""The adapters' dropout on a CPU, for :mod:`llara.training.lora_layers` (``benchmarks/results/cpu_train_fp32.md``):

* :func:`cpu_keep_mask`: a 1-byte dropout mask from a quarter of the random draws, large ones drawn in
  two halves at once;
* :class:`_DroppedProjection`: ``dropout(x) @ A.T`` that keeps the mask and the dropped input for
  backward, and :func:`dropped_rank_product`, which runs it on a CPU and ``nn.functional.dropout`` elsewhere;
* :class:`CpuDropoutLinear`: an adapter's A projection with its dropout inside, for the cases that run
  peft's own forward.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

__all__ = ["CpuDropoutLinear", "cpu_keep_mask", "dropped_rank_product"]


def cpu_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask for ``x`` (bool, True = kept) and the scale of the kept values, for a CPU.

    A CPU draws dropout masks from one mt19937 number per element (``bernoulli_``), slower than
    the adapters' own matmuls: it was 29% of a LoRA fine-tuning step of the embedded model (batch
    8 x 2 passages, 96 tokens; ``benchmarks/results/cpu_train.md``). Here each 64-bit draw gives four
    16-bit numbers, each compared with a threshold: the drop probability is ``p`` rounded to a
    multiple of 1/65536, and the kept values are scaled by the exact inverse of the keep probability
    (unbiased, as ``nn.Dropout``). Masks follow torch's global generator (seeded, checkpointed); large
    ones are drawn from a faster generator seeded by it, in two halves at once (:func:`_fill_keep`)."""
    drop = round(p * 65536)
    if drop >= 65536:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device), 0.0
    n, scale, threshold = x.numel(), 65536 / (65536 - drop), drop - 32768  # on signed 16-bit numbers
    if x.device.type == "cpu" and (n + 3) // 4 >= _FAST_WORDS:
        keep = torch.empty(x.shape, dtype=torch.bool)
        _fill_keep(keep.view(-1).numpy(), threshold)
        return keep, scale
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    return words.view(torch.int16)[:n].view(x.shape) >= threshold, scale


_FAST_WORDS = 1 << 15  # from here on numpy's SFC64 (torch's own draw is quicker below ~12k words: seeding SFC64 costs ~30 us)
_helper: dict[int, ThreadPoolExecutor] = {}  # pid -> the one helper thread (a forked child makes its own)


def _fill_keep(out: np.ndarray, threshold: int) -> None:
    """Fills a flat bool array with ``16-bit uniform >= threshold``. torch draws random integers on a
    CPU from mt19937, one number after another on one thread: most of the dropout masks' cost in a
    LoRA step of the embedded model. Here two seeds come from torch's global generator (so masks
    follow its seed and checkpointed state) and each fills one half of the mask from numpy's SFC64
    (the small fast generator of PractRand's author; numpy keeps its stream fixed for a given seed),
    the second half on a helper thread (numpy draws and compares without the GIL): a 1920 x 576 mask
    in 0.55 ms against 1.1-1.4 ms drawn on one thread, 1920 x 1536 in 1.2 against 2.6-3.1 ms (the
    2-core AVX2 EPYC of ``benchmarks/results/cpu_train_fp32.md``; torch's own draw split over two
    threads was slower still). The halves and their seeds do not depend on the number of cores."""
    half = (len(out) // 2 + 3) // 4 * 4  # whole 64-bit words on each side
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()
    helper = _helper.get(os.getpid())
    if helper is None:
        helper = _helper[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="llara-dropout")
    other = helper.submit(_fill_from_seed, out[half:], seeds[1], threshold)
    _fill_from_seed(out[:half], seeds[0], threshold)
    other.result()


def _fill_from_seed(out: np.ndarray, seed: int, threshold: int) -> None:
    if len(out):
        words = np.random.SFC64(seed).random_raw((len(out) + 3) // 4)
        np.greater_equal(words.view(np.int16)[:len(out)], threshold, out=out)


class _DroppedProjection(torch.autograd.Function):
    """``(x * keep * scale) @ weight.T`` that keeps the 1-byte mask and, for backward's weight
    gradient, the dropped input: no other op of the step keeps a projection's own input (the base
    projection is frozen; the norm's and the MLP's products keep their inputs), so backward does not
    recompute it. Where ``x`` is a view of another tensor (o_proj's input is a view of what SDPA
    returns and keeps for its own backward) it keeps ``x`` instead and recomputes the dropped input:
    no second copy. The scale multiplies the small weight (and the weight's gradient), not the
    activations."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, keep, scale: float):
        dropped = x * _bytes(keep)
        ctx.recompute = x._base is not None
        ctx.save_for_backward(x if ctx.recompute else dropped, weight, keep)
        ctx.scale = scale
        return nn.functional.linear(dropped, weight * scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        kept, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ (weight * ctx.scale).to(grad.dtype)).mul_(_bytes(keep)).to(kept.dtype)
        if ctx.needs_input_grad[1]:
            g = grad.reshape(-1, grad.shape[-1])
            dropped = kept * _bytes(keep) if ctx.recompute else kept
            d = dropped.reshape(-1, dropped.shape[-1]).to(g.dtype)
            # As (d^T g)^T: MKL runs this long, thin product (rows of the step x rank r) at 109-148
            # against 88-133 GFLOP/s for g^T d on the 2-core EPYC (r x inputs of 64 x 1536 to 192 x 576).
            grad_w = (d.t() @ g).t().contiguous().to(weight.dtype).mul_(ctx.scale)
        return grad_x, grad_w, None, None


def _bytes(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (a view): a float tensor times uint8 runs vectorised, times bool through a
    scalar cast loop, 4x slower on an AVX2 CPU (0.21 against 0.80 ms for 1536 x 576)."""
    return keep.view(torch.uint8)


def dropped_rank_product(x: torch.Tensor, weight_a: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p) @ A.T`` as the fused path runs it: on a CPU with a 1-byte mask
    (:func:`cpu_keep_mask`, :class:`_DroppedProjection` keeps ``x`` and the mask), elsewhere
    ``nn.functional.dropout``; ``x`` and ``A`` share one dtype (the caller casts)."""
    if not p:
        return nn.functional.linear(x, weight_a)
    if x.device.type != "cpu":
        return nn.functional.linear(nn.functional.dropout(x, p, True), weight_a)
    keep, drop_scale = cpu_keep_mask(x, p)
    return _DroppedProjection.apply(x, weight_a, keep, drop_scale)


class CpuDropoutLinear(nn.Linear):
    """An adapter's A projection with its input dropout inside (peft's ``lora_A`` after
    :func:`llara.training.lora.apply_lora`, which sets the adapter's own ``lora_dropout`` to identity).

    On a CPU in training it draws the mask with :func:`cpu_keep_mask` (a quarter of the random draws)
    and keeps that 1-byte mask and the dropped input for backward (:class:`_DroppedProjection`).
    peft's ``lora_A(dropout(x))`` keeps a mask and a dropped fp32 copy for each of a layer's seven
    adapters; on ``llara recipe``'s step of the embedded model in fp32 that step peaked at 8.6 GB,
    6.4 GB without dropout, 7.5 GB with this layer (``benchmarks/results/cpu_train_fp32.md``), less
    where the fused path keeps one per input group (``lora_layers._InputGroup``). Same parameters and
    state-dict keys as ``nn.Linear``; elsewhere (eval, other devices, a bias) it is
    ``nn.Dropout`` then ``nn.Linear``, as peft runs it. Where the adapter runs fused
    (``lora_layers``, the usual case) its ``p`` is read there and this forward is not
    called; it serves peft's own forward (merged, disabled, several adapters)."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return super().forward(nn.functional.dropout(x, self.p, self.training))
        return dropped_rank_product(x, self.weight, self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"
