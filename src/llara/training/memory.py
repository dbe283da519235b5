"""Memory plans: how much a training step will hold, and the cheapest way to make it fit.

A step holds the weights, the trainable parameters' gradients and AdamW states (``fixed``), and the
activations that backward needs, which grow with the tokens of one forward pass with a graph.
Two knobs trade compute for memory: gradient checkpointing (keep one hidden state per layer and
recompute the rest in backward: ~1/3 more compute) and, for contrastive fine-tuning, GradCache
(embed the whole batch without graphs, then backpropagate it a chunk at a time: one more forward).
Both cost time, so a plan turns them on only when the step would not fit otherwise.

The activation estimate follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), counted for a LLaMA-style layer (RMSNorm in fp32, SwiGLU MLP with
``intermediate_size``, rotary q/k) plus the LoRA dropout copies of each adapted projection's input.
Checked against a measured run: a LLaMA-2-7B shape, LoRA r64, bf16, 8 x 510 tokens, no
checkpointing, peaked at 45.5 GiB on an H200 (75.7 GiB at batch 16); this estimate gives 47.2 GiB
(78.8 GiB): about 4% high, on the safe side.

The budget is ``memory_gb`` when set; otherwise 90% of the GPU's free memory (plus what this process
already reserved there), or on a CPU the smaller of 60% of the available RAM (plus this process's
resident memory) and :data:`CPU_DEFAULT_BUDGET_GB` (7 GiB = 7.5 GB: so that every default command
fits in 8 GB of resident memory).

On a CPU the counts are calibrated against the peak resident memory of LoRA steps of the embedded
SmolLM2-135M (bf16 autocast over fp32 weights; ``benchmarks/cpu_train.py``): a plain step leaves 4.7
bytes per counted element (8 queries of 64 tokens + 16 passages of 96: 6.19 GiB peak, 0.72 of it
before the step; 4 x 64 + 12 x 160: 6.61 GiB), a GradCache chunk 6.0 (chunks of 8 x 160 tokens: 5.41
GiB): its many smaller passes leave the allocator holding more than their largest graph
(``chunk_factor``). On a CPU without fast bf16 llara trains in fp32, and the same plain step peaked at
8.51 GiB (an AVX2-only AMD EPYC): 6.8 bytes per counted element. Since the adapters' dropout keeps a
1-byte mask instead of a dropped fp32 copy of each adapter's input (``lora_dropout.CpuDropoutLinear``) it peaked at
7.61 GiB (6.0 bytes per element), and since each adapter's product accumulates into the base
projection's output (``lora_layers._AddAdapter``: no product and sum over the output per adapter) at 6.12 GiB
(7 steps at exactly 8 x 64 + 16 x 96 tokens): 4.8 bytes per element. Packed (``llara.modeling.packing``),
the steps' shapes differ from step to step and glibc's heap keeps its high-water mark: the same step
rose to 6.67 GiB by step 10 and stayed there to step 20 (6.76 in another run of 10 steps, where the
padded layout reached 6.06): 5.4 bytes per element, still within the 7 GiB default budget, so the
plan runs the recipe's step whole. (The bf16 figures were measured before both changes and now
overestimate; not re-measured: this machine has no bf16 kernels.)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CPU_DEFAULT_BUDGET_GB", "MemoryPlan", "StepShape", "available_bytes", "budget_bytes", "choose_chunk",
           "peak_memory_gb", "plan_for"]

GiB = 2**30
CPU_DEFAULT_BUDGET_GB = 7.0


def available_bytes(device: torch.device | str) -> int:
    """Free memory of ``device``: the GPU's free bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return int(CPU_DEFAULT_BUDGET_GB * GiB)


def budget_bytes(device: torch.device | str, memory_gb: float = 0.0) -> int:
    """The memory a step may use: ``memory_gb`` when > 0, else the default of the module docstring."""
    if memory_gb and memory_gb > 0:
        return int(memory_gb * GiB)
    device = torch.device(device)
    # What this process already holds (the loaded model) counts as usable: the plan counts the weights.
    if device.type == "cuda":
        return int(0.9 * (available_bytes(device) + torch.cuda.memory_reserved(device)))
    return int(min(0.6 * (available_bytes(device) + _rss_bytes()), CPU_DEFAULT_BUDGET_GB * GiB))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak memory of this process so far: allocated by PyTorch on a GPU, resident (RSS) on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / GiB, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 3)  # Linux: KiB


def _shape(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), None)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise ValueError(f"{type(model).__name__}: no hidden_size in its config, cannot plan memory")
    return {"hidden": int(hidden), "layers": int(get("num_hidden_layers", "n_layer") or 1),
            "heads": int(get("num_attention_heads", "n_head") or 1),
            "intermediate": int(get("intermediate_size", "n_inner") or 4 * hidden)}


@dataclass(frozen=True)
class StepShape:
    """The largest forward pass with a graph in a training step: ``tokens`` in sequences of ``seq``;
    ``chunked`` when it is a GradCache chunk, ``choice`` what the caller chose, in words (logged)."""

    tokens: int
    seq: int
    chunked: bool = False
    choice: str = ""


