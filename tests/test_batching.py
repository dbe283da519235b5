"""The service's micro-batching policy (MicroBatcher), with a stand-in searcher of fixed cost."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llara.serve.batching import MicroBatcher


class FixedCostSearcher:
    """Takes ``seconds`` per call whatever the batch size (a CPU encoder is far from that, but the
    policy only sees call boundaries); records every batch size."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def search_requests(self, requests):
        with self.lock:
            time.sleep(self.seconds)
            self.sizes.append(sum(len(r.queries) for r in requests))
        return [[[f"{q}#{i}" for i in range(r.k)] for q in r.queries] for r in requests]


async def _closed_loop(batcher, clients: int, rounds: int, think: float = 0.0) -> None:
    """``clients`` clients, each sending its next request when the last is answered, after
    ``think * client number`` seconds (answers reach the clients one after another, as HTTP
    responses do)."""

    async def client(c: int):
        for r in range(rounds):
            hits = await batcher.search([f"q{c}.{r}"], 2)
            assert hits == [[f"q{c}.{r}#0", f"q{c}.{r}#1"]]
            await asyncio.sleep(think * c)

    batcher.start()
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        await batcher.stop()


def test_one_client_never_waits_for_company():
    searcher = FixedCostSearcher(0.001)
    batcher = MicroBatcher(searcher, max_batch=32, max_wait_ms=2000)
    t = time.perf_counter()
    asyncio.run(_closed_loop(batcher, clients=1, rounds=5))
    assert searcher.sizes == [1] * 5
    assert time.perf_counter() - t < 2  # the 2 s wait was never taken (it would take 10 s)


@pytest.mark.parametrize("clients", [4, 16])
def test_batches_settle_at_the_number_of_clients(clients):
    """Answers that reach the clients over a spread of times (here up to 1.5 ms x clients) used to
    split the clients into two groups that took turns on the encoder; the batches now hold every
    client after the first rounds."""
    searcher = FixedCostSearcher(0.03)
    batcher = MicroBatcher(searcher, max_batch=32, max_wait_ms=200)
    asyncio.run(_closed_loop(batcher, clients=clients, rounds=8, think=0.0015))
    assert sum(searcher.sizes) == clients * 8
    assert searcher.sizes[-4:] == [clients] * 4, searcher.sizes


def test_more_clients_than_max_batch_fill_every_batch():
    searcher = FixedCostSearcher(0.01)
    batcher = MicroBatcher(searcher, max_batch=8, max_wait_ms=50)
    asyncio.run(_closed_loop(batcher, clients=20, rounds=4))
    assert max(searcher.sizes) == 8 and sum(searcher.sizes) == 80
    assert searcher.sizes.count(8) >= len(searcher.sizes) - 2


def test_requests_that_queued_during_a_call_wait_for_the_clients_just_answered():
    """The group that queued while the encoder ran has used up its wait by the time it is taken;
    counting the wait from the oldest arrival sent it alone, the answered clients came back to a
    busy encoder, and the two groups alternated for good."""
    searcher = FixedCostSearcher(0.05)
    batcher = MicroBatcher(searcher, max_batch=32, max_wait_ms=100)

    async def go():
        batcher.start()
        first = [asyncio.ensure_future(batcher.search([f"a{i}"], 1)) for i in range(8)]
        await asyncio.sleep(0.02)  # the first group is in the encoder now
        second = [asyncio.ensure_future(batcher.search([f"b{i}"], 1)) for i in range(8)]
        await asyncio.gather(*first)
        await asyncio.sleep(0.005)  # the first group's clients come back a little later
        again = [asyncio.ensure_future(batcher.search([f"c{i}"], 1)) for i in range(8)]
        await asyncio.gather(*second, *again)
        await batcher.stop()

    asyncio.run(go())
    assert searcher.sizes[-1] == 16, searcher.sizes
