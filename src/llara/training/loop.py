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
The set-up pieces (accelerator, model, optimizer, scheduler, step count) are in ``setup.py``.
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
from ..modeling.host_memory import keep_freed_memory
from ..modeling.precision import training_kernels
from .config import TrainConfig
from .export import export_model
from .logging_utils import JsonlLog, Progress
from .memory import StepShape, peak_memory_gb, plan_for
from .lora import is_peft_model
from .plot import plot_log
from .setup import (
    average_gradients,
    build_optimizer,
    build_scheduler,
    is_number,
    make_accelerator,
    prepare_model,
    resolve_precision,
    to_device,
    total_steps,
)
from .stream import BatchStream

logger = logging.getLogger(__name__)

__all__ = [
    "LOG_FILE",
    "PLOT_FILE",
    "LossFn",
    "LossModule",
    "TrainResult",
    "train",
]

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
TOKENS_KEY = "num_tokens"

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
    step_shape: StepShape | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``compute_loss``; see the module docstring.

    trainable_token_ids: token ids whose embedding rows must train under LoRA (the slot tokens).
    template: recorded in the export's ``llara.json`` (a Template or a built-in name).
    accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
    step_shape: the largest forward pass with a graph of a micro-batch, for
    ``gradient_checkpointing='auto'`` (see ``memory.py``); without it 'auto' is off. What the caller
    chose for it (``choice``) is logged on the same line as the checkpointing decision.
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
    checkpointing = config.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = False
        if step_shape is not None:
            plan = plan_for(model, acc.device, precision=precision, lora=config.lora, memory_gb=config.memory_gb)
            sh = step_shape
            checkpointing = plan.checkpointing(sh.tokens, sh.seq, chunked=sh.chunked)
            logger.info("memory: %s -> %sgradient checkpointing %s",
                        plan.describe(sh.tokens, sh.seq, checkpointing, sh.chunked),
                        f"{sh.choice}, " if sh.choice else "", "on" if checkpointing else "off")
    model = prepare_model(model, config, token_ids, precision, acc.device.type, checkpointing=bool(checkpointing))
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
    if acc.device.type == "cpu":
        keep_freed_memory()  # a quarter of a CPU step was page faults of freshly mapped tensors (host_memory.py)
    kernels.__enter__()
    try:
        while state["step"] < num_steps:
            # Everything a step reports stays on the device until one read per step (the log line):
            # no host synchronisation per micro-batch.
            sums: dict[str, torch.Tensor | float] = {}
            tokens = torch.zeros((), dtype=torch.float64, device=acc.device)
            grad_norm = None
            micro = 0
            for _ in range(config.grad_accum):
                batch = stream.next(config.epochs)
                if batch is None:
                    break
                batch = to_device(batch, acc.device)
                with acc.accumulate(wrapped):
                    if manual:
                        with acc.autocast():
                            out = compute_loss(model, batch)  # runs its own (scaled) backward
                        if acc.sync_gradients and acc.num_processes > 1:
                            average_gradients(model, acc.num_processes)
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
                        tokens += v.detach().to(tokens.device) if isinstance(v, torch.Tensor) else v
                    elif is_number(v):
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
            norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=acc.device)
            packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=acc.device) for k in keys]
                                 + [tokens.float(), norm.detach().float().reshape(())])
            packed[:-2] /= micro
            means = acc.reduce(packed, reduction="mean").tolist()  # the step's one read from the device
            tokens_all = means[-2] * acc.num_processes
            grad_norm = None if math.isnan(means[-1]) else means[-1]
            values = {k: means[i] for i, k in enumerate(keys)}
            now = time.perf_counter()
            step_time, step_start = now - step_start, now
            state.update(epoch=stream.epoch, examples_in_epoch=stream.examples, examples=stream.consumed,
                         tokens=int(state["tokens"] + tokens_all),
                         elapsed_s=round(elapsed_before + now - session_start, 3))
            last_loss = values["loss"]
            tps = tokens_all / step_time if step_time > 0 else None
            if acc.is_main_process:
                entry = {"step": state["step"], "epoch": stream.epoch, "loss": values.pop("loss"), **values,
                         "lr": lr, "grad_norm": grad_norm,
                         "examples": stream.consumed, "tokens": state["tokens"],
                         "tokens_per_s": None if tps is None else round(tps, 1), "elapsed_s": state["elapsed_s"],
                         "peak_memory_gb": peak_memory_gb(acc.device)}
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
