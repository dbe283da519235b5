"""Contrastive fine-tuning pieces: training groups, a no-duplicate-positive sampler, the collator,
cross-device negatives and gradient caching (GradCache). The embeddings are
:func:`llara.modeling.embed.embed`'s, the Encoder's path with gradients.

A training group is one query, one positive and ``group_size - 1`` hard negatives; with in-batch
negatives every query is scored against every passage of the (global) batch.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..io import DataError, iter_jsonl
from .losses import info_nce
from ..modeling.embed import embed, pack, pad_token_id, tokenize
from ..modeling.packing import PackedText, pack_texts, plain_or_packed
from ..prompts import encode_side, get_template



@dataclass
class Group:
    query: str
    pos: list[str]
    neg: list[str]


def load_groups(path: str | Path, group_size: int = 1) -> list[Group]:
    """``{"query", "pos": [...], "neg": [...]}`` lines (``llara mine`` output); file:line errors.
    With ``group_size > 1`` every line needs at least one negative (they are sampled with replacement)."""
    path = Path(path)
    groups = []
    for n, obj in iter_jsonl(path):
        if not isinstance(obj.get("query"), str):
            raise DataError(path, n, "missing string field 'query'")
        pos, neg = obj.get("pos"), obj.get("neg", [])
        if not isinstance(pos, list) or not pos or not all(isinstance(p, str) for p in pos):
            raise DataError(path, n, "'pos' must be a non-empty list of strings")
        if not isinstance(neg, list) or not all(isinstance(p, str) for p in neg):
            raise DataError(path, n, "'neg' must be a list of strings")
        if group_size > 1 and not neg:
            raise DataError(path, n, f"'neg' is empty, but --group-size {group_size} needs a hard negative per "
                                     "query: add negatives (llara mine tops them up), drop the line, or use --group-size 1")
        groups.append(Group(obj["query"], pos, neg))
    if not groups:
        raise DataError(path, None, "no training groups")
    return groups


class UniquePositiveBatches:
    """Batches of group indices in which no positive passage appears twice (so an in-batch
    'negative' is never another copy of a query's positive). Seeded, reshuffled per epoch; a group
    that would collide waits for a later batch."""

    def __init__(self, groups: Sequence[Group], batch_size: int, seed: int = 0, drop_last: bool = True):
        self.groups, self.batch_size, self.seed, self.drop_last = groups, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.groups)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        pending: list[int] = []
        batch: list[int] = []
        texts: set[str] = set()
        for i in order:
            waiting = pending + [i]
            pending = []
            for j in waiting:
                pos = set(self.groups[j].pos)
                if texts & pos:
                    pending.append(j)
                    continue
                batch.append(j)
                texts |= pos
                if len(batch) == self.batch_size:
                    yield batch
                    batch, texts = [], set()
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.groups) // self.batch_size
        return n if self.drop_last else -(-len(self.groups) // self.batch_size)


class ContrastiveCollator:
    """Groups -> query batch (NEXT prompt by default) and passage batch (SELF prompt), each with the
    pooling weights of its template side and the template's normalisation (``embed`` reads both),
    built by :mod:`llara.modeling.embed` as the Encoder builds them. Passages are laid out query by
    query, positive first.

    With ``packing`` the texts are packed into rows (:mod:`llara.modeling.packing`), here on the host
    before the batch goes to the device: ``{"passes": [...], "num_queries", "num_tokens"}`` for a
    plain step (one pass over queries and passages, or one per side when that computes fewer
    positions), or ``{"query": [...], "passage": [...], "num_tokens"}`` with one packed pass per
    ``grad_cache_chunk`` texts of a side for GradCache. Without it, one right-padded batch per side."""

    def __init__(self, tokenizer, template="llara", *, group_size: int = 16, max_query_length: int = 64,
                 max_passage_length: int = 160, pad_to_multiple_of: int = 8, seed: int = 0,
                 packing: bool = False, grad_cache_chunk: int = 0):
        self.tok = tokenizer
        self.template = get_template(template)
        self.q_side = encode_side(tokenizer, self.template.query)
        self.p_side = encode_side(tokenizer, self.template.passage)
        self.group_size = group_size
        self.max_len = {"query": max_query_length, "passage": max_passage_length}
        self.multiple = pad_to_multiple_of
        self.seed = seed
        self.epoch = 0
        self.pad_id = pad_token_id(tokenizer)
        self.packing = packing
        self.grad_cache_chunk = grad_cache_chunk

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _built(self, texts: list[str], side):
        name = "query" if side is self.q_side else "passage"
        return tokenize(self.tok, side, self.template.prepare(texts), self.max_len[name])[0]

    def _side_batch(self, texts: list[str], side) -> dict[str, Tensor]:
        return pack(self._built(texts, side), [side], self.pad_id, self.multiple).side_batch(self.template)

    def sample_passages(self, g: Group, key: str) -> list[str]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{key}")
        pos = rng.choice(g.pos)
        k = self.group_size - 1
        if k == 0:
            return [pos]
        if not g.neg:
            raise ValueError(f"query {g.query[:60]!r} has no negatives but group_size is {self.group_size}")
        neg = rng.sample(g.neg, k) if len(g.neg) >= k else [rng.choice(g.neg) for _ in range(k)]
        return [pos] + neg

    def _texts(self, texts: list[str], side) -> list[PackedText]:
        return [(ids, side.pool_positions(len(ids), start, end), self.template.normalize)
                for ids, start, end in self._built(texts, side)]

    def __call__(self, groups: Sequence[Group]) -> dict:
        queries = [g.query for g in groups]
        passages = [p for g in groups for p in self.sample_passages(g, g.query)]
        if not self.packing:
            return {"query": self._side_batch(queries, self.q_side),
                    "passage": self._side_batch(passages, self.p_side)}
        q, p = self._texts(queries, self.q_side), self._texts(passages, self.p_side)
        tokens = torch.tensor(sum(len(ids) for ids, _, _ in q + p))
        if self.grad_cache_chunk:
            n = self.grad_cache_chunk
            return {side: [pack_texts(texts[i : i + n], self.pad_id, self.multiple) for i in range(0, len(texts), n)]
                    for side, texts in (("query", q), ("passage", p))} | {"num_tokens": tokens}
        return {"passes": plain_or_packed([q, p], self.pad_id, self.multiple), "num_queries": len(q),
                "num_tokens": tokens}


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows concatenated (rank order), differentiable; returns (rows, this rank's offset).

    ``torch.distributed.nn.all_gather`` sums the gradients of every rank's copy back into the owner,
    so with DDP's gradient averaging the result is the gradient of the mean loss over all queries
    of the global batch; no extra world-size factor is needed (tests check 2 processes against one
    process with the doubled batch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, 0), dist.get_rank() * x.size(0)


def contrastive_loss(q: Tensor, p: Tensor, temperature: float, cross_device: bool = True) -> Tensor:
    """InfoNCE of local queries against all passages (other devices' too when ``cross_device``)."""
    group = p.size(0) // q.size(0)
    if cross_device:
        p, offset = gather_with_grad(p)
        return info_nce(q, p, temperature, group_size=group, offset=offset)
    return info_nce(q, p, temperature)


def _chunks(batch: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    n = batch["input_ids"].size(0)
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


class _RandState:
    """Capture and replay the RNG state so that dropout masks match between GradCache's two passes."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def replay(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def grad_cache_step(model, batch: dict, temperature: float, chunk_size: int, *,
                    cross_device: bool = True, no_sync: Callable | None = None, scale: float = 1.0) -> Tensor:
    """One contrastive step with gradient caching; runs backward itself and returns the loss
    (detached). Memory is that of one chunk's graph, whatever the batch size.

    1. embeddings of every chunk without graphs; 2. loss and its gradient w.r.t. the embeddings;
    3. per chunk, recompute the embeddings with a graph (same dropout) and backpropagate the cached
    gradient. ``no_sync`` (e.g. DDP's) is entered for all but the last chunk. ``scale`` multiplies
    the gradients (1 / gradient-accumulation steps). A side is one padded batch (cut here into
    chunks of ``chunk_size`` texts) or a list of packed passes, one per chunk (the collator's, with
    ``packing``)."""
    dev = next(model.parameters()).device
    chunks = {side: batch[side] if isinstance(batch[side], list) else _chunks(batch[side], chunk_size)
              for side in ("query", "passage")}
    states, embs = {}, {}
    with torch.no_grad():
        for side in ("query", "passage"):
            states[side], parts = [], []
            for c in chunks[side]:
                states[side].append(_RandState(dev))
                parts.append(embed(model, c))
            embs[side] = torch.cat(parts).requires_grad_(True)
    loss = contrastive_loss(embs["query"], embs["passage"], temperature, cross_device)
    (loss * scale).backward()
    work = []
    for side in ("query", "passage"):
        start = 0
        for c, s in zip(chunks[side], states[side]):
            n = c["normalize"].size(0)  # texts in the chunk (a shape: no read from the device)
            work.append((side, c, s, embs[side].grad[start : start + n]))
            start += n
    for n, (side, c, state, grad) in enumerate(work):
        ctx = no_sync() if (no_sync is not None and n < len(work) - 1) else nullcontext()
        with ctx:
            cur = torch.get_rng_state()
            state.replay()
            e = embed(model, c)
            torch.set_rng_state(cur)
            e.backward(grad)
    return loss.detach()
