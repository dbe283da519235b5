"""Unlabelled text for LLaRA's adaptation stage: readers, (chunk, next chunk) pairs, a streaming
dataset (the joint-pass collator is in :mod:`llara.data.collator`, the targets in
:mod:`llara.data.targets`).

Pipeline::

    files --iter_documents--> documents (lists of text units: paragraphs / passages / sentences)
          --Chunker---------> token-id chunks of one document (<= chunk_tokens each)
          --chunk pairs-----> PretrainExample(text_ids = chunk i, next_ids = chunk i+1)
          --PretrainDataset-> sharded (ranks x workers), shuffled, capped, resumable stream
          --PretrainCollator> one joint SELF + NEXT batch with EBAE / EBAR bag-of-words targets

Input: plain text, generic JSONL, BEIR ``corpus.jsonl`` and sequential passages
``{"doc", "idx", "text"}``, read lazily by ``llara.data.readers`` (see its docstring for the formats
and their defaults); malformed input raises ``llara.io.DataError`` naming ``file:line``.

Chunking (``chunking=``):

* ``"sentences"`` (default): units are split into sentences by a regex (no sentence splitter is
  available offline in this environment; see :func:`split_sentences`); whole sentences are packed
  greedily up to ``chunk_tokens``; a sentence longer than that is cut into ``chunk_tokens`` pieces
  and its last piece may take the following sentences.
* ``"tokens"``: fixed windows of at most ``chunk_tokens``; with ``balanced`` (default) a document of
  n tokens is cut into ceil(n / chunk_tokens) chunks of near-equal length, so there is no tiny
  trailing chunk.

The document is tokenized once, without special tokens; chunks are slices of its ids (in sentence
mode the sentence boundaries are mapped to tokens through the tokenizer's offsets), so a chunk's ids
are exactly the ids the model sees for that stretch of the document. Each chunk is paired with the
FOLLOWING chunk of the same document (EBAR target); the chunk itself is the EBAE target. A pair is
dropped when either side has fewer than ``min_chunk_tokens`` ids. A document with a single chunk is
skipped by default (``single_chunk="skip"``: every example then trains both tasks);
``single_chunk="ebae"`` gives it an EBAE-only example (empty ``next_ids``: its EBAR row has no
targets and is left out of the EBAR mean by the loss).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .chunking import CHUNKINGS, SINGLE_CHUNK, Chunker, PretrainExample, chunk_pairs
from .readers import FORMATS, TXT_MODES, iter_documents

logger = logging.getLogger(__name__)

__all__ = ["PretrainDataConfig", "PretrainDataset", "shuffle_buffer"]


# --------------------------------------------------------------------------- dataset


def _meta(help: str) -> dict:
    return {"help": help}


@dataclass
class PretrainDataConfig:
    """How unlabelled files become adaptation examples (everything but the paths and tokenizer)."""

    fmt: str = field(default="auto", metadata=_meta(f"input format, one of {FORMATS}"))
    text_field: str = field(default="text", metadata=_meta("text field of generic JSONL records"))
    title_field: str | None = field(default="title", metadata=_meta("title field of generic JSONL (None: ignore)"))
    txt_mode: str = field(default="blocks", metadata=_meta("plain text: a document per 'blocks' or per 'file'"))
    interleave: bool = field(default=False, metadata=_meta(
        "several inputs: take one document from each in turn instead of one file after the other"))
    chunk_tokens: int = field(default=120, metadata=_meta("maximum tokens per chunk"))
    chunking: str = field(default="sentences", metadata=_meta("'sentences' (greedy packing) or 'tokens'"))
    balanced: bool = field(default=True, metadata=_meta("token chunking: near-equal chunks, no tiny tail"))
    min_chunk_tokens: int = field(default=8, metadata=_meta("drop pairs with a shorter chunk on either side"))
    single_chunk: str = field(default="skip", metadata=_meta("one-chunk documents: 'skip' or 'ebae' (EBAE-only)"))
    joiner: str = field(default=" ", metadata=_meta("string between the units of a document"))
    shuffle_buffer: int = field(default=4096, metadata=_meta("examples in the shuffle buffer (<= 1: no shuffle)"))
    seed: int = field(default=0, metadata=_meta("shuffle seed (combined with the epoch and the shard)"))
    max_examples: int | None = field(default=None, metadata=_meta("cap on examples per epoch, over all shards"))
    tokenize_batch: int = field(default=64, metadata=_meta("documents tokenized per tokenizer call"))

    def __post_init__(self) -> None:
        choices = {"fmt": FORMATS, "txt_mode": TXT_MODES, "chunking": CHUNKINGS, "single_chunk": SINGLE_CHUNK}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.min_chunk_tokens < 0 or self.tokenize_batch < 1:
            raise ValueError("min_chunk_tokens must be >= 0 and tokenize_batch >= 1")
        if self.max_examples is not None and self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle of a stream with a buffer of ``size`` items (deterministic given rng)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _share(total: int, part: int, parts: int) -> int:
    """part's share when total items are split as evenly as possible over parts."""
    return total // parts + (1 if part < total % parts else 0)


