"""Attention masks, position ids and slot positions for LLaRA's prompted inputs.

Pure tensor functions: no model, no tokenizer. The collator builds these once per batch; a stock
Hugging Face causal LM consumes them (see ``llara.modeling.arch`` for what each architecture needs).
Right padding (``pad_right``: the joint batches', the targets' and :mod:`llara.modeling.embed`'s
encoder batches) is here; reading states at positions (``gather_positions``) is embed's.

Layout of one joint sequence (right padding)::

    index:     0 ........ T-1 | T ...... T+S-1 | T+S ...... T+S+N-1 | pad ...
    tokens:    text_i          | SELF suffix     | NEXT suffix         | pad
    positions: 0 ........ T-1 | T ...... T+S-1 | T ........ T+N-1   | continue counting

The NEXT suffix may not attend to the SELF suffix and its position ids restart where the SELF
suffix began, so every NEXT-suffix token sees exactly what it would see in a standalone pass over
``text_i + next_suffix``: the EBAE (SELF) and EBAR (NEXT) embeddings come out of one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


__all__ = [
    "JointBatch",
    "SingleBatch",
    "additive_mask",
    "allowed_keys",
    "build_joint_batch",
    "build_single_batch",
    "lm_positions",
    "pad_right",
    "sliding_window_blocked",
]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int | None = 1,
              min_length: int = 0) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, L) long: the rows on the left, ``pad_id`` after them.

    L is the longest row (at least ``min_length``) rounded up to a multiple of ``multiple``."""
    L = max([min_length, *(len(s) for s in seqs)])
    if multiple and multiple > 1:
        L = -(-L // multiple) * multiple
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            input_ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            attention[r, : len(s)] = 1
    return input_ids, attention


def allowed_keys(valid: Tensor, blocked: Tensor | None = None) -> Tensor:
    """valid (B, L) bool, True on real tokens; blocked (B, L, L) bool, True where query i must not
    see key j. Returns allowed (B, L, L) bool = causal & key-valid & ~blocked.

    A row left with no key at all (a padded query before any real token, or a query whose every key
    is blocked) is allowed to see itself, so softmax never meets an empty row. Real tokens never
    attend to padding, so this cannot change their outputs."""
    if valid.dim() != 2:
        raise ValueError(f"valid must be (B, L), got {tuple(valid.shape)}")
    valid = valid.bool()
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]                          # (B, L, L)
    if blocked is not None:
        if blocked.shape != (B, L, L):
            raise ValueError(f"blocked must be {(B, L, L)}, got {tuple(blocked.shape)}")
        allowed = allowed & ~blocked.to(device=valid.device, dtype=torch.bool)
    empty = ~allowed.any(dim=-1)                                        # (B, L)
    # Unconditionally (a no-op where no row is empty): testing first would synchronise with the device.
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return allowed | (eye[None] & empty[:, :, None])


def additive_mask(valid: Tensor, blocked: Tensor | None, dtype: torch.dtype) -> Tensor:
    """valid (B, L) bool; blocked (B, L, L) bool, True where query i must not see key j.
    Returns (B, 1, L, L): 0 = attend, finfo(dtype).min = masked (finite, so padded rows stay
    NaN-free). Build it directly in the model's dtype: casting an fp32 mask to bf16/fp16 turns
    finfo(fp32).min into -inf."""
    if not dtype.is_floating_point:
        raise ValueError(f"an additive mask needs a floating dtype, got {dtype}")
    allowed = allowed_keys(valid, blocked)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window_blocked(position_ids: Tensor, window: int) -> Tensor:
    """position_ids (B, L) -> (B, L, L) bool, True where key j lies `window` or more positions
    before query i. Measured on position ids, not indices, so the joint layout keeps the windows a
    standalone pass would have (Hugging Face's own windows are `q_idx - kv_idx < window`, which is
    the same thing when positions are 0..L-1)."""
    if window is None or window <= 0:
        raise ValueError(f"sliding window must be a positive int, got {window}")
    distance = position_ids[:, :, None] - position_ids[:, None, :]      # (B, Lq, Lk)
    return distance >= window


class _OnDevice:
    """``to(device)`` for a dataclass whose fields are all tensors."""

    def to(self, device: torch.device | str):
        return type(self)(**{k: v.to(device) for k, v in vars(self).items()})


@dataclass
class JointBatch(_OnDevice):
    """One SELF + NEXT joint pass. Shapes: B sequences, L padded length, K slots per suffix.

    input_ids (B, L) long; attention_mask (B, 1, L, L) additive float; position_ids (B, L) long;
    self_slots (B, K_self) and next_slots (B, K_next) absolute indices into L; text_mask (B, L) bool
    on the tokens of ``texts[i]`` (prefix + text, for an LM loss); lengths (B,) real tokens per row.
    valid (B, L) bool and blocked (B, L, L) bool are what the mask was built from, so an
    architecture can rebuild it (another dtype, sliding windows) without re-deriving the layout."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    self_slots: Tensor
    next_slots: Tensor
    text_mask: Tensor
    lengths: Tensor
    valid: Tensor
    blocked: Tensor



@dataclass
class SingleBatch(_OnDevice):
    """An ordinary right-padded prompted batch: text_i + one suffix.

    input_ids (B, L) long; attention_mask (B, L) long 2D padding mask (1 = real token);
    position_ids (B, L) long; slots (B, K) absolute indices; text_mask (B, L) bool; lengths (B,)."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    slots: Tensor
    text_mask: Tensor
    lengths: Tensor



