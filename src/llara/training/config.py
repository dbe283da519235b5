"""Training options shared by ``llara pretrain`` and ``llara finetune``.

One flat dataclass (flat so that a CLI can expose every field as ``--field``), each field with a
``help`` string, validated in ``__post_init__``. It is saved as JSON in every checkpoint and in the
exported model's ``llara.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = ["TrainConfig", "PRECISIONS", "TRAINABLE_TOKEN_MODES", "add_config_arguments", "config_from_args", "option"]

PRECISIONS = ("auto", "fp32", "bf16")
TRAINABLE_TOKEN_MODES = ("indices", "embedding")
SCHEDULERS = ("linear", "cosine", "constant_with_warmup", "constant")

# Fields that may change between an interrupted run and its resumption without a warning.
RESUME_FREE_FIELDS = ("resume", "progress", "output_dir", "export_dir", "save_every", "keep_last")


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with ``help`` metadata (lists get a default_factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Options of the training loop (data, model and loss options live with their commands)."""

    output_dir: str = _f("runs/llara", "directory for checkpoints, the JSONL log, the loss plot and the export")
    seed: int = _f(42, "seed of python, numpy and torch (LoRA init, dropout); data order comes from set_epoch")

    # --- length of the run
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    epochs: int | None = _f(None, "stop after this many passes over the data (needs len(data) when max_steps is unset)")

    # --- batches and optimisation
    batch_size: int = _f(8, "per-device micro-batch size (the data loader is built with it; DeepSpeed reads it)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (global batch = batch_size x grad_accum x processes)")
    lr: float = _f(1e-5, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases, norm weights and trainable token rows)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("linear", f"learning-rate schedule after warm-up, one of {SCHEDULERS}")
    warmup_ratio: float = _f(0.1, "fraction of the steps used for linear warm-up (ignored when warmup_steps > 0)")
    warmup_steps: int = _f(0, "warm-up steps (overrides warmup_ratio when > 0)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this value (0 disables clipping)")

    # --- memory and precision
    precision: str = _f("auto", "auto (bf16 on GPUs that support it and on CPUs whose bf16 matmul is measured faster, else fp32), fp32 or bf16 (autocast over fp32 weights; LoRA base weights in bf16)")
    gradient_checkpointing: bool | str = _f(
        "auto", "recompute activations in backward (less memory, ~1/3 more compute): true, false, or auto "
        "(only when the step's estimated memory exceeds the budget, see memory_gb)")
    memory_gb: float = _f(0.0, "memory budget of a training step in GiB, for the automatic choices (gradient "
                               "checkpointing, GradCache chunk); 0: 90% of the GPU's free memory, or on a CPU "
                               "min(60% of available RAM, 7 GiB)")
    cpu: bool = _f(False, "train on CPU even when a GPU is present")
    ddp_find_unused_parameters: bool = _f(False, "DDP option; only needed when some trainable parameters get no gradient")

    # --- LoRA (authors' fine-tuning recipe: r=64, alpha=16, dropout 0.1 on every projection)
    lora: bool = _f(False, "train LoRA adapters instead of all weights")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    lora_target_modules: list[str] | None = _f(
        None, "names of the linear layers to adapt; default: every linear projection inside the decoder layers"
    )
    lora_dtype: str = _f(
        "auto", "dtype of the LoRA adapters and trainable token rows: auto (bf16 beside a bf16 base on GPUs, "
        "so that no weight is cast in a step; fp32 on CPUs, whose base stays fp32), fp32 or bf16")
    trainable_tokens: str = _f(
        "indices",
        "how the caller's token ids (the slot tokens) train in LoRA mode: 'indices' (only their embedding "
        "rows, peft trainable_token_indices) or 'embedding' (the whole input embedding, modules_to_save)",
    )

    # --- checkpoints, logs and export
    save_every: int = _f(500, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = _f(2, "keep the last K checkpoints (0 keeps all)")
    resume: bool | str = _f(False, "True: continue from the latest checkpoint in output_dir (fresh start if none); or a checkpoint path")
    export: bool = _f(True, "write a loadable model directory at the end (export_dir)")
    export_dir: str | None = _f(None, "where the final model goes (default: output_dir/final)")
    merge_lora: bool = _f(True, "LoRA: export merged full weights (AutoModel-loadable without peft); False writes the adapter")
    progress: bool = _f(True, "show a progress bar on the main process")

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "keep_last", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.adam_eps <= 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0 and adam_eps > 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam betas must be in [0, 1)")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if isinstance(self.gradient_checkpointing, str):
            value = self.gradient_checkpointing.strip().lower()
            if value not in ("auto", "true", "false"):
                raise ValueError(f"gradient_checkpointing must be true, false or auto, got {self.gradient_checkpointing!r}")
            self.gradient_checkpointing = "auto" if value == "auto" else value == "true"
        if self.memory_gb < 0:
            raise ValueError(f"memory_gb must be >= 0 (0: automatic), got {self.memory_gb}")
        if self.lora_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"lora_dtype must be auto, fp32 or bf16, got {self.lora_dtype!r}")
        if self.trainable_tokens not in TRAINABLE_TOKEN_MODES:
            raise ValueError(f"trainable_tokens must be one of {TRAINABLE_TOKEN_MODES}, got {self.trainable_tokens!r}")
        if self.lora_target_modules is not None:
            if isinstance(self.lora_target_modules, str):
                self.lora_target_modules = [s for s in self.lora_target_modules.split(",") if s]
            self.lora_target_modules = list(self.lora_target_modules)
            if not self.lora_target_modules:
                raise ValueError("lora_target_modules is empty (use None for every projection)")
        if not isinstance(self.resume, (bool, str)):
            raise ValueError(f"resume must be a bool or a checkpoint path, got {self.resume!r}")
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false", ""):
            self.resume = self.resume.lower() == "true"
        self.output_dir = str(self.output_dir)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def final_dir(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.output_dir) / "final"

    def differences(self, other: "TrainConfig | dict", ignore=RESUME_FREE_FIELDS) -> dict[str, tuple]:
        """{field: (self's value, other's value)} for fields that differ (for resume warnings)."""
        theirs = other.to_dict() if isinstance(other, TrainConfig) else dict(other)
        mine = self.to_dict()
        return {k: (mine[k], theirs.get(k)) for k in mine if k not in ignore and mine[k] != theirs.get(k)}


