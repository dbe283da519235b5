"""Micro-batching for the service: concurrent searches and embedding requests share one worker job.

Each request puts its queries (or texts to embed) on an asyncio queue; a single worker collects them
(see :class:`MicroBatcher` for the policy) and runs one job for all of them in a dedicated thread:
``searcher.search_requests`` for the searches, ``encoder.encode`` once per side for the embeddings.
When ``max_pending`` texts already wait, a new request is refused at once (:class:`Saturated`,
answered 429 + ``Retry-After`` by :mod:`llara.serve.app`).
"""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Embedded", "Job", "MicroBatcher", "Saturated", "check_limits", "token_counts"]


def check_limits(max_batch: int, max_pending: int | None, max_queries: int | None, max_inputs: int | None) -> tuple:
    """(max_pending, max_queries, max_inputs) of a :class:`MicroBatcher` and the requests it admits, with their
    defaults; ValueError for limits that cannot hold."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    max_pending = max_pending or 8 * max_batch
    if max_pending < max_batch:
        raise ValueError(f"max_pending ({max_pending}) must be >= max_batch ({max_batch})")
    max_queries = max_queries or max_batch
    max_inputs = max_inputs or max_pending
    for name, value in (("max_queries", max_queries), ("max_inputs", max_inputs)):
        if not 1 <= value <= max_pending:  # a larger request could never be admitted
            raise ValueError(f"{name} ({value}) must be between 1 and max_pending ({max_pending})")
    return max_pending, max_queries, max_inputs


class Saturated(Exception):
    """The encoder's queue is full; ``retry_after`` seconds is when it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__(f"the encoder is saturated; retry after {retry_after} s")
        self.retry_after = retry_after


def token_counts(encoder, texts: list[str], side: str) -> list[int]:
    """Tokens the model runs for each text: the text (cut to the side's maximum length) in its prompt,
    as ``encoder.encode(texts, side)`` feeds them (read from its batches' attention masks)."""
    counts = [0] * len(texts)
    for rows, batch in encoder.batches(texts, side):
        for r, n in zip(rows.tolist(), batch.attention_mask.sum(1).tolist()):
            counts[r] = int(n)
    return counts


@dataclass(eq=False)
class Job:
    """One request's work: a search (``side`` None) or texts to embed on ``side``."""

    texts: tuple[str, ...]
    future: asyncio.Future
    side: str | None = None
    k: int = 0
    mode: str | None = None
    fusion: Any = None


@dataclass
class Embedded:
    """The answer to an embedding job: (n, dim) float32 vectors and the tokens each text ran."""

    vectors: np.ndarray
    tokens: list[int] = field(default_factory=list)


