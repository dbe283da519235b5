"""The parts of :meth:`llara.modeling.encoder.Encoder.encode`'s pipeline around the forward pass: the
planned batches (:class:`PlannedBatch`), the background thread that tokenises and pads them ahead of
the model (:class:`Prefetch`), the vectors' way back to the host without a synchronisation per batch
on CUDA (:class:`ToHost`), and the time spent in the model (:class:`ModelClock`)."""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .embed import Packed

__all__ = ["ModelClock", "PlannedBatch", "Prefetch", "ToHost"]


@dataclass
class PlannedBatch:
    rows: np.ndarray  # rows of the texts, in the batch's order
    packed: Packed
    tokens: int  # real (unpadded) tokens
    truncated: int  # texts cut to max_length (the window's count, on its first batch)


class Prefetch:
    """Iterates ``items`` in a daemon thread, up to ``depth`` items ahead of the consumer.

    An exception raised by ``items`` is raised again in the consumer (with its traceback); leaving
    the ``with`` block early (an error in the consumer, a break) stops the thread after its current
    item, so nothing waits forever on a full queue."""

    def __init__(self, items: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="llara-encode-prefetch", daemon=True)

    def __enter__(self) -> Iterator:
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((False, None))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _consume(self) -> Iterator:
        while True:
            ok, item = self._queue.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item


class ToHost:
    """Writes each batch's (P, B, H) vectors into ``outs[p][rows]``. On CUDA without a host sync per
    batch: a non-blocking copy into pinned memory and an event, read back once the event has passed
    (``pending`` batches at most in flight; the rest at ``finish``)."""

    def __init__(self, outs: list[np.ndarray], cuda: bool, pending: int = 8):
        self.outs, self.cuda, self.max_pending = outs, cuda, pending
        self.pending: deque = deque()

    def add(self, rows: np.ndarray, vecs: torch.Tensor) -> None:
        if not self.cuda:
            self._write(rows, vecs.cpu())
            return
        host = torch.empty(vecs.shape, dtype=vecs.dtype, pin_memory=True)
        host.copy_(vecs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((rows, host, done))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0][2].query()):
            self._pop()

    def finish(self) -> None:
        while self.pending:
            self._pop()

    def _pop(self) -> None:
        rows, host, done = self.pending.popleft()
        done.synchronize()
        self._write(rows, host)

    def _write(self, rows: np.ndarray, vecs: torch.Tensor) -> None:
        arr = vecs.numpy()
        for p, out in enumerate(self.outs):
            out[rows] = arr[p]


class ModelClock:
    """Seconds spent in the model (``with clock:`` around each batch): the host clock on a CPU, CUDA
    events on a GPU (read once, at the end, when every batch has run)."""

    def __init__(self, cuda: bool):
        self.cuda, self.total, self.events = cuda, 0.0, []

    def __enter__(self):
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.total += time.perf_counter() - self._t

    def seconds(self, device: torch.device) -> float:
        if self.cuda:
            torch.cuda.synchronize(device)
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.total