def _slot_index(suffix: Sequence[int], index: Sequence[int], name: str) -> list[int]:
    """Normalise slot positions inside a suffix (negative = from the end) and check the bounds."""
    out = []
    for i in index:
        j = i + len(suffix) if i < 0 else i
        if not 0 <= j < len(suffix):
            raise ValueError(f"{name} slot index {i} is outside a suffix of length {len(suffix)}")
        out.append(j)
    return out


def build_joint_batch(
    texts: Sequence[Sequence[int]],
    self_suffix: Sequence[int],
    next_suffix: Sequence[int],
    pad_id: int,
    pad_to_multiple_of: int | None = 8,
    dtype: torch.dtype = torch.float32,
    *,
    self_slot_index: Sequence[int],
    next_slot_index: Sequence[int],
) -> JointBatch:
    """Sequence i = texts[i] + self_suffix + next_suffix, then right padding with pad_id.

    texts[i] are the already-truncated ids of prefix (BOS, opening quote...) + text. The slot
    indices are the positions of the slot tokens inside each suffix (e.g. ``range(-8, 0)`` when the
    8 slots close the suffix). The NEXT suffix sees the text and the earlier NEXT tokens, never the
    SELF suffix; its position ids restart at len(texts[i]). Padding continues counting positions."""
    if len(texts) == 0:
        raise ValueError("empty batch")
    self_idx = _slot_index(self_suffix, self_slot_index, "SELF")
    next_idx = _slot_index(next_suffix, next_slot_index, "NEXT")
    S, N = len(self_suffix), len(next_suffix)
    text_lens = [len(t) for t in texts]
    lengths = [t + S + N for t in text_lens]
    input_ids, attention = pad_right([list(t) + list(self_suffix) + list(next_suffix) for t in texts], pad_id,
                                     pad_to_multiple_of)
    B, L = input_ids.shape
    valid = attention.bool()
    position_ids = torch.empty((B, L), dtype=torch.long)
    text_mask = torch.zeros((B, L), dtype=torch.bool)
    blocked = torch.zeros((B, L, L), dtype=torch.bool)
    self_slots = torch.empty((B, len(self_idx)), dtype=torch.long)
    next_slots = torch.empty((B, len(next_idx)), dtype=torch.long)

    for i, T in enumerate(text_lens):
        n = lengths[i]
        position_ids[i, : T + S] = torch.arange(T + S)
        position_ids[i, T + S : n] = torch.arange(T, T + N)             # NEXT restarts at T
        position_ids[i, n:] = torch.arange(T + N, T + N + L - n)        # padding: keep counting
        text_mask[i, :T] = True
        blocked[i, T + S : n, T : T + S] = True                          # NEXT -> SELF
        self_slots[i] = torch.tensor([T + j for j in self_idx], dtype=torch.long)
        next_slots[i] = torch.tensor([T + S + j for j in next_idx], dtype=torch.long)

    return JointBatch(
        input_ids=input_ids,
        attention_mask=additive_mask(valid, blocked, dtype),
        position_ids=position_ids,
        self_slots=self_slots,
        next_slots=next_slots,
        text_mask=text_mask,
        lengths=torch.tensor(lengths, dtype=torch.long),
        valid=valid,
        blocked=blocked,
    )


def build_single_batch(
    texts: Sequence[Sequence[int]],
    suffix: Sequence[int],
    pad_id: int,
    pad_to_multiple_of: int | None = 8,
    *,
    slot_index: Sequence[int],
) -> SingleBatch:
    """Sequence i = texts[i] + suffix, then right padding with pad_id; an ordinary 2D padding mask
    (the model builds its own causal mask). slot_index: positions of the slots inside the suffix."""
    if len(texts) == 0:
        raise ValueError("empty batch")
    idx = _slot_index(suffix, slot_index, "suffix")
    S = len(suffix)
    text_lens = [len(t) for t in texts]
    lengths = [t + S for t in text_lens]
    input_ids, attention_mask = pad_right([list(t) + list(suffix) for t in texts], pad_id, pad_to_multiple_of)
    B, L = input_ids.shape
    text_mask = torch.zeros((B, L), dtype=torch.bool)
    slots = torch.empty((B, len(idx)), dtype=torch.long)
    for i, T in enumerate(text_lens):
        text_mask[i, :T] = True
        slots[i] = torch.tensor([T + j for j in idx], dtype=torch.long)
    position_ids = torch.arange(L, dtype=torch.long).expand(B, L).clone()
    return SingleBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        slots=slots,
        text_mask=text_mask,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )


def lm_positions(text_mask: Tensor) -> Tensor:
    """text_mask (B, L) bool -> (N,) long flat indices ``b * L + j - 1`` of the states that predict the
    text tokens j >= 1, in row-major order (the order ``causal_lm_loss`` selects them in)."""
    targets = text_mask.to(torch.bool).clone()
    targets[:, 0] = False
    return targets.flatten().nonzero().squeeze(1) - 1