@dataclass
class MemoryPlan:
    """Bytes of one step: ``fixed`` (weights, gradients, AdamW states) + activations of ``tokens``
    tokens of sequences of ``seq`` tokens (see :meth:`activations`)."""

    budget: int
    fixed: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    act_bytes: float  # bytes per stored activation element (2: bf16, 4: fp32; mixed: in between)
    lora: bool
    math_attention: bool  # attention scores kept for backward (the math kernel), not a fused kernel
    chunk_factor: float = 1.0  # activations of a GradCache chunk against a plain step's of the same tokens

    def per_token_layer(self, seq: int) -> float:
        """Bytes of activations one token leaves in one layer for backward."""
        h, i = self.hidden, self.intermediate
        elems = 16 * h + 3 * i  # norms (fp32 copies), q/k/v/o inputs and outputs, rotary, MLP gate/up/act/product
        if self.lora:
            elems += 5 * h + i  # each adapted projection's dropped-out input and its mask
        if self.math_attention:
            elems += 2.5 * self.heads * seq  # softmax input/output and dropout-free mask per head
        return elems * self.act_bytes

    def activations(self, tokens: int, seq: int, checkpointing: bool) -> int:
        per_layer = self.per_token_layer(seq) * tokens
        if checkpointing:  # one hidden state per layer is kept; one layer is recomputed at a time
            return int(self.layers * tokens * self.hidden * self.act_bytes + 2 * per_layer)
        return int(self.layers * per_layer)

    def need(self, tokens: int, seq: int, checkpointing: bool, chunked: bool = False) -> int:
        """Bytes of a step whose largest graph holds ``tokens``; ``chunked``: a GradCache chunk's."""
        return self.fixed + int(self.activations(tokens, seq, checkpointing) * (self.chunk_factor if chunked else 1))

    def fits(self, tokens: int, seq: int, checkpointing: bool, chunked: bool = False) -> bool:
        return self.need(tokens, seq, checkpointing, chunked) <= self.budget

    def checkpointing(self, tokens: int, seq: int, requested: bool | str = "auto", chunked: bool = False) -> bool:
        """The gradient-checkpointing choice: as requested, or ('auto') only when the step does not fit."""
        if requested != "auto":
            return bool(requested)
        return not self.fits(tokens, seq, False, chunked)

    def describe(self, tokens: int, seq: int, checkpointing: bool, chunked: bool = False) -> str:
        return (f"~{self.need(tokens, seq, checkpointing, chunked) / GiB:.1f} GiB of a {self.budget / GiB:.1f} GiB budget "
                f"(weights and optimizer {self.fixed / GiB:.1f} GiB, activations of {tokens} tokens x {seq}"
                f"{', checkpointed' if checkpointing else ''})")


def plan_for(model: nn.Module, device: torch.device | str, *, precision: str, lora: bool,
             memory_gb: float = 0.0, math_attention: bool | None = None) -> MemoryPlan:
    """A :class:`MemoryPlan` for training ``model`` (before LoRA is applied) on ``device``."""
    device = torch.device(device)
    shape = _shape(model)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    on_gpu = device.type == "cuda"
    if lora:
        # Frozen base: bf16 on a GPU under bf16, otherwise as loaded; adapters and token rows ~1-2% of
        # the base at r 64 for a 7B model, counted generously with their gradient and two AdamW states.
        base_bytes = 2 if (on_gpu and precision == "bf16") else max(p.element_size() for p in params)
        trainable = 0.03 * n_all
        fixed = n_all * base_bytes + trainable * 4 * 4
    else:
        fixed = n_all * 4 * 4  # fp32 weights, gradients and two AdamW states
    # bf16 on a GPU: everything in bf16. On a CPU, autocast over the fp32 weights keeps fp32 inputs
    # (norms, residual stream, LoRA dropout in fp32 adapters) beside their bf16 copies for the products:
    # LoRA steps measured 4.7 bytes per counted element, GradCache chunks 6.0 (module docstring); full
    # fine-tuning keeps 5.5 (an earlier calibration, not re-measured since).
    # In fp32 (a CPU without fast bf16) the products' saved inputs are fp32 too: the same LoRA step
    # measured 6.12 GiB with the 1-byte dropout masks and the fused adapters (4.8 per element; 8.51 / 6.8
    # and 7.61 / 6.0 before them), 6.76 packed (5.4: steps of varying shapes), the chunk factor is assumed
    # unchanged; full fine-tuning with checkpointing measured within 3% of the 5.5 estimate in fp32 as well.
    if on_gpu:
        act_bytes, chunk_factor = (2.0 if precision == "bf16" else 4.0), 1.0
    elif lora:
        act_bytes, chunk_factor = (4.7 if precision == "bf16" else 5.4), 6.0 / 4.7
    else:
        act_bytes, chunk_factor = 5.5, 1.0
    if math_attention is None:
        math_attention = not on_gpu
    return MemoryPlan(budget=budget_bytes(device, memory_gb), fixed=int(fixed), act_bytes=act_bytes, lora=lora,
                      math_attention=math_attention, chunk_factor=chunk_factor, **shape)


def choose_chunk(plan: MemoryPlan, batch_sequences: int, seq: int, tokens_whole: int,
                 checkpointing: bool = False) -> int:
    """GradCache chunk (in sequences) for a contrastive step of ``batch_sequences`` sequences that
    together hold ``tokens_whole`` tokens (the longest side's length ``seq``): 0 (a plain step) when
    the whole batch's graph fits, else the largest power of two whose chunk graph fits (at least 1)."""
    if plan.fits(tokens_whole, seq, checkpointing):
        return 0
    chunk = 1
    while chunk * 2 < batch_sequences and plan.fits(chunk * 2 * seq, seq, checkpointing, chunked=True):
        chunk *= 2
    return chunk
