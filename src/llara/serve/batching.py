"""Micro-batching for the search service: concurrent requests share one encoder call.

Each request puts its queries on an asyncio queue; a single worker collects them (see
:class:`MicroBatcher` for the policy) and runs one ``searcher.search_requests`` call for all of them
in a dedicated thread, so the event loop keeps accepting requests meanwhile. When ``max_pending``
queries already wait, a new request is refused at once (:class:`Saturated`, answered 503 +
``Retry-After`` by :mod:`llara.serve.app`).
"""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

__all__ = ["MicroBatcher", "Saturated"]


class Saturated(Exception):
    """The encoder's queue is full; ``retry_after`` seconds is when it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__(f"the encoder is saturated; retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher:
    """Collect concurrent searches into one ``searcher.search_requests`` call, run in one worker thread.

    Batching policy: when the worker is free it takes the oldest request, then keeps collecting
    until the batch holds as many queries as are expected, or ``max_wait_ms`` have passed since it
    started collecting, or ``max_batch`` is reached. Expected = the queries of the batch just
    answered (their clients tend to send again within milliseconds) plus those that queued while
    it ran. Counting the wait from when the *worker* is free, not from when the oldest request
    arrived, matters: requests that queued during a long encoder call have already used up their
    wait, and would otherwise leave at once without the clients just answered, so that two
    half-size groups take turns on the encoder. One client never waits (expected = 1).

    At most ``max_pending`` queries (default: 8 batches) wait or run at once; beyond that
    :meth:`search` raises :class:`Saturated` at once instead of queueing."""

    def __init__(self, searcher, max_batch: int, max_wait_ms: float, max_pending: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait = max(max_wait_ms, 0) / 1000
        self.max_pending = max_pending or 8 * max_batch
        if self.max_pending < max_batch:
            raise ValueError(f"max_pending ({self.max_pending}) must be >= max_batch ({max_batch})")
        self.pending = 0  # queries admitted and not answered yet
        self.batch_seconds: float | None = None  # moving average of one encoder call + search
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llara-search")
        self.queue: asyncio.Queue | None = None
        self.arrived: asyncio.Event | None = None  # set on every new request
        self.task: asyncio.Task | None = None
        self.batches = 0  # encoder calls so far
        self.queries = 0  # queries answered so far
        self.waiting = 0  # queries queued, not yet taken into a batch
        self.expected = 1  # queries the next batch waits for (see the class docstring)

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
        """Seconds until the queries now pending have likely been answered (at least 1)."""
        batches = math.ceil(self.pending / self.max_batch)
        return max(1, math.ceil(batches * (self.batch_seconds or 1.0)))

    async def search(self, queries: list[str], k: int, mode: str | None = None, fusion=None):
        if self.pending + len(queries) > self.max_pending:
            raise Saturated(self.retry_after())
        self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending += len(queries)
        self.waiting += len(queries)
        try:
            await self.queue.put((queries, k, fut, loop.time(), mode, fusion))
            self.arrived.set()
            return await fut
        finally:
            self.pending -= len(queries)

    def _take(self, item: tuple) -> tuple:
        self.waiting -= len(item[0])
        return item

    async def _collect(self) -> list[tuple]:
        loop = asyncio.get_running_loop()
        batch = [self._take(await self.queue.get())]
        n = len(batch[0][0])
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
            item = self.queue.get_nowait()
            batch.append(self._take(item))
            n += len(item[0])
        return batch

    async def _work(self) -> None:
        from ..retrieval.searcher import Request

        loop = asyncio.get_running_loop()
        while True:
            batch = [b for b in await self._collect() if not b[2].done()]  # done = client went away
            if not batch:
                continue
            queries = [q for b in batch for q in b[0]]
            requests = [Request(tuple(qs), k, mode, fusion) for qs, k, _, _, mode, fusion in batch]
            t0 = loop.time()
            try:
                hits = await loop.run_in_executor(self.executor, self.searcher.search_requests, requests)
            except Exception as e:  # handed to every waiting request, which answers 500
                log.exception("search failed for a batch of %d queries", len(queries))
                for b in batch:
                    if not b[2].done():
                        b[2].set_exception(e)
                continue
            took = loop.time() - t0
            self.batch_seconds = took if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * took
            self.batches += 1
            self.queries += len(queries)
            self.expected = len(queries) + self.waiting
            for b, h in zip(batch, hits):
                if not b[2].done():
                    b[2].set_result(h)