# ---------------------------------------------------------------------- argparse helpers
def _base_type(tp) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation such as ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if bool in args and str in args:
            return str, False
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def option(default: Any = dataclasses.MISSING, help: str = "", **argparse_kw) -> Any:
    """A dataclass field that :func:`add_config_arguments` turns into a flag: ``help`` and, where the
    field's type is not enough, argparse's own keywords (``choices``, ``nargs``, ``metavar``, ``type``,
    ``action="append"``) plus ``flags`` (the option strings, e.g. ``("-k",)``; ``()``: positional)."""
    metadata = {"help": help, **argparse_kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, skip: tuple[str, ...] = (),
                         title: str | None = None) -> None:
    """Add one flag per dataclass field (``--field-name``), with its help text, default and the argparse
    keywords of its metadata (see :func:`option`); a field without a default is a required flag."""
    hints = typing.get_type_hints(cls)
    owner = {f.name: next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
             for f in dataclasses.fields(cls)}
    groups: dict[type, Any] = {}
    # the class's own fields first, then those of each class it inherits from, each in a group of its own
    for f in sorted(dataclasses.fields(cls), key=lambda f: cls.__mro__.index(owner[f.name])):
        if f.name in skip or not f.init:
            continue
        if owner[f.name] not in groups:
            k = owner[f.name]
            doc = (k.__doc__ or "").strip().split("\n")[0] if k is not cls else ""
            groups[k] = parser.add_argument_group(doc.rstrip(".") if doc and not doc.startswith(k.__name__ + "(")
                                                  else (title if k is cls and title else k.__name__))
        group = groups[owner[f.name]]
        tp, is_list = _base_type(hints[f.name])
        meta = {k: v for k, v in f.metadata.items() if k != "help"}
        flags = meta.pop("flags", None)
        if flags is None:
            flags = ["--" + f.name.replace("_", "-")]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help
        if default is not None and not required:
            help_text += " (default: %(default)s)"
        kw: dict[str, Any] = {"help": help_text}
        if flags:
            kw.update(dest=f.name, default=default)
            if required:
                kw["required"] = True
        hinted = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        if bool in hinted and str in hinted:  # e.g. resume: bare flag = True, or a value (a path)
            kw.update(nargs="?", const=True)
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif meta.get("action") == "append":
            kw.update(type=tp)
        else:
            kw.update(type=tp, nargs="+" if is_list else None)
        kw.update(meta)
        if not flags:
            kw.pop("dest", None)
            group.add_argument(f.name, **{k: v for k, v in kw.items() if v is not None})
        else:
            group.add_argument(*flags, **{k: v for k, v in kw.items() if v is not None or k == "default"})


def config_from_args(args: argparse.Namespace, cls=TrainConfig, **extra):
    """``cls`` from the parsed flags of its fields (and ``extra`` values for fields that are not flags)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(args).items() if k in names and k not in extra}, **extra)
