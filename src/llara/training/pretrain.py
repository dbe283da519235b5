"""``llara pretrain``: LLaRA's unsupervised adaptation (EBAE + EBAR) of any causal LM.

One joint forward pass per batch (text, SELF suffix, NEXT suffix; NEXT may not see SELF) on the
stock Hugging Face model; LM-head logits only at the 16 slots and, when the LM loss is on, at the
text positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from ..data.collator import PretrainCollator, joint_batch
from ..data.pretrain import PretrainDataConfig, PretrainDataset
from ..modeling.arch import joint_forward_kwargs
from ..modeling.embed import base_model
from ..modeling.loading import ensure_slot_tokens, load_model
from ..prompts import get_template
from .config import TrainConfig
from .losses import llara_pretrain_loss
from .loop import TrainResult, train
from .memory import StepShape
from .setup import resolve_precision


@dataclass
class PretrainLossConfig:
    form: str = field(default="authors", metadata={"help": "authors (max-pooled slot logits, unique targets) or paper"})
    ebae: bool = field(default=True, metadata={"help": "train the EBAE (self-reconstruction) task"})
    ebar: bool = field(default=True, metadata={"help": "train the EBAR (next-passage) task"})
    bow_scale: float = field(default=0.1, metadata={"help": "weight of the (averaged) bag-of-words losses"})
    lm_weight: float = field(default=1.0, metadata={"help": "weight of the causal LM loss on the text (0: off)"})
    max_length: int = field(default=0, metadata={"help": "tokens per joint input (0: chunk_tokens + prompts)"})
    template: str = field(default="llara", metadata={"help": "template whose SELF/NEXT prompts are trained"})

    def __post_init__(self):
        if self.form not in ("authors", "paper"):
            raise ValueError(f"form must be 'authors' or 'paper', got {self.form!r}")
        if not (self.ebae or self.ebar or self.lm_weight > 0):
            raise ValueError("every loss is switched off: enable ebae, ebar or lm_weight > 0")


def make_loss_fn(cfg: PretrainLossConfig):
    def compute_loss(model, batch):
        jb = joint_batch(batch)
        hidden = base_model(model)(**joint_forward_kwargs(model, jb)).last_hidden_state
        head = model.get_output_embeddings()
        out = llara_pretrain_loss(
            hidden, head.weight, lm_head_bias=getattr(head, "bias", None),
            softcap=getattr(model.config, "final_logit_softcapping", None),
            self_positions=jb.self_slots, self_targets=batch["self_targets"],
            self_target_mask=batch["self_target_mask"], next_positions=jb.next_slots,
            next_targets=batch["next_targets"], next_target_mask=batch["next_target_mask"],
            input_ids=jb.input_ids, text_mask=jb.text_mask, lm_positions=batch.get("lm_positions"), form=cfg.form, use_ebae=cfg.ebae,
            use_ebar=cfg.ebar, bow_scale=cfg.bow_scale, lm_weight=cfg.lm_weight,
        )
        out["num_tokens"] = batch["num_tokens"]  # a tensor: read by the loop once per step, no sync here
        return out

    return compute_loss


def pretrain(model_spec: str, data_paths: Sequence[str], train_cfg: TrainConfig,
             data_cfg: PretrainDataConfig | None = None, loss_cfg: PretrainLossConfig | None = None,
             *, model=None, tokenizer=None) -> TrainResult:
    """Adapt ``model_spec`` (or the given model/tokenizer) on unlabelled text; returns the loop's result.

    The exported model (``train_cfg.final_dir``) carries the template in ``llara.json``, so
    ``llara evaluate --model DIR`` encodes with the trained slots.

    Examples:
        Two adaptation steps on the shipped MED abstracts (``model_dir``: a tiny random
        checkpoint here; ``tmp``: a scratch directory):

        >>> from llara import Encoder, pretrain
        >>> from llara.data.pretrain import PretrainDataConfig
        >>> from llara.training.config import TrainConfig
        >>> cfg = TrainConfig(output_dir=str(tmp / "adapt"), max_steps=2, batch_size=2, cpu=True, progress=False)
        >>> result = pretrain(model_dir, [med / "corpus.jsonl"], cfg, PretrainDataConfig(chunk_tokens=32))
        >>> result.step, result.export_dir.name, (result.export_dir / "llara.json").is_file()
        (2, 'final', True)
        >>> adapted = Encoder.from_pretrained(str(result.export_dir), show_progress=False)
        >>> adapted.template.name
        'llara'
    """
    data_cfg = data_cfg or PretrainDataConfig()
    loss_cfg = loss_cfg or PretrainLossConfig()
    if model is None:
        model, tokenizer, _ = load_model(model_spec, causal_lm=True, device="cpu", dtype="float32")
    template = get_template(loss_cfg.template)
    ensure_slot_tokens(tokenizer, model, template.slot_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = PretrainCollator(tokenizer, template, vocab_size=vocab)  # measures the prompt, builds the filter
    # By default a whole chunk always fits: max_length = chunk_tokens + the joint prompt.
    max_length = loss_cfg.max_length or data_cfg.chunk_tokens + probe.prompt_tokens
    # The additive mask is built by the data loader in the compute dtype (autocast's under bf16), so the
    # step does not rebuild it on the device.
    compute = torch.bfloat16 if resolve_precision(train_cfg) == "bf16" else torch.float32
    collator = PretrainCollator(tokenizer, template, max_length=max_length, keep=probe.keep, vocab_size=vocab,
                                dtype=compute)
    dataset = PretrainDataset(list(data_paths), tokenizer, data_cfg, prepare=template.prepare)
    loader = DataLoader(dataset, batch_size=train_cfg.batch_size, collate_fn=collator)
    slot_ids = tokenizer.convert_tokens_to_ids(list(template.slot_tokens))
    extra = {"pretrain_data": {**asdict(data_cfg), "paths": [str(p) for p in data_paths]},
             "pretrain_loss": asdict(loss_cfg), "base_model": model_spec}
    return train(model, tokenizer, loader, make_loss_fn(loss_cfg), train_cfg, template=template,
                 trainable_token_ids=slot_ids, export_extra=extra,
                 step_shape=StepShape(train_cfg.batch_size * max_length, max_length))
