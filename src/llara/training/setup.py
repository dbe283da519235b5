"""The pieces the training loop (``loop.py``) is set up from: precision, the accelerator, the model
(LoRA, gradient checkpointing, trainable token rows), optimizer, scheduler, the number of steps, and
the small helpers of a step (moving a batch to the device, averaging gradients across processes)."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .lora import apply_lora, is_peft_model
from .stream import batches_per_epoch

logger = logging.getLogger(__name__)

_BUCKET_ELEMENTS = 1 << 25  # gradients averaged in flat buffers of at most 32M elements


def resolve_precision(config: TrainConfig) -> str:
    """'bf16' or 'fp32'. auto: bf16 on a CUDA device that supports it, and on a CPU whose matmul
    units run bf16 faster than fp32 (measured once, see ``modeling/precision.py``); fp32 otherwise."""
    from ..modeling.precision import resolve_precision as resolve

    return resolve(config.precision, on_cpu=config.cpu or not torch.cuda.is_available())


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

    from accelerate.state import AcceleratorState, PartialState

    precision = resolve_precision(config)
    mixed = "bf16" if precision == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed and PartialState().num_processes == 1:
        # A second run in the same process with another precision (notebooks, tests): accelerate
        # keeps its state process-wide and refuses the change unless it is reset.
        AcceleratorState._reset_state(reset_partial_state=False)
    plugin = GradientAccumulationPlugin(num_steps=config.grad_accum, adjust_scheduler=False,
                                        sync_with_dataloader=False)
    return Accelerator(
        mixed_precision=mixed,
        cpu=config.cpu or not torch.cuda.is_available(),
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )


def lora_dtype(config: TrainConfig, precision: str, device_type: str) -> torch.dtype:
    """The adapters' dtype: bf16 beside a bf16 base on a GPU under 'auto' (so that no weight is cast
    in a step: peft would otherwise cast every adapted projection's bf16 input to fp32 and back),
    fp32 on a CPU (whose base stays fp32) or when asked."""
    if config.lora_dtype == "bf16" or (config.lora_dtype == "auto" and precision == "bf16" and device_type != "cpu"):
        return torch.bfloat16
    return torch.float32


def prepare_model(model: nn.Module, config: TrainConfig, trainable_token_ids: Sequence[int] | None = None,
                  precision: str = "fp32", device_type: str = "cpu", *,
                  checkpointing: bool | None = None) -> nn.Module:
    """Gradient checkpointing, LoRA, train mode.

    checkpointing: the caller's decision (e.g. from a memory plan, see ``memory.py``); None: the
    config's ``gradient_checkpointing`` when it is True or False, off when it is 'auto'.

    LoRA under bf16 on a GPU casts the frozen base to bf16 (half its memory) and, by default
    (``lora_dtype='auto'``), creates the adapters in bf16 too: base, adapters and activations share
    one dtype, so a step casts no weight. On a CPU the base stays fp32 and autocast runs the products
    in bf16: with a bf16 base the residual stream is bf16 too, and that cost 0.027 nDCG@10 on average
    after 24 fine-tuning steps of the embedded model against fp32 training, while autocast over the
    fp32 base scored +0.005 and ran at 1.49x fp32's tokens/s (benchmarks/results/precision.md)."""
    if checkpointing is None:
        checkpointing = config.gradient_checkpointing is True
    if checkpointing:
        # Non-reentrant checkpointing needs no input gradients (frozen embeddings under LoRA).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if config.lora and not is_peft_model(model):
        if precision == "bf16" and device_type != "cpu":
            model.to(torch.bfloat16)  # frozen base in bf16
        model = apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            trainable_token_ids=trainable_token_ids,
            trainable_tokens=config.trainable_tokens,
            dtype=lora_dtype(config, precision, device_type),
        )
    elif not config.lora:
        low = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype != torch.float32}
        if low:
            logger.warning("full fine-tuning with %s weights: AdamW updates below their resolution are lost; "
                           "load the model in fp32 (bf16 autocast still applies) or use DeepSpeed", low)
    model.train()
    return model


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norm weights, token rows."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "trainable_tokens" in name else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = {"lr": config.lr, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps}
    # The fused kernel updates every tensor in one pass: ~6x faster than the foreach path on a CPU,
    # where the optimizer step of a full fine-tuning is a sizeable part of the training step.
    if all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"]):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:  # an older torch or an unsupported layout
            logger.debug("fused AdamW unavailable (%s): using the default implementation", e)
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, num_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * num_steps)
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)


def total_steps(config: TrainConfig, data: Iterable, world: int = 1) -> int:
    """Optimizer steps of the run: max_steps, or what ``epochs`` passes give (the smaller if both)."""
    steps = config.max_steps
    if config.epochs is not None:
        n = batches_per_epoch(data)
        if n is None:
            if steps is None:
                raise ValueError("epochs without max_steps needs data with a length (len(data)); set max_steps")
        else:
            by_epochs = (n // world) * config.epochs // config.grad_accum
            if by_epochs < 1:
                raise ValueError(f"{n} batches per epoch on {world} processes make no optimizer step "
                                 f"with grad_accum={config.grad_accum}")
            steps = by_epochs if steps is None else min(steps, by_epochs)
    return int(steps)


def to_device(batch: Any, device: torch.device) -> Any:
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def average_gradients(model: nn.Module, world: int) -> None:
    """Mean of every gradient over the processes (what DDP does during backward), for loss
    functions that run backward themselves outside the DDP wrapper."""
    import torch.distributed as dist

    def flush(bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    bucket: list[torch.Tensor] = []
    size = 0
    for p in model.parameters():
        if p.grad is None:
            continue
        if bucket and (size + p.grad.numel() > _BUCKET_ELEMENTS or p.grad.dtype != bucket[0].dtype):
            flush(bucket)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.grad.numel()
    if bucket:
        flush(bucket)


def is_number(v: Any) -> bool:
    return (isinstance(v, torch.Tensor) and v.numel() == 1) or (isinstance(v, (int, float)) and not isinstance(v, bool))
