"""Training checkpoints: written atomically, enough to continue a run exactly.

Layout of ``output_dir/checkpoint-000300/``::

    model/                  full weights (save_pretrained) or the LoRA adapter (+ trainable token rows),
                            with the tokenizer: usable on its own
    optimizer.pt            AdamW state (torch.save of tensors and numbers; loaded with weights_only)
    scheduler.pt            learning-rate scheduler state
    rng_state_<rank>.pt     python, numpy, torch (and CUDA) generator states of each process
    trainer_state.json      step, epoch, examples consumed in the epoch, totals, elapsed time
    train_config.json       the TrainConfig of the run
    accelerate_state/       only under DeepSpeed / FSDP: accelerate.save_state (sharded model and
                            optimizer; then model/ holds only the tokenizer)

A checkpoint is first written to a hidden ``.checkpoint-000300.tmp`` directory and renamed when
complete, so an interrupted save never leaves a directory that looks like a checkpoint. The
directory must be on a file system shared by all processes (several nodes: a network file system).
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import replace_dir

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_FILE",
    "checkpoint_dir",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "resolve_resume",
    "restore_rng",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
MODEL_DIR = "model"
ACCELERATE_DIR = "accelerate_state"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they hold trainer_state.json), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: bool | str | None, output_dir: str | Path) -> Path | None:
    """``True``: the latest checkpoint in output_dir (None if there is none); a path: that
    checkpoint (or the latest one inside it, when it is a run directory); ``False``: None."""
    if not resume:
        return None
    if resume is True:
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p}: not a checkpoint (no {STATE_FILE}) and holds no checkpoint")
    return latest


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


# --------------------------------------------------------------------------- RNG states
def get_rng_state() -> dict[str, Any]:
    """Every generator that training may draw from (dropout, shuffling, sampling)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has %d CUDA generator states for %d devices: not restored",
                           len(cuda), torch.cuda.device_count())


def restore_rng(ckpt: str | Path, rank: int) -> bool:
    path = Path(ckpt) / f"rng_state_{rank}.pt"
    if not path.is_file():
        logger.warning("%s missing (different number of processes?): random state not restored", path.name)
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


# --------------------------------------------------------------------------- save
def _is_sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_model_weights(model, out_dir: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of a plain or peft model (peft saves only the adapter and token rows)."""
    model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))


def save_checkpoint(
    acc,
    model,
    optimizer,
    scheduler,
    tokenizer,
    config,
    state: dict[str, Any],
    output_dir: str | Path,
    keep_last: int = 0,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process must call it.

    model: the unwrapped Hugging Face or peft model (under DeepSpeed / FSDP the states come from
    the objects registered with ``acc.prepare``). Returns the final checkpoint path.
    """
    step = int(state["step"])
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    sharded = _is_sharded(acc)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        if sharded:
            # All processes write their shards of the model and optimizer (no full gather here:
            # under ZeRO-3 / FSDP that would cost a full copy per checkpoint; the export gathers).
            acc.save_state(str(tmp / ACCELERATE_DIR))
        torch.save(get_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        if acc.is_main_process:
            if not sharded:
                save_model_weights(model, tmp / MODEL_DIR)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / MODEL_DIR)
            if not sharded:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            config.save_json(tmp / CONFIG_FILE)
            # Written last: its presence marks a complete checkpoint.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_dir(tmp, final)
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    if acc.is_main_process:
        logger.info("saved %s", final)
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s", old.name)
    return final


def _peft(model) -> bool:
    from .lora import is_peft_model

    return is_peft_model(model)


# --------------------------------------------------------------------------- load
def _load_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def _not_tied_token_rows(model, sd: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    """``keys`` less the token rows of a layer tied to another one (a tied LM head's trainable
    tokens share the input embedding's delta: peft saves them under both names but loads one), once
    checked equal to what was loaded through the other name."""
    modules = dict(model.named_modules())
    left = []
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        tied = getattr(modules.get(prefix), "tied_adapter", None)
        if leaf == "trainable_tokens_delta" and tied is not None:
            loaded = [d for d in tied.trainable_tokens_delta.values()]
            if len(loaded) == 1 and torch.equal(loaded[0].detach().cpu().to(sd[key].dtype), sd[key]):
                continue
        left.append(key)
    return left


def load_model_weights(model, model_dir: Path) -> None:
    """Load what ``save_model_weights`` wrote into the live (plain or peft) model, exactly."""
    if _peft(model):
        from peft import set_peft_model_state_dict

        sd = _load_safetensors_dir(model_dir)
        result = set_peft_model_state_dict(model, sd)
        unexpected = _not_tied_token_rows(model, sd, getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise RuntimeError(f"{model_dir}: adapter keys not in the model: {unexpected[:5]}")
        return
    sd = _load_safetensors_dir(model_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"{model_dir}: weights not in the model: {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise RuntimeError(f"{model_dir}: weights missing from the checkpoint: {untied[:5]}")


def load_checkpoint(ckpt: str | Path, acc, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer and scheduler states; returns the trainer state. The random states
    are restored separately (``restore_rng``), after the data iterator is positioned."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    if _is_sharded(acc):
        acc.load_state(str(ckpt / ACCELERATE_DIR))
    else:
        load_model_weights(model, ckpt / MODEL_DIR)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    logger.info("resumed from %s (step %d, epoch %d, %d examples into the epoch)",
                ckpt, state["step"], state["epoch"], state["examples_in_epoch"])
    return state
