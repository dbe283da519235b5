"""LLaRA losses: EBAE/EBAR bag-of-words losses, the causal LM loss, InfoNCE, and target filtering.

Everything here is a pure function (tensors in, tensors out) so it can be tested without a model.
Shapes: B batch, K slot positions per prompt (8 in the authors' form), H hidden size, V vocabulary,
T padded number of target ids per row, L sequence length, G passages per query.

Precision: logits are produced in the dtype of the hidden states (a bf16 matmul accumulates in
fp32 anyway); every reduction that needs range or precision (log-sum-exp, cross entropy, InfoNCE
scores) is done in fp32, and only on tensors that are already reduced or chunked.
"""
from __future__ import annotations

import logging
import string
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .modeling.embed import gather_positions, pad_right

gather_states = gather_positions  # (B, L, H) states at (B, K) positions, as modeling.embed reads them

logger = logging.getLogger(__name__)

__all__ = [
    "bow_targets",
    "slot_logits",
    "gather_states",
    "bow_loss_authors",
    "bow_loss_paper",
    "causal_lm_loss",
    "llara_pretrain_loss",
    "info_nce",
    "target_filter",
]


# --------------------------------------------------------------------------- targets


def bow_targets(
    target_ids: Sequence[Sequence[int] | Tensor],
    vocab_size: int,
    keep: Tensor | None = None,
    *,
    unique: bool = True,
    pad_id: int = 0,
    min_width: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Turn per-row lists of target token ids into a padded id tensor and its mask.

    target_ids: B rows of token ids (lists or 1D tensors), e.g. the tokens of the text (EBAE) or of
    the next passage (EBAR). keep: optional (V',) bool mask from `target_filter`; ids with
    keep[id] False are dropped. unique: remove repeated ids in a row (first occurrence kept, the
    authors' form); False keeps multiplicity (the paper's form).
    Returns targets (B, T) long (padding = pad_id, a valid index) and mask (B, T) bool, with
    T = max(min_width, longest row after filtering). Rows may end up empty (mask all False).
    """
    rows: list[list[int]] = []
    keep_list = keep.tolist() if keep is not None else None
    for row in target_ids:
        ids = row.tolist() if isinstance(row, Tensor) else [int(i) for i in row]
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"target id {i} outside the vocabulary [0, {vocab_size})")
        if keep_list is not None:
            ids = [i for i in ids if i < len(keep_list) and keep_list[i]]
        if unique:
            ids = list(dict.fromkeys(ids))
        rows.append(ids)
    targets, mask = pad_right(rows, pad_id, min_length=min_width)
    return targets.to(device), mask.bool().to(device)


def _unique_mask(targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """targets, mask (B, T). Returns (sorted targets (B, T), mask (B, T)) keeping each id once per row."""
    marked = targets.masked_fill(~mask, -1)  # padding sorts first and is never a duplicate of an id
    ids, _ = marked.sort(dim=1)  # (B, T)
    repeat = torch.zeros_like(mask)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.clamp(min=0), (ids >= 0) & ~repeat


# --------------------------------------------------------------------------- logits


def slot_logits(
    hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """LM-head logits at the given states only: hidden (B, K, H), weight (V, H) -> (B, K, V).

    softcap: final-logit soft-capping (Gemma-2 style), softcap * tanh(logits / softcap).
    The result keeps the dtype of `hidden`; callers upcast after reducing.
    """
    logits = hidden @ lm_head_weight.T  # (B, K, V)
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


# --------------------------------------------------------------------------- bag-of-words losses


def _bag_nll(logits: Tensor, targets: Tensor, mask: Tensor, unique: bool) -> Tensor:
    """logits (B, V) any dtype; targets, mask (B, T). Mean over rows with targets of
    -mean_t log softmax(logits)[t]. Rows without targets are skipped; no rows -> 0 (with a graph)."""
    if targets.shape != mask.shape or targets.size(0) != logits.size(0):
        raise ValueError(f"targets {tuple(targets.shape)}, mask {tuple(mask.shape)}, logits {tuple(logits.shape)}")
    mask = mask.to(torch.bool)
    if unique:
        targets, mask = _unique_mask(targets, mask)
    logits = logits.float()  # (B, V) fp32: the only full-vocabulary fp32 tensor
    # log p(t) = z_t - logsumexp(z): avoids materialising a second (B, V) log-softmax tensor
    lse = torch.logsumexp(logits, dim=-1)  # (B,)
    picked = logits.gather(1, targets).masked_fill(~mask, 0.0)  # (B, T)
    count = mask.sum(1)  # (B,)
    has = count > 0
    per_row = lse - picked.sum(1) / count.clamp(min=1)  # (B,)
    per_row = torch.where(has, per_row, torch.zeros_like(per_row))
    return per_row.sum() / has.sum().clamp(min=1)


def bow_loss_authors(
    slot_logits: Tensor, targets: Tensor, target_mask: Tensor, *, unique: bool = True
) -> Tensor:
    """The authors' EBAE/EBAR loss. slot_logits (B, K, V); targets, target_mask (B, T).

    Max-pool the logits over the K slot positions per vocabulary entry, log-softmax over the
    vocabulary, minus the mean log-prob over each row's unique target ids; mean over the rows that
    have targets. Returns a scalar fp32 tensor.
    """
    pooled = slot_logits.amax(dim=1)  # (B, V), native dtype: max is exact, upcast after pooling
    return _bag_nll(pooled, targets, target_mask, unique)


def bow_loss_paper(
    embedding: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    target_mask: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    unique: bool = False,
) -> Tensor:
    """The paper's EBAE/EBAR loss. embedding (B, H); weight (V, H); targets, target_mask (B, T).

    Logits of the one embedding through the LM head, log-softmax, minus the mean log-prob of the
    targets (with multiplicity unless unique=True); mean over the rows that have targets.
    """
    logits = slot_logits(embedding[:, None], lm_head_weight, bias, softcap)[:, 0]  # (B, V)
    return _bag_nll(logits, targets, target_mask, unique)


# --------------------------------------------------------------------------- causal LM loss


def _ce_sum(h: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """h (N, H); y (N,) -> summed cross entropy of the LM-head logits, fp32 scalar."""
    logits = slot_logits(h[None], weight, bias, softcap)[0]  # (N, V)
    return F.cross_entropy(logits.float(), y, reduction="sum")


def causal_lm_loss(
    hidden: Tensor,
    input_ids: Tensor,
    text_mask: Tensor,
    lm_head_weight: Tensor,
    chunk_size: int = 1024,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    recompute: bool = True,
) -> Tensor:
    """Next-token loss on the text tokens: hidden (B, L, H); input_ids (B, L); text_mask (B, L) bool.

    Token j counts as a target when text_mask[b, j] (j >= 1); it is predicted from hidden[b, j-1]
    (the usual shift, so the first text token is predicted from the prompt token before it). This
    equals F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100) with labels =
    input_ids where text_mask else -100, but logits are only formed at those positions, chunk_size
    of them at a time. With recompute (default, when gradients are needed) and more than one chunk,
    each chunk is checkpointed, so backward keeps one chunk's (chunk_size, V) logits alive instead of
    all of them. A single chunk is not: its logits exist once either way, and recomputing them would
    cost a second LM-head product and log-softmax for no memory saved.
    Returns the mean over counted tokens (fp32 scalar); 0 when there are none.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    select = text_mask[:, 1:].to(torch.bool)  # (B, L-1): targets at j >= 1
    h = hidden[:, :-1][select]  # (N, H) states that predict a text token
    y = input_ids[:, 1:][select].to(torch.long)  # (N,)
    n = y.numel()
    if n == 0:
        return (hidden.sum() + lm_head_weight.sum()).float() * 0.0
    needs_grad = torch.is_grad_enabled() and (
        h.requires_grad or lm_head_weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        if recompute and needs_grad and n > chunk_size:
            total = total + checkpoint(_ce_sum, hc, yc, lm_head_weight, bias, softcap, use_reentrant=False)
        else:
            total = total + _ce_sum(hc, yc, lm_head_weight, bias, softcap)
    return total / n


# --------------------------------------------------------------------------- pretraining objective


def llara_pretrain_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    self_positions: Tensor | None = None,
    self_targets: Tensor | None = None,
    self_target_mask: Tensor | None = None,
    next_positions: Tensor | None = None,
    next_targets: Tensor | None = None,
    next_target_mask: Tensor | None = None,
    input_ids: Tensor | None = None,
    text_mask: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    softcap: float | None = None,
    form: str = "authors",
    use_ebae: bool = True,
    use_ebar: bool = True,
    bow_scale: float = 0.1,
    bow_reduce: str = "mean",
    lm_weight: float = 1.0,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """The LLaRA adaptation objective from one joint forward pass.

    hidden (B, L, H): final hidden states (after the last norm); lm_head_weight (V, H).
    self_positions / next_positions (B, K) long: positions of the SELF (EBAE) / NEXT (EBAR) slots
    (K = 8 in the authors' form, K = 1 for the paper's `</s>`). *_targets, *_target_mask (B, T):
    from `bow_targets` (EBAE: the text's own tokens; EBAR: the next passage's tokens).
    input_ids, text_mask (B, L): for the causal LM loss on the text tokens (see `causal_lm_loss`).
    form: "authors" (max-pool slot logits, unique targets) or "paper" (logits of the mean slot
    state, i.e. the one `</s>` state when K = 1; targets with multiplicity).
    loss = bow_scale * reduce(active of EBAE, EBAR) + lm_weight * LM, reduce = mean (authors) or sum.

    Returns {"loss": scalar with graph, "ebae", "ebar", "bow", "lm": detached scalars for logging};
    ebae/ebar are unscaled; a switched-off component is reported as 0.
    """
    if form not in ("authors", "paper"):
        raise ValueError(f"unknown form {form!r}: expected 'authors' or 'paper'")
    if bow_reduce not in ("mean", "sum"):
        raise ValueError(f"unknown bow_reduce {bow_reduce!r}: expected 'mean' or 'sum'")

    def bow(name: str, positions: Tensor | None, targets: Tensor | None, mask: Tensor | None) -> Tensor:
        if positions is None or targets is None or mask is None:
            raise ValueError(f"{name} is on but its positions/targets/target_mask are missing")
        states = gather_positions(hidden, positions)  # (B, K, H)
        if form == "authors":
            return bow_loss_authors(slot_logits(states, lm_head_weight, lm_head_bias, softcap), targets, mask)
        return bow_loss_paper(
            states.mean(1), lm_head_weight, targets, mask, bias=lm_head_bias, softcap=softcap
        )

    zero = hidden.new_zeros((), dtype=torch.float32)
    parts: list[Tensor] = []
    ebae = ebar = lm = zero
    if use_ebae:
        ebae = bow("EBAE", self_positions, self_targets, self_target_mask)
        parts.append(ebae)
    if use_ebar:
        ebar = bow("EBAR", next_positions, next_targets, next_target_mask)
        parts.append(ebar)
    if not parts and lm_weight == 0:
        raise ValueError("every loss component is switched off")
    bow_total = zero
    if parts:
        bow_total = torch.stack(parts).sum() if bow_reduce == "sum" else torch.stack(parts).mean()
    loss = bow_scale * bow_total
    if lm_weight:
        if input_ids is None or text_mask is None:
            raise ValueError("lm_weight > 0 needs input_ids and text_mask")
        lm = causal_lm_loss(
            hidden, input_ids, text_mask, lm_head_weight, chunk_size, bias=lm_head_bias, softcap=softcap
        )
        loss = loss + lm_weight * lm
    return {
        "loss": loss,
        "ebae": ebae.detach(),
        "ebar": ebar.detach(),
        "bow": bow_total.detach(),
        "lm": lm.detach(),
    }


# --------------------------------------------------------------------------- contrastive


def info_nce(
    q: Tensor,
    d: Tensor,
    temperature: float = 0.01,
    *,
    group_size: int | None = None,
    offset: int = 0,
) -> Tensor:
    """InfoNCE with hard and in-batch negatives. q (B, H); d (N, H), compared by dot product
    (pass L2-normalised embeddings for cosine similarity).

    Rows [offset + i*G, offset + (i+1)*G) of d belong to query i, positive first; every other row of
    d is a negative. Without offset, d is this batch's B*G passages and G is inferred. When d holds
    passages gathered from several devices and q only this device's queries, pass group_size and
    offset = rank * B * G (the first row of this device's block). Scores are computed in fp32.
    """
    if group_size is None:
        if offset:
            raise ValueError("offset needs an explicit group_size")
        if d.size(0) % q.size(0):
            raise ValueError(f"{d.size(0)} passages for {q.size(0)} queries")
        group_size = d.size(0) // q.size(0)
    if group_size < 1 or offset < 0 or offset + q.size(0) * group_size > d.size(0):
        raise ValueError(
            f"{q.size(0)} queries x group {group_size} at offset {offset} do not fit {d.size(0)} passages"
        )
    scores = q.float() @ d.float().T / temperature  # (B, N)
    target = offset + torch.arange(q.size(0), device=q.device) * group_size  # (B,)
    return F.cross_entropy(scores, target)


# --------------------------------------------------------------------------- target filtering

# word-start markers of byte-level BPE (GPT-2, LLaMA-3, Qwen) and SentencePiece (LLaMA-2, Mistral);
# the bare form is found by encoding, so a SentencePiece mid-word piece such as 'the' is not dropped
_WORD_MARKERS = ("Ġ", "▁")


def _is_punctuation(text: str) -> bool:
    """Non-empty after stripping, and every character is ASCII punctuation or Unicode P*."""
    text = text.strip()
    return bool(text) and all(
        ch in string.punctuation or unicodedata.category(ch).startswith("P") for ch in text
    )


def target_filter(
    tokenizer: Any,
    vocab_size: int | None = None,
    *,
    stopwords: Iterable[str] | None = None,
    language: str = "en",
    drop_stopwords: bool = True,
    drop_punctuation: bool = True,
    drop_whitespace: bool = True,
    drop_special: bool = True,
    bare_min_len: int = 4,
) -> Tensor:
    """Which token ids may be bag-of-words targets: a (V,) bool tensor, usable as keep[target_ids].

    Dropped:
    - stopwords (default: `stop_words.get_stop_words(language)`; entries without a letter, such as
      '10' or '39', are ignored): each word and its capitalised form, with and without a leading
      space, as the tokenizer encodes them when that gives one token (word-start markers 'Ġ'/'▁'
      are also looked up in the vocabulary directly). Where the tokenizer marks word starts, a
      lowercase stopword's unmarked token is a sub-word piece too, so for words shorter than
      bare_min_len ('ed', 'er', 'the' in 'a|the|ist') it is kept (capitalised ones are dropped);
    - tokens that decode to pure punctuation (and, with drop_whitespace, to whitespace only);
    - every special token (BOS/EOS/PAD/UNK, added special tokens such as the slot tokens);
    - ids in [len(tokenizer), vocab_size), the padding rows of a resized embedding matrix.
    vocab_size: the model's vocabulary size (defaults to len(tokenizer)).
    """
    n_tok = len(tokenizer)
    size = max(vocab_size or 0, n_tok)
    keep = torch.zeros(size, dtype=torch.bool)
    keep[:n_tok] = True
    texts = tokenizer.batch_decode([[i] for i in range(n_tok)], skip_special_tokens=False)
    blank = {i for i, t in enumerate(texts) if not t.strip()}

    special: set[int] = set()
    if drop_special:
        special.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        for i, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                special.add(int(i))
        special = {i for i in special if 0 <= i < n_tok}
        keep[list(special)] = False

    punct: set[int] = set()
    if drop_punctuation:
        punct = {i for i, t in enumerate(texts) if _is_punctuation(t)}
    if drop_whitespace:
        punct |= blank
    if punct:
        keep[list(punct)] = False

    stop_ids: set[int] = set()
    if drop_stopwords:
        if stopwords is None:
            from stop_words import get_stop_words

            stopwords = get_stop_words(language)
        words = {w.strip() for w in stopwords if any(ch.isalpha() for ch in w)}
        variants = sorted({v for w in words for v in (w, w[:1].upper() + w[1:])})
        vocab = tokenizer.get_vocab()
        for v in variants:
            for marker in _WORD_MARKERS:
                i = vocab.get(marker + v)
                if i is not None and 0 <= i < n_tok:
                    stop_ids.add(i)
        spaced = [" " + v for v in variants]
        encoded = tokenizer(variants + spaced, add_special_tokens=False)["input_ids"]

        def single(s: str, ids: list[int]) -> int | None:
            """The one token s encodes to, if it decodes back to s (not <unk>, not a piece)."""
            if len(ids) != 1:
                # SentencePiece may give [lone marker, marked word]; byte-level BPE gives
                # ['Ġ', 'ed'] for a word without a marked token, and that 'ed' is a sub-word piece
                ids = [i for i in ids if i not in blank]
                if len(ids) != 1 or not tokenizer.convert_ids_to_tokens(ids[0]).startswith(_WORD_MARKERS):
                    return None
            if texts[ids[0]].strip().casefold() == s.strip().casefold():
                return ids[0]
            return None

        for v, bare_ids, spaced_ids in zip(variants, encoded[: len(variants)], encoded[len(variants) :]):
            spaced_id = single(" " + v, spaced_ids)
            if spaced_id is not None:
                stop_ids.add(spaced_id)
            bare_id = single(v, bare_ids)
            if bare_id is None:
                continue
            # With word-start markers (byte-level BPE) the bare form of a word is also a sub-word
            # piece ('walk|ed', 'quick|ly'); a short lowercase one is mostly that, so keep it.
            if bare_id != spaced_id and v[:1].islower() and len(v) < bare_min_len:
                continue
            stop_ids.add(bare_id)
        if stop_ids:
            keep[list(stop_ids)] = False

    logger.info(
        "target filter: %d of %d ids kept (%d stopword, %d punctuation/blank, %d special ids dropped)",
        int(keep.sum()), size, len(stop_ids), len(punct), len(special),
    )
    return keep
