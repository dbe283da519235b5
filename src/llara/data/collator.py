"""The joint-pass collator of LLaRA's adaptation: (chunk, next chunk) examples -> one SELF + NEXT
batch (``llara.modeling.masks.build_joint_batch``) with EBAE / EBAR bag-of-words targets
(``llara.data.targets``)."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..modeling.masks import JointBatch, build_joint_batch, lm_positions
from ..prompts import EncodedSide, Template, TemplateError, encode_side, get_template
from .chunking import PretrainExample
from .targets import DEFAULT_STOPWORDS, bow_targets, load_stopwords, target_filter

__all__ = ["PretrainCollator", "joint_batch"]


def _suffix_and_slots(side: EncodedSide, name: str) -> tuple[list[int], list[int]]:
    """The ids after the text and the positions inside them whose states form the embedding."""
    suffix = list(side.suffix_ids) + list(side.eos_ids)
    if side.side.pooling == "slots":
        return suffix, list(side.slot_offsets)
    if side.side.pooling == "last":
        if not suffix:
            raise TemplateError(f"the joint pass needs a non-empty {name} suffix (or an appended EOS)")
        return suffix, [len(suffix) - 1]
    raise TemplateError(f"pretraining reads the {name} embedding at slots or the last token, not {side.side.pooling!r}")


_JOINT_FIELDS = tuple(f.name for f in dataclasses.fields(JointBatch))


def joint_batch(batch: dict[str, Tensor]) -> JointBatch:
    """The JointBatch inside a collated dict, for ``llara.modeling.arch.joint_forward_kwargs``."""
    return JointBatch(**{k: batch[k] for k in _JOINT_FIELDS})


class PretrainCollator:
    """Examples -> one joint SELF + NEXT batch with EBAE / EBAR targets.

    Sequence i = prefix + text_i + SELF suffix + NEXT suffix (``build_joint_batch``, right padding to
    a multiple of pad_to_multiple_of). Only the text is truncated, to
    ``text_budget = max_length - len(prefix) - len(SELF suffix) - len(NEXT suffix)``; max_length None
    means no truncation. The EBAE target is the truncated text itself, the EBAR target the next chunk
    truncated to the same budget; both go through ``keep`` (default: ``target_filter`` with the
    ``stopwords`` list, bm25s's by default; punctuation and special tokens, slots included, are
    dropped) and keep each id once (``unique_targets``).

    Returned dict: the JointBatch fields input_ids (B, L), attention_mask (B, 1, L, L) additive in
    ``dtype``, position_ids (B, L), self_slots (B, K), next_slots (B, K), text_mask (B, L), lengths (B,),
    valid (B, L), blocked (B, L, L); self_targets / self_target_mask and next_targets /
    next_target_mask (B, T) from ``bow_targets``; num_examples, num_tokens (real tokens) and
    num_text_tokens (0-d long tensors).

    text_mask marks the text tokens only (not the prompt prefix): the causal LM loss predicts the
    first text token from the prefix and never predicts the prefix itself.

    The mask's dtype: the additive mask must be in the model's compute dtype. Feed the batch to the
    model through ``joint_forward_kwargs(model, joint_batch(batch))``: it reuses ``attention_mask``
    when ``dtype`` matches the model's (or autocast's) dtype and otherwise rebuilds it from ``valid``
    and ``blocked`` in the right dtype (adding sliding windows where the architecture has them), so
    any ``dtype`` is correct; pass the compute dtype (e.g. torch.bfloat16 on GPU) to skip the rebuild.
    """

    def __init__(
        self,
        tokenizer,
        template: str | Template | dict | None = "llara",
        max_length: int | None = None,
        keep: Tensor | None = None,
        pad_to_multiple_of: int | None = 8,
        *,
        vocab_size: int | None = None,
        stopwords: str | Iterable[str] | None = DEFAULT_STOPWORDS,
        dtype: torch.dtype = torch.float32,
        unique_targets: bool = True,
    ):
        self.template = get_template(template)
        self_side = encode_side(tokenizer, self.template.passage)
        next_side = encode_side(tokenizer, self.template.query)
        if self_side.prefix_ids != next_side.prefix_ids:
            raise TemplateError(
                f"template {self.template.name!r}: the joint pass needs one prefix for both sides, got "
                f"{self.template.passage.prefix!r} and {self.template.query.prefix!r}"
            )
        self.prefix_ids = list(self_side.prefix_ids)
        self.self_suffix, self.self_slot_index = _suffix_and_slots(self_side, "SELF (passage)")
        self.next_suffix, self.next_slot_index = _suffix_and_slots(next_side, "NEXT (query)")
        overhead = len(self.prefix_ids) + len(self.self_suffix) + len(self.next_suffix)
        self.prompt_tokens = overhead  # max_length = chunk_tokens + prompt_tokens never cuts a chunk
        self.max_length = max_length
        self.text_budget: int | None = None
        if max_length is not None:
            self.text_budget = max_length - overhead
            if self.text_budget < 1:
                raise TemplateError(
                    f"max_length {max_length} leaves no room for text: the joint prompt takes {overhead} tokens"
                )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dtype = dtype
        self.unique_targets = unique_targets
        if keep is None:
            keep = target_filter(tokenizer, vocab_size, stopwords=load_stopwords(stopwords))
        self.keep = keep.to(torch.bool).cpu()
        self.vocab_size = vocab_size or len(self.keep)
        if len(self.keep) < len(tokenizer):
            raise ValueError(f"keep has {len(self.keep)} entries for a tokenizer of {len(tokenizer)} ids")

    def truncate(self, ids: Sequence[int]) -> list[int]:
        return list(ids if self.text_budget is None else ids[: self.text_budget])

    def __call__(self, examples: Sequence[PretrainExample | tuple[Sequence[int], Sequence[int]]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("empty batch")
        pairs = [(e.text_ids, e.next_ids) if isinstance(e, PretrainExample) else e for e in examples]
        texts = [self.truncate(t) for t, _ in pairs]
        nexts = [self.truncate(n) for _, n in pairs]
        jb = build_joint_batch(
            [self.prefix_ids + t for t in texts],
            self.self_suffix,
            self.next_suffix,
            self.pad_id,
            self.pad_to_multiple_of,
            self.dtype,
            self_slot_index=self.self_slot_index,
            next_slot_index=self.next_slot_index,
        )
        out = {k: getattr(jb, k) for k in _JOINT_FIELDS}
        out["text_mask"] = jb.text_mask.clone()
        out["text_mask"][:, : len(self.prefix_ids)] = False
        out["lm_positions"] = lm_positions(out["text_mask"])  # on the host, so the loss needs no device sync
        targets = {}
        for name, rows in (("self", texts), ("next", nexts)):
            ids, mask = bow_targets(rows, self.vocab_size, self.keep, unique=self.unique_targets)
            targets[f"{name}_targets"], targets[f"{name}_target_mask"] = ids, mask
        out.update(targets)
        out["num_examples"] = torch.tensor(len(pairs), dtype=torch.long)
        out["num_tokens"] = jb.lengths.sum()
        out["num_text_tokens"] = torch.tensor(sum(len(t) for t in texts), dtype=torch.long)
        return out
