"""One path from text to vector, shared by encoding, training, indexing, serving and the benchmarks.

1. ``tokenize``: the text without special tokens, cut to what the prompt leaves of ``max_length``,
   wrapped in the template side's prefix / suffix / EOS (``EncodedSide.build``);
2. ``plan_batches`` / ``pack``: length-sorted batches of at most ``batch_size`` rows and
   ``max_batch_tokens`` padded tokens, each right-padded (``pad_right``, to a multiple) with the
   pooling weights of one or more template sides (``pooling_weights``: slots, last token or mean,
   each row summing to 1);
3. ``hidden_states``: the stock Hugging Face model (its base, without LM head) over input ids and
   the 2-D padding mask; nothing here touches model code;
4. ``pool``: the weighted sum of the final states, in float32;
5. ``normalize``: L2 normalisation when the template says so (``Template.normalize``).

:class:`llara.modeling.encoder.Encoder` runs these under ``inference_mode`` (sorted by length,
several templates per forward pass); training runs ``embed`` on a collated batch with gradients.
Padding is on the right and every pooled position is explicit, so nothing depends on the
tokenizer's ``padding_side``. ``gather_positions`` reads states at given positions (the
pretraining slots).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..prompts import EncodedSide, Template
from .masks import pad_right
from .read_rows import flat_positions, read_rows

__all__ = [
    "Built",
    "Packed",
    "base_model",
    "embed",
    "gather_positions",
    "hidden_states",
    "normalize",
    "pack",
    "pad_token_id",
    "plan_batches",
    "pool",
    "pooling_weights",
    "tokenize",
    "tokenize_texts",
]

# One text after EncodedSide.build: (ids, text_start, text_end), unpadded.
Built = tuple[list[int], int, int]


def base_model(model):
    """The decoder stack without the LM head (its last_hidden_state is after the final norm)."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return inner if isinstance(inner, torch.nn.Module) else model


def pad_token_id(tokenizer) -> int:
    """The id written into padded positions (the mask hides them): PAD, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ------------------------------------------------------------------------------ tokens
def tokenize_texts(tokenizer, texts: Sequence[str], budget: int) -> tuple[list[list[int]], int]:
    """Text ids without special tokens, cut to ``budget``; also the number of texts that were cut."""
    # Cap very long strings before tokenizing (a token is rarely under 1 char; 16 is generous)
    # and re-tokenize the few whose cap cost tokens the budget could have held.
    cap = max(budget * 16, 64)
    clipped = [t[:cap] for t in texts]
    ids = tokenizer(clipped, add_special_tokens=False)["input_ids"]
    for i, (t, c) in enumerate(zip(texts, clipped)):
        if len(t) > len(c) and len(ids[i]) < budget:
            ids[i] = tokenizer(t, add_special_tokens=False)["input_ids"]
    return [x[:budget] for x in ids], sum(len(x) > budget for x in ids)


def tokenize(tokenizer, side: EncodedSide, texts: Sequence[str], max_length: int) -> tuple[list[Built], int]:
    """Each text in its prompt, at most ``max_length`` tokens (only the text is cut); also how many
    texts were cut. ``texts`` are as the model sees them (``Template.prepare`` applied)."""
    text_ids, truncated = tokenize_texts(tokenizer, texts, max(max_length - side.overhead, 1))
    return [side.build(ids, max_length) for ids in text_ids], truncated


# ------------------------------------------------------------------------------ batches
def pooling_weights(sides: Sequence[EncodedSide], built: Sequence[Built], L: int) -> Tensor:
    """(P, B, L) float32 weights, one row per side and text, summing to 1 over the pooled positions."""
    w = torch.zeros(len(sides), len(built), L)
    for p, side in enumerate(sides):
        for b, (ids, start, end) in enumerate(built):
            pos = side.pool_positions(len(ids), start, end)
            w[p, b, pos] = 1.0 / len(pos)
    return w


@dataclass
class Packed:
    """A right-padded batch: input_ids and attention_mask (B, L) long; pool (P, B, L) float32, the
    weights of each of P template sides that share these ids (``Template.side(..).input_signature``);
    read (M,) long, the flat positions any side pools, and live (T,) long, those of real tokens
    (``hidden_states``'s ``read`` and ``live``), or None."""

    input_ids: Tensor
    attention_mask: Tensor
    pool: Tensor
    read: Tensor | None = None
    live: Tensor | None = None

    def _map(self, fn) -> "Packed":
        return Packed(*(None if t is None else fn(t)
                        for t in (self.input_ids, self.attention_mask, self.pool, self.read, self.live)))

    def pin_memory(self) -> "Packed":
        """The same batch in page-locked host memory (CUDA copies from it can be non-blocking)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "Packed":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def side_batch(self, template: Template, p: int = 0) -> dict[str, Tensor]:
        """The dict ``embed`` takes, for side ``p`` pooled and normalised as ``template`` says."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pool": self.pool[p],
                "normalize": torch.full((self.input_ids.size(0),), bool(template.normalize))}


