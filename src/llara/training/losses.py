"""LLaRA losses: EBAE/EBAR bag-of-words losses, the causal LM loss and InfoNCE.

Everything here is a pure function (tensors in, tensors out) so it can be tested without a model.
The bag-of-words targets themselves (:func:`llara.data.targets.bow_targets`,
:func:`llara.data.targets.target_filter`) are built with the pretraining data.
Shapes: B batch, K slot positions per prompt (8 in the authors' form), H hidden size, V vocabulary,
T padded number of target ids per row, L sequence length, G passages per query.

Precision: logits are produced in the dtype of the hidden states (a bf16 matmul accumulates in
fp32 anyway); every reduction that needs range or precision (log-sum-exp, cross entropy, InfoNCE
scores) is done in fp32, and only on tensors that are already reduced or chunked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..modeling.embed import gather_positions

__all__ = [
    "slot_logits",
    "bow_loss_authors",
    "bow_loss_paper",
    "causal_lm_loss",
    "llara_pretrain_loss",
    "info_nce",
]


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
    positions: Tensor | None = None,
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
    positions (N,) long, optional: the flat indices ``b * L + j - 1`` of those predicting states,
    computed on the host (``llara.modeling.masks.lm_positions``); with them no device
    synchronisation is needed (selecting by ``text_mask`` must read the mask back to size the result).
    Returns the mean over counted tokens (fp32 scalar); 0 when there are none.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if positions is not None:
        flat = positions.to(hidden.device, torch.long)
        h = hidden.reshape(-1, hidden.size(-1)).index_select(0, flat)  # (N, H)
        y = input_ids.reshape(-1).to(hidden.device).index_select(0, flat + 1).to(torch.long)  # (N,)
    else:
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
    lm_positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """The LLaRA adaptation objective from one joint forward pass.

    hidden (B, L, H): final hidden states (after the last norm); lm_head_weight (V, H).
    self_positions / next_positions (B, K) long: positions of the SELF (EBAE) / NEXT (EBAR) slots
    (K = 8 in the authors' form, K = 1 for the paper's `</s>`). *_targets, *_target_mask (B, T):
    from `bow_targets` (EBAE: the text's own tokens; EBAR: the next passage's tokens).
    input_ids, text_mask (B, L): for the causal LM loss on the text tokens (see `causal_lm_loss`);
    lm_positions: their host-computed flat indices (`llara.modeling.masks.lm_positions`), which spare a device sync.
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
            hidden, input_ids, text_mask, lm_head_weight, chunk_size, bias=lm_head_bias, softcap=softcap,
            positions=lm_positions,
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
