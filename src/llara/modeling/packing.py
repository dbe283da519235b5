"""Sequence packing: several prompted texts share one row of a forward pass, without padding between them.

A training step of random texts pads every row to its longest text: the recipe's step (8 queries of
~40 tokens padded to 64, 16 passages of 96) computes 2,048 positions for ~1,850 real tokens, in two
passes. Packed, the same texts fill 20-21 rows of 96 in one pass (7 x 64 + 16 x 96 in two when the
queries are long: :func:`plain_or_packed`). Rows are filled best-fit, longest text
first, to the width of the longest text (rounded up to ``multiple``); each text's position ids
restart at 0 and a row's free tail is one more run of padding with its own positions from 0.

The stock Hugging Face model does the rest: given ``position_ids`` and no attention mask, it attends
within each run of consecutive positions only (``transformers.masking_utils.find_packed_sequence_indices``
builds the block-diagonal causal mask for eager and SDPA attention; its flash-attention 2 path reads the
same position ids as variable-length sequences, which llara has not run: no GPU here). Every token
then sees what it sees in a padded batch of its own: the same positions, the same keys. :func:`packing_supported` checks that on the model itself once, so an
architecture whose code ignores packed position ids is never given packed rows.

A packed pass is a dict (``embed`` reads it): ``input_ids`` and ``position_ids`` (R, W) long;
``pool_index`` (N, K) long, flat indices into the R x W positions of the K positions each of the N
texts pools (shorter lists end in index 0 with weight 0); ``pool_weight`` (N, K) float32, each row
summing to 1; ``read`` (M,) long, the flat positions the pooling reads (sorted, unique: the last layer's
position-wise work runs there only, :mod:`llara.modeling.read_rows`); ``live`` (T,) long, the flat
positions of the texts' tokens (not the tails: the other layers' position-wise work runs there only);
``normalize`` (N,) bool. Texts keep their input order in the pooled output.
"""
from __future__ import annotations

import bisect
import logging
from typing import Sequence

import torch

from .embed import hidden_states
from .read_rows import flat_positions, rows_read_by

log = logging.getLogger(__name__)

__all__ = ["PackedText", "best_fit_rows", "pack_texts", "packed_positions", "packing_supported", "plain_or_packed"]

# One text to pack: (ids, pooled positions within ids, normalise its embedding).
PackedText = tuple[Sequence[int], Sequence[int], bool]


def best_fit_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of ``lengths`` per row, no row longer than ``width``: longest first, each into the
    fullest row it still fits (best-fit decreasing; ties by input order, so the layout is
    deterministic). O(n log n) plus list inserts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted; full rows leave the list
    for i in order:
        n = lengths[i]
        if not 0 < n <= width:
            raise ValueError(f"text {i} has {n} tokens: a row holds 1 to {width}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = width, len(rows)
            rows.append([i])
        if room > n:
            bisect.insort(free, (room - n, r))
    return rows


def _layout(lengths: Sequence[int], multiple: int | None) -> tuple[int, list[list[int]]]:
    """(width, rows) of a packed pass over texts of these lengths: the longest rounded up to ``multiple``."""
    if not lengths:
        raise ValueError("nothing to pack")
    m = multiple if multiple and multiple > 1 else 1
    width = -(-max(lengths) // m) * m
    return width, best_fit_rows(lengths, width)


def _lengths(texts: Sequence[PackedText]) -> list[int]:
    return [len(ids) for ids, _, _ in texts]


def packed_positions(lengths: Sequence[int], multiple: int | None = 8) -> int:
    """Positions (rows x width) a packed pass over texts of these lengths computes."""
    width, rows = _layout(lengths, multiple)
    return len(rows) * width


def _fill(texts: Sequence[PackedText], pad_id: int, width: int, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """The packed pass's tensors for ``texts`` laid out in ``rows`` of ``width`` (:func:`_layout`)."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    k = max(len(pool) for _, pool, _ in texts)
    pool_index = torch.zeros((len(texts), k), dtype=torch.long)
    pool_weight = torch.zeros((len(texts), k), dtype=torch.float32)
    live = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, pool, _ = texts[i]
            n = len(ids)
            if not pool or min(pool) < 0 or max(pool) >= n:
                raise ValueError(f"text {i}: pooled positions {list(pool)} must lie in its {n} tokens")
            input_ids[r, at : at + n] = torch.as_tensor(list(ids), dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            pool_index[i, : len(pool)] = torch.as_tensor(list(pool), dtype=torch.long) + (r * width + at)
            pool_weight[i, : len(pool)] = 1.0 / len(pool)
            live[r, at : at + n] = True
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the tail: a run of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "pool_index": pool_index,
            "pool_weight": pool_weight, "read": rows_read_by(pool_index, pool_weight), "live": flat_positions(live),
            "normalize": torch.tensor([bool(x) for _, _, x in texts])}


def pack_texts(texts: Sequence[PackedText], pad_id: int, multiple: int | None = 8) -> dict[str, torch.Tensor]:
    """One packed pass over ``texts`` (module docstring: the layout and the dict's fields)."""
    return _fill(texts, pad_id, *_layout(_lengths(texts), multiple))


def plain_or_packed(groups: Sequence[Sequence[PackedText]], pad_id: int, multiple: int | None = 8
                    ) -> list[dict[str, torch.Tensor]]:
    """The passes of one step over ``groups`` of texts (queries, passages): one packed pass over all
    of them, unless packing each group on its own computes fewer positions (texts of very different
    lengths: a row as wide as the longest passage would leave room no query fills). Embeddings come
    out in the groups' order either way."""
    groups = [g for g in groups if len(g)]
    joint = [t for g in groups for t in g]
    together = _layout(_lengths(joint), multiple)
    if len(groups) > 1:
        alone = [_layout(_lengths(g), multiple) for g in groups]
        if sum(w * len(rows) for w, rows in alone) < together[0] * len(together[1]):
            return [_fill(g, pad_id, *lay) for g, lay in zip(groups, alone)]
    return [_fill(joint, pad_id, *together)]


@torch.no_grad()
def packing_supported(model, token_ids: Sequence[int]) -> bool:
    """Whether ``model`` attends within packed texts only: the states of a text packed behind another
    must equal its states alone, far closer than the states it gets when it may see that other text
    (an ordinary causal pass over both). ``token_ids``: at least 4 ids of real text (the tokenizer's),
    split in two texts. Runs three forward passes of a few tokens in eval mode, restoring the mode."""
    ids = list(token_ids)[:16]
    if len(ids) < 4:
        raise ValueError("packing_supported needs at least 4 token ids")
    half = len(ids) // 2
    first, second = ids[:half], ids[half:]
    dev = next(model.parameters()).device
    both = torch.tensor([first + second], device=dev)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=dev)
    was_training = model.training
    model.eval()
    try:
        alone = hidden_states(model, torch.tensor([second], device=dev)).float()[0]
        packed = hidden_states(model, both, position_ids=positions).float()[0, half:]
        seeing = hidden_states(model, both).float()[0, half:]
    finally:
        model.train(was_training)
    off, context = (packed - alone).norm().item(), (seeing - alone).norm().item()
    ok = off <= 0.05 * context
    if not ok:
        log.info("packing: %s's states of a packed text differ from its states alone (%.3g, against %.3g "
                 "for a text that sees the other); its texts get rows of their own", type(model).__name__,
                 off, context)
    return ok