def plan_batches(lengths: Sequence[int], batch_size: int | None = None, max_batch_tokens: int | None = None,
                 multiple: int | None = 1) -> list[np.ndarray]:
    """Rows of each batch, longest text first (a stable sort by length, descending).

    A batch holds at most ``batch_size`` rows and at most ``max_batch_tokens`` padded tokens: rows x
    its longest length rounded up to ``multiple`` (what ``pad_right`` builds), as text-embeddings-
    inference's ``--max-batch-tokens``. None lifts a limit; one of the two must be given."""
    if batch_size is None and max_batch_tokens is None:
        raise ValueError("give batch_size, max_batch_tokens or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    m = multiple if multiple and multiple > 1 else 1
    padded = -(-lengths[order] // m) * m  # each row's padded length if it were the longest of its batch
    rows_cap = batch_size or len(order)
    batches, i = [], 0
    while i < len(order):
        n = rows_cap
        if max_batch_tokens is not None:
            width = max(int(padded[i]), 1)
            if width > max_batch_tokens:
                raise ValueError(f"a text of {lengths[order[i]]} tokens (padded to {width}) exceeds "
                                 f"max_batch_tokens={max_batch_tokens}")
            n = min(n, max_batch_tokens // width)  # rows after i are no longer: they pad to this width
        batches.append(order[i : i + n])
        i += n
    return batches


def pack(built: Sequence[Built], sides: Sequence[EncodedSide], pad_id: int, multiple: int | None = 1) -> Packed:
    """Pad ``built`` texts (``tokenize`` output) on the right, with the pooling weights of ``sides``."""
    input_ids, attention = pad_right([ids for ids, _, _ in built], pad_id, multiple)
    weights = pooling_weights(sides, built, input_ids.size(1))
    return Packed(input_ids, attention, weights, flat_positions(weights.ne(0).any(0)), flat_positions(attention))


# ------------------------------------------------------------------------------ vectors
def hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, read: Tensor | None = None,
                  live: Tensor | None = None) -> Tensor:
    """Final hidden states (B, L, H) of the stock model (without its LM head) on the model's device.

    ``attention_mask``: the 2-D padding mask (1 = real token); ``position_ids`` without a mask: packed
    rows (:mod:`llara.modeling.packing`). ``read``: the flat positions (into B x L, unique) the caller
    will read; ``live``: those of real tokens (no pad). Each layer's position-wise work then runs at
    ``live`` and the last layer's at ``read`` only; other positions are not the model's states
    (:mod:`llara.modeling.read_rows`). No key/value cache is built (nothing generates here)."""
    dev = next(model.parameters()).device
    extra = {} if position_ids is None else {"position_ids": position_ids.to(dev)}
    mask = None if attention_mask is None else attention_mask.to(dev)
    base = base_model(model)
    read, live = (None if t is None else t.to(dev) for t in (read, live))
    with read_rows(base, input_ids.numel(), read, live):
        return base(input_ids=input_ids.to(dev), attention_mask=mask, use_cache=False, **extra).last_hidden_state


def pool(weights: Tensor, hidden: Tensor) -> Tensor:
    """Weighted sum of the states in float32: weights (B, L) -> (B, H), or (P, B, L) -> (P, B, H)."""
    w = weights.to(hidden.device, torch.float32)
    return torch.einsum("...bl,blh->...bh", w, hidden.float())


def normalize(emb: Tensor, on: "bool | Tensor") -> Tensor:
    """L2-normalised rows where ``on`` (a bool, or a (B,) bool tensor per row), else ``emb`` itself."""
    if isinstance(on, Tensor):
        # Chosen per row without reading ``on`` back (which would make the host wait for the device).
        on = on.to(emb.device, torch.bool)
        return torch.where(on[:, None], F.normalize(emb, dim=-1), emb)
    return F.normalize(emb, dim=-1) if on else emb


def embed(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, H) float32 embeddings of a ``Packed.side_batch`` (the training collators' batches), or (N, H)
    of a packed pass (``llara.modeling.packing.pack_texts``: N texts in fewer rows), with gradients
    when they are enabled; normalised as the batch's template says."""
    if "position_ids" in batch:
        hidden = hidden_states(model, batch["input_ids"], position_ids=batch["position_ids"],
                               read=batch.get("read"), live=batch.get("live"))
        flat = hidden.reshape(-1, hidden.size(-1))
        index = batch["pool_index"].to(flat.device)
        picked = flat.index_select(0, index.reshape(-1)).reshape(*index.shape, -1)  # (N, K, H)
        return normalize(pool(batch["pool_weight"], picked), batch["normalize"])
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return normalize(pool(batch["pool"], hidden), batch["normalize"])


def gather_positions(hidden: Tensor, positions: Tensor) -> Tensor:
    """hidden (B, L, H); positions (B, K) (or (B,)) indices into L. Returns (B, K, H)."""
    if positions.dim() == 1:
        positions = positions[:, None]
    if hidden.dim() != 3 or positions.dim() != 2 or positions.size(0) != hidden.size(0):
        raise ValueError(f"hidden {tuple(hidden.shape)} and positions {tuple(positions.shape)} do not match")
    index = positions.to(hidden.device, torch.long)[:, :, None].expand(-1, -1, hidden.size(-1))
    return hidden.gather(1, index)