class PretrainDataset(IterableDataset):
    """Stream of :class:`PretrainExample` from unlabelled files, never holding the corpus in memory.

    Sharding: the stream is split over ``world_size`` ranks x DataLoader workers by document index
    (document i goes to shard i % shards, shard = rank * num_workers + worker); every shard reads the
    files but tokenizes only its own documents. Each shard shuffles its examples with a buffer seeded
    by (seed, epoch, shard), then applies its share of ``max_examples``, then the pending skip.
    Ranks: by default every process reads the whole stream (rank 0 of 1), which is what
    ``llara.training.stream.BatchStream`` expects (each process takes every world-th batch and
    skip(n) counts examples of the whole stream). To split by rank instead, give rank and world_size,
    or distributed=True to take them from torch.distributed when it is initialised.

    Resuming: ``set_epoch(e)`` (clears any skip), then ``skip(n)`` with n = examples this rank has
    consumed in epoch e; the next iteration yields exactly the rest of the uninterrupted stream. With
    num_workers > 1 the DataLoader takes whole in-worker batches round-robin from the workers, so
    the loader's batch size b is needed (``loader_batch_size=b`` here, or ``skip(n, batch_size=b)``;
    n a multiple of b): the dataset skips each worker's
    share, and lets worker p continue the stream of worker (p + n / b) % num_workers, since the loader
    asks worker 0 first; this is exact while every worker still has batches left at the resume point
    (i.e. unless resuming within the last num_workers batches of an epoch). The stream depends on world_size and
    num_workers: resume with the same values. Workers receive a copy of the dataset when the loader's
    iterator is created, so call set_epoch/skip before ``iter(loader)`` and do not use
    persistent_workers. Skipped examples are still read and tokenized (cheap next to a training step).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer,
        config: PretrainDataConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        distributed: bool = False,
        loader_batch_size: int | None = None,
        prepare: Callable[[Sequence[str]], list[str]] | None = None,
        **options: Any,
    ):
        super().__init__()
        self.prepare = prepare  # e.g. Template.prepare: the template's case normalisation of each text unit
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise ValueError("no input files")
        self.config = dataclasses.replace(config or PretrainDataConfig(), **options)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.distributed = rank, world_size, distributed
        if loader_batch_size is not None and loader_batch_size < 1:
            raise ValueError(f"loader_batch_size must be >= 1, got {loader_batch_size}")
        self.loader_batch_size = loader_batch_size
        self.tokenizer = tokenizer
        c = self.config
        self.chunker = Chunker(tokenizer, c.chunk_tokens, c.chunking, balanced=c.balanced, joiner=c.joiner)
        self.epoch = 0
        self._skip = 0
        self._skip_batch: int | None = None

    # -- state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle order; clears a pending skip."""
        self.epoch = int(epoch)
        self._skip, self._skip_batch = 0, None

    def skip(self, n: int, batch_size: int | None = None) -> None:
        """Make the next iterations start after the first n examples of this rank's stream."""
        if n < 0:
            raise ValueError(f"cannot skip {n} examples")
        if batch_size is not None and (batch_size < 1 or n % batch_size):
            raise ValueError(f"skip({n}) with batch size {batch_size}: n must be a multiple of the batch size")
        self._skip, self._skip_batch = int(n), batch_size

    # -- iteration
    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if self.distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _skip_batch_size(self) -> int:
        size = self._skip_batch or self.loader_batch_size
        if size is None:
            raise ValueError("skip(n) with several DataLoader workers needs the loader's batch size: "
                             "PretrainDataset(..., loader_batch_size=b) or skip(n, batch_size=b)")
        if self._skip % size:
            raise ValueError(f"skip({self._skip}) with batch size {size}: n must be a multiple of the batch size")
        return size

    def _worker_skip(self, worker: int, workers: int) -> int:
        if workers == 1 or self._skip == 0:
            return self._skip
        size = self._skip_batch_size()
        return len(range(worker, self._skip // size, workers)) * size

    def documents(self) -> Iterator[list[str]]:
        c = self.config
        docs = iter_documents(self.paths, fmt=c.fmt, text_field=c.text_field, title_field=c.title_field,
                              txt_mode=c.txt_mode, interleave=c.interleave)
        return docs if self.prepare is None else map(self.prepare, docs)

    def shard_examples(self, shard: int = 0, shards: int = 1) -> Iterator[PretrainExample]:
        """Unshuffled examples of the documents d with d % shards == shard, in file order."""
        c = self.config

        def flush(batch: list[tuple[int, list[str]]]) -> Iterator[PretrainExample]:
            for (doc, _), chunks in zip(batch, self.chunker([units for _, units in batch])):
                yield from chunk_pairs(chunks, min_chunk_tokens=c.min_chunk_tokens,
                                       single_chunk=c.single_chunk, doc=doc)

        batch: list[tuple[int, list[str]]] = []
        docs = 0
        for doc, units in enumerate(self.documents()):
            if doc % shards != shard:
                continue
            docs += 1
            batch.append((doc, units))
            if len(batch) >= c.tokenize_batch:
                yield from flush(batch)
                batch = []
        yield from flush(batch)
        logger.debug("shard %d/%d: %d documents read", shard, shards, docs)

    def __iter__(self) -> Iterator[PretrainExample]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers > 1 and self._skip:
            # The loader asks worker 0 first, but after k batches the uninterrupted run would ask
            # worker k % workers next: worker p plays the part of worker (p + k) % workers.
            worker = (worker + self._skip // self._skip_batch_size()) % workers
        skip = self._worker_skip(worker, workers)
        shard, shards = rank * workers + worker, world * workers
        c = self.config
        rng = random.Random(f"llara-pretrain|{c.seed}|{self.epoch}|{shard}|{shards}")
        stream: Iterator[PretrainExample] = shuffle_buffer(self.shard_examples(shard, shards), c.shuffle_buffer, rng)
        if c.max_examples is not None:
            stream = itertools.islice(stream, _share(c.max_examples, shard, shards))
        if skip:
            stream = itertools.islice(stream, skip, None)
        yield from stream