class MicroBatcher:
    """Collect concurrent searches and embedding requests into one worker job, run in one thread:
    ``searcher.search_requests`` for all searches, ``encoder.encode`` once per side for the embeddings.

    Batching policy: when the worker is free it takes the oldest request, then keeps collecting
    until the batch holds as many texts as are expected, or ``max_wait_ms`` have passed since it
    started collecting, or ``max_batch`` is reached. Expected = the texts of the batch just
    answered (their clients tend to send again within milliseconds) plus those that queued while
    it ran. Counting the wait from when the *worker* is free, not from when the oldest request
    arrived, matters: requests that queued during a long encoder call have already used up their
    wait, and would otherwise leave at once without the clients just answered, so that two
    half-size groups take turns on the encoder. One client never waits (expected = 1). A request
    is never split: one larger than ``max_batch`` runs as a batch of its own (the encoder batches
    it internally).

    At most ``max_pending`` texts (default: 8 batches) wait or run at once; beyond that
    :meth:`search` and :meth:`embed` raise :class:`Saturated` at once instead of queueing.
    ``searcher`` may be None (embeddings only); ``encoder`` defaults to ``searcher.encoder``."""

    def __init__(self, searcher, max_batch: int, max_wait_ms: float, max_pending: int | None = None, *,
                 encoder=None, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.searcher = searcher
        self.encoder = encoder if encoder is not None else getattr(searcher, "encoder", None)
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max(max_wait_ms, 0) / 1000
        self.max_pending = max_pending or 8 * max_batch
        if self.max_pending < max_batch:
            raise ValueError(f"max_pending ({self.max_pending}) must be >= max_batch ({max_batch})")
        self.pending = 0  # texts admitted and not answered yet
        self.batch_seconds: float | None = None  # moving average of one worker job
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llara-search")
        self.queue: asyncio.Queue | None = None
        self.arrived: asyncio.Event | None = None  # set on every new request
        self.task: asyncio.Task | None = None
        self.batches = 0  # worker jobs so far
        self.queries = 0  # search queries answered so far
        self.embedded = 0  # texts embedded so far
        self.waiting = 0  # texts queued, not yet taken into a batch
        self.expected = 1  # texts the next batch waits for (see the class docstring)

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.arrived = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until the texts now pending have likely been answered (at least 1)."""
        batches = math.ceil(self.pending / self.max_batch)
        return max(1, math.ceil(batches * (self.batch_seconds or 1.0)))

    async def search(self, queries: list[str], k: int, mode: str | None = None, fusion=None):
        """Hits for each query (``Searcher.search_requests`` of one request)."""
        if self.searcher is None:
            raise RuntimeError("this service has no index to search")
        return await self._submit(tuple(queries), side=None, k=k, mode=mode, fusion=fusion)

    async def embed(self, texts: list[str], side: str) -> Embedded:
        """Vectors of ``texts`` on ``side`` (``query`` or ``passage``), as ``encoder.encode`` gives them."""
        if self.encoder is None:
            raise RuntimeError("this service has no encoder")
        if side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        return await self._submit(tuple(texts), side=side)

    async def _submit(self, texts: tuple[str, ...], **kw):
        if self.pending + len(texts) > self.max_pending:
            raise Saturated(self.retry_after())
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(texts)
        self.waiting += len(texts)
        try:
            await self.queue.put(Job(texts, fut, **kw))
            self.arrived.set()
            return await fut
        finally:
            self.pending -= len(texts)

    def _take(self, job: Job) -> Job:
        self.waiting -= len(job.texts)
        return job

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [self._take(await self.queue.get())]
        n = len(batch[0].texts)
        target = min(self.max_batch, max(self.expected, 1))
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if n >= target or remaining <= 0:
                    break
                self.arrived.clear()
                try:  # waits on an event, not on queue.get(): a timed-out get could drop a request
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            job = self.queue.get_nowait()
            batch.append(self._take(job))
            n += len(job.texts)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._collect() if not j.future.done()]  # done = client went away
            if not batch:
                continue
            t0 = loop.time()
            try:
                outcomes = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as e:  # e.g. the executor was shut down; every waiting request answers 500
                outcomes = [e] * len(batch)
            took = loop.time() - t0
            self.batch_seconds = took if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * took
            self.batches += 1
            self.expected = sum(len(j.texts) for j in batch) + self.waiting
            for job, out in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(out, Exception):  # handed to the waiting request, which answers 500
                    job.future.set_exception(out)
                else:
                    job.future.set_result(out)
                    if job.side is None:
                        self.queries += len(job.texts)
                    else:
                        self.embedded += len(job.texts)

    # ------------------------------------------------------------------ the worker thread
    def _run(self, batch: list[Job]) -> list:
        """One worker job: each job's answer, or the exception that stopped its group."""
        out: list = [None] * len(batch)
        tokens: list[int] = []
        searches = [i for i, j in enumerate(batch) if j.side is None]
        if searches:
            from ..retrieval.searcher import Request

            requests = [Request(batch[i].texts, batch[i].k, batch[i].mode, batch[i].fusion) for i in searches]
            try:
                hits = self._encoding(lambda: self.searcher.search_requests(requests), tokens)
                for i, h in zip(searches, hits):
                    out[i] = h
            except Exception as e:
                log.exception("search failed for a batch of %d queries", sum(len(batch[i].texts) for i in searches))
                for i in searches:
                    out[i] = e
        for side in ("query", "passage"):
            rows = [i for i, j in enumerate(batch) if j.side == side]
            if not rows:
                continue
            texts = [t for i in rows for t in batch[i].texts]
            try:
                vectors = self._encoding(lambda: self.encoder.encode(texts, side), tokens)
                counts = token_counts(self.encoder, texts, side)
                at = 0
                for i in rows:
                    n = len(batch[i].texts)
                    out[i] = Embedded(vectors[at:at + n], counts[at:at + n])
                    at += n
            except Exception as e:
                log.exception("embedding failed for %d %s texts", len(texts), side)
                for i in rows:
                    out[i] = e
        if self.metrics is not None:
            self.metrics.batch_texts.observe(sum(len(j.texts) for j in batch))
            if tokens:
                self.metrics.batch_tokens.observe(sum(tokens))
        return out

    def _encoding(self, call: Callable, tokens: list[int]):
        """``call()``; when it ran the encoder, its tokens go to ``tokens`` and its time to the metrics."""
        before = getattr(self.encoder, "last_stats", None)
        result = call()
        stats = getattr(self.encoder, "last_stats", None)
        if stats is not None and stats is not before:
            tokens.append(stats.tokens)
            if self.metrics is not None:
                self.metrics.encoder_seconds.observe(stats.seconds)
        return result


