"""The training loop shared by ``llara pretrain`` and ``llara finetune``.

What is trained is decided by the caller: a Hugging Face causal LM (slot tokens already added), a
DataLoader (or any iterable of collated batches; see ``stream.py`` for the optional
``set_epoch``/``skip`` contract) and a loss function::

    compute_loss(model, batch) -> {"loss": scalar tensor with graph,
                                   "<name>": float or 0-d tensor, ...   # logged, averaged
                                   "num_tokens": int}                   # optional, for tokens/s

``compute_loss`` receives the unwrapped model (the Hugging Face model or its peft wrapper) and runs
inside the forward of a small module that accelerate wraps (DDP / DeepSpeed / FSDP), so it may call
``model.model(...)`` and use ``model.lm_head.weight`` directly and gradients are still synchronised.

A loss function with the attribute ``manual_backward = True`` (GradCache-style steps that need
several forward/backward passes per batch) runs backward itself, scaled by ``1 / grad_accum``, and
returns a detached loss. It is called outside the DDP wrapper, and the loop averages the gradients
across processes before the optimizer step (DDP only; not with DeepSpeed / FSDP).

One optimizer step = ``grad_accum`` micro-batches per process; the logged loss is the mean over
micro-batches and processes. The run stops at ``max_steps`` or after ``epochs`` passes over the data.

Distributed runs go through ``accelerate``: ``accelerate launch --num_processes N script.py`` (DDP;
gloo with ``--cpu``), or a DeepSpeed / FSDP config made with ``accelerate config`` (examples in
``configs/``: ``accelerate_deepspeed_zero1.yaml`` for the paper's 7B setting, ``accelerate_fsdp.yaml``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from ..modeling.precision import training_kernels
from .config import TrainConfig
from .export import export_model
from .logging_utils import JsonlLog, Progress
from .lora import apply_lora, is_peft_model
from .plot import plot_log
from .stream import BatchStream, batches_per_epoch

logger = logging.getLogger(__name__)

__all__ = [
    "LOG_FILE",
    "PLOT_FILE",
    "LossFn",
    "LossModule",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "make_accelerator",
    "prepare_model",
    "resolve_precision",
    "total_steps",
    "train",
]

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
TOKENS_KEY = "num_tokens"
_BUCKET_ELEMENTS = 1 << 25  # gradients averaged in flat buffers of at most 32M elements

LossFn = Callable[[nn.Module, Any], Mapping[str, Any]]


class LossModule(nn.Module):
    """``forward(batch) = compute_loss(model, batch)``: the whole loss runs inside one forward of
    the module accelerate wraps, whatever ``compute_loss`` does with the model."""

    def __init__(self, model: nn.Module, compute_loss: LossFn):
        super().__init__()
        self.model = model
        self.compute_loss = compute_loss

    def forward(self, batch: Any) -> Mapping[str, Any]:
        out = self.compute_loss(self.model, batch)
        if not isinstance(out, Mapping) or "loss" not in out:
            raise TypeError("compute_loss must return a mapping with a 'loss' tensor")
        return out


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (Hugging Face or peft), unwrapped, in eval mode
    step: int
    epoch: int
    last_loss: float | None
    checkpoint: Path | None  # the last checkpoint written (None on non-main processes)
    export_dir: Path | None
    log_path: Path
    plot_path: Path | None


# --------------------------------------------------------------------------- setup pieces
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


def prepare_model(model: nn.Module, config: TrainConfig, trainable_token_ids: Sequence[int] | None = None,
                  precision: str = "fp32") -> nn.Module:
    """Gradient checkpointing, LoRA (base weights in bf16 under bf16 precision), train mode."""
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients (frozen embeddings under LoRA).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if config.lora and not is_peft_model(model):
        if precision == "bf16":
            model.to(torch.bfloat16)  # frozen base in bf16; adapters stay fp32 (autocast in forward)
        model = apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            trainable_token_ids=trainable_token_ids,
            trainable_tokens=config.trainable_tokens,
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


def _to_device(batch: Any, device: torch.device) -> Any:
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def _average_gradients(model: nn.Module, world: int) -> None:
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


def _is_number(v: Any) -> bool:
    return (isinstance(v, torch.Tensor) and v.numel() == 1) or (isinstance(v, (int, float)) and not isinstance(v, bool))


# --------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    tokenizer,
    data: Iterable,
    compute_loss: LossFn,
    config: TrainConfig,
    *,
    template=None,
    trainable_token_ids: Sequence[int] | None = None,
    accelerator=None,
    export_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``compute_loss``; see the module docstring.

    trainable_token_ids: token ids whose embedding rows must train under LoRA (the slot tokens).
    template: recorded in the export's ``llara.json`` (a Template or a built-in name).
    accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
    """
    from accelerate.utils import DistributedType, set_seed

    own_accelerator = accelerator is None
    acc = accelerator or make_accelerator(config)
    acc.gradient_accumulation_steps = config.grad_accum
    precision = resolve_precision(config)
    out_dir = Path(config.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    ckpt = resolve_resume(config.resume, out_dir)
    if config.resume and ckpt is None:
        logger.info("no checkpoint in %s: starting a new run", out_dir)
    if ckpt is None and list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} holds checkpoints of an earlier run: pass resume=True to continue it, "
                              "or use another output_dir")
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        diff = config.differences(saved.get("config", {}))
        if diff:
            logger.warning("resuming with changed options (now, before): %s", diff)

    set_seed(config.seed)
    token_ids = sorted({int(i) for i in trainable_token_ids or ()})
    if config.lora and not token_ids and not is_peft_model(model):
        logger.warning("LoRA without trainable_token_ids: added tokens (the slots) keep their initial embeddings")
    model = prepare_model(model, config, token_ids, precision)
    optimizer = build_optimizer(model, config)
    num_steps = total_steps(config, data, acc.num_processes)
    scheduler = build_scheduler(optimizer, config, num_steps)
    manual = bool(getattr(compute_loss, "manual_backward", False))
    if manual and acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise RuntimeError("loss functions with manual_backward need DDP or a single process, "
                                  f"not {acc.distributed_type}")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin
        if ds.is_auto("train_micro_batch_size_per_gpu"):
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    wrapped, optimizer = acc.prepare(LossModule(model, compute_loss), optimizer)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "examples_in_epoch": 0, "examples": 0, "tokens": 0,
                             "elapsed_s": 0.0}
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, acc, model, optimizer, scheduler))
    log = JsonlLog(out_dir / LOG_FILE)
    if acc.is_main_process:
        log.truncate_after(state["step"])  # drops steps logged after the checkpoint (or an old log)

    stream = BatchStream(data, rank=acc.process_index, world=acc.num_processes, seed=config.seed,
                         epoch=state["epoch"], examples=state["examples_in_epoch"], consumed=state["examples"])
    stream.start()
    if ckpt is not None:
        # After positioning the data: creating an iterator may draw from the global generator.
        restore_rng(ckpt, acc.process_index)

    logger.info("training %d steps (from %d): %d process(es), %d micro-batches of %d per step, %s, %s",
                num_steps, state["step"], acc.num_processes, config.grad_accum, config.batch_size, precision,
                "LoRA" if is_peft_model(model) else "full")
    progress = Progress(num_steps, state["step"], enabled=config.progress and acc.is_main_process)
    acc.step = 0  # accelerate's micro-batch counter decides when gradients are synchronised
    wrapped.train()
    session_start = time.perf_counter()
    elapsed_before = float(state["elapsed_s"])
    step_start = session_start
    last_loss: float | None = None
    last_ckpt: Path | None = ckpt
    saved_step = state["step"] if ckpt is not None else None

    def checkpoint() -> None:
        nonlocal last_ckpt, saved_step
        full_state = {**state, "total_steps": num_steps, "world_size": acc.num_processes,
                      "trainable_token_ids": token_ids, "llara_version": __version__, "config": config.to_dict()}
        last_ckpt = save_checkpoint(acc, model, optimizer, scheduler, tokenizer, config, full_state,
                                    out_dir, keep_last=config.keep_last)
        saved_step = state["step"]
        if acc.is_main_process:
            plot_log(out_dir / LOG_FILE, out_dir / PLOT_FILE)

    kernels = training_kernels(precision, on_cpu=acc.device.type == "cpu")
    kernels.__enter__()
    try:
        while state["step"] < num_steps:
            sums: dict[str, torch.Tensor | float] = {}
            tokens = 0
            grad_norm = None
            micro = 0
            for _ in range(config.grad_accum):
                batch = stream.next(config.epochs)
                if batch is None:
                    break
                batch = _to_device(batch, acc.device)
                with acc.accumulate(wrapped):
                    if manual:
                        with acc.autocast():
                            out = compute_loss(model, batch)  # runs its own (scaled) backward
                        if acc.sync_gradients and acc.num_processes > 1:
                            _average_gradients(model, acc.num_processes)
                    else:
                        out = wrapped(batch)
                        acc.backward(out["loss"])
                    if acc.sync_gradients and config.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                for k, v in out.items():
                    if k == TOKENS_KEY:
                        tokens += int(v)
                    elif _is_number(v):
                        v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                        sums[k] = sums.get(k, 0.0) + v
                if TOKENS_KEY not in out and isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
                    tokens += batch["input_ids"].numel()
            if micro < config.grad_accum:  # the epoch limit came first
                optimizer.zero_grad(set_to_none=True)
                logger.info("data exhausted after %d epochs", stream.epoch)
                break

            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] += 1
            keys = sorted(sums)
            packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=acc.device) for k in keys]
                                 + [torch.tensor(float(tokens), device=acc.device)])
            packed[:-1] /= micro
            means = acc.reduce(packed, reduction="mean")
            tokens_all = float(means[-1]) * acc.num_processes
            values = {k: float(means[i]) for i, k in enumerate(keys)}
            now = time.perf_counter()
            step_time, step_start = now - step_start, now
            state.update(epoch=stream.epoch, examples_in_epoch=stream.examples, examples=stream.consumed,
                         tokens=int(state["tokens"] + tokens_all),
                         elapsed_s=round(elapsed_before + now - session_start, 3))
            last_loss = values["loss"]
            tps = tokens_all / step_time if step_time > 0 else None
            if acc.is_main_process:
                entry = {"step": state["step"], "epoch": stream.epoch, "loss": values.pop("loss"), **values,
                         "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                         "examples": stream.consumed, "tokens": state["tokens"],
                         "tokens_per_s": None if tps is None else round(tps, 1), "elapsed_s": state["elapsed_s"]}
                log.write(entry)
                progress.update(last_loss, tps, lr)
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {state['step']}")
            if config.save_every and state["step"] % config.save_every == 0 and state["step"] < num_steps:
                checkpoint()
                step_start = time.perf_counter()  # tokens/s measures training, not saving
    finally:
        kernels.__exit__(None, None, None)
        progress.close()

    if saved_step != state["step"]:
        checkpoint()
    elif acc.is_main_process:
        plot_log(out_dir / LOG_FILE, out_dir / PLOT_FILE)

    export_dir = None
    if config.export:
        export_dir = _export(acc, wrapped, model, tokenizer, config, template, token_ids, state, export_extra)
    acc.wait_for_everyone()
    model.eval()
    if own_accelerator:
        acc.free_memory()
    plot = out_dir / PLOT_FILE
    return TrainResult(model=model, step=state["step"], epoch=state["epoch"], last_loss=last_loss,
                       checkpoint=last_ckpt if acc.is_main_process else None, export_dir=export_dir,
                       log_path=out_dir / LOG_FILE, plot_path=plot if plot.is_file() else None)


def _export(acc, wrapped, model, tokenizer, config, template, token_ids, state, extra) -> Path | None:
    from accelerate.utils import DistributedType

    full = None
    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP) and not is_peft_model(model):
        full = acc.get_state_dict(wrapped)  # every process takes part in gathering
        if full is not None:
            full = {k.removeprefix("model."): v for k, v in full.items()}
    if not acc.is_main_process:
        return None
    info = {
        "training": config.to_dict(),
        "trainable_token_ids": token_ids,
        "steps": state["step"],
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None)
        or getattr(getattr(model, "peft_config", {}).get("default"), "base_model_name_or_path", None),
        **(extra or {}),
    }
    return export_model(model, tokenizer, config.final_dir, template=template, merge_lora=config.merge_lora,
                        extra=info, state_dict=full)
