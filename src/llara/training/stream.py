"""Micro-batches for one process, with the data position needed to resume.

The contract with a dataset (e.g. ``llara.data.pretrain``'s IterableDataset), looked up on the
object given to the loop or on its ``.dataset`` (a DataLoader's):

* ``set_epoch(e)``: the order of epoch ``e`` (deterministic from the dataset's own seed and e);
* ``skip(n)``: the next iteration starts at example ``n`` of the epoch (0: from the start).

Both are optional. Without ``skip``, resuming iterates and discards the already-consumed batches
(correct, slower). A DataLoader whose sampler has ``set_epoch`` (DistributedSampler) gets it
called; a plain shuffling RandomSampler gets a generator seeded with (seed, epoch) so that epochs
are reproducible after a resume.

Several processes: every process iterates the same stream and takes every ``world``-th batch
(process ``r`` takes batches r, r + world, ...). A trailing group of fewer than ``world`` batches is
dropped, so every process makes the same number of steps (DDP would hang otherwise). Positions are
counted in examples of the whole stream, so a run can resume with another number of processes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

logger = logging.getLogger(__name__)

__all__ = ["BatchStream", "batch_size_of", "batches_per_epoch"]


def batch_size_of(batch: Any) -> int:
    """Number of examples in a collated batch: ``batch["num_examples"]`` if present, else the first
    dimension of its first tensor (mappings), else ``len(batch)``."""
    if isinstance(batch, Mapping):
        if "num_examples" in batch:
            return int(batch["num_examples"])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    try:
        return len(batch)
    except TypeError:
        raise TypeError(f"cannot tell the number of examples in a batch of type {type(batch).__name__}; "
                        "add a 'num_examples' entry") from None


def _find(data: Any, method: str):
    for obj in (data, getattr(data, "dataset", None)):
        if obj is not None and callable(getattr(obj, method, None)):
            return getattr(obj, method)
    return None


def batches_per_epoch(data: Iterable) -> int | None:
    """len(data) when it has one (a DataLoader over a sized dataset), else None."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


class BatchStream:
    """Yields this process's micro-batches across epochs; tracks (epoch, examples consumed)."""

    def __init__(self, data: Iterable, *, rank: int = 0, world: int = 1, seed: int = 0,
                 epoch: int = 0, examples: int = 0, consumed: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.data = data
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = epoch
        self.examples = examples  # of the current epoch, summed over all processes' batches
        self.consumed = consumed  # since the start of the run
        self._set_epoch = _find(data, "set_epoch")
        self._skip = _find(data, "skip")
        self._iter: Iterator | None = None

    def start(self) -> None:
        """Position the underlying iterator at (epoch, examples). Call once before ``next``."""
        self._open(self.examples)

    def _open(self, skip: int) -> None:
        if self._set_epoch is not None:
            self._set_epoch(self.epoch)
        sampler = getattr(self.data, "sampler", None)
        if isinstance(self.data, DataLoader) and sampler is not None:
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(self.epoch)
            elif isinstance(sampler, RandomSampler):
                sampler.generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self._skip is not None:
            self._skip(skip)
            self._iter = iter(self.data)
            return
        self._iter = iter(self.data)
        if skip:
            logger.warning("the data has no skip(n): discarding %d examples to resume (slow)", skip)
            done = 0
            while done < skip:
                try:
                    done += batch_size_of(next(self._iter))
                except StopIteration:
                    break
            if done != skip:
                logger.warning("resume position %d is not on a batch boundary of this data (reached %d)", skip, done)

    def _group(self) -> list | None:
        """The next ``world`` batches of the stream, or None at the end of the epoch."""
        group = []
        for _ in range(self.world):
            try:
                group.append(next(self._iter))
            except StopIteration:
                if group:
                    logger.info("epoch %d: dropped a last group of %d batches (< %d processes)",
                                self.epoch, len(group), self.world)
                return None
        return group

    def next(self, max_epochs: int | None = None) -> Any | None:
        """This process's next micro-batch; moves to the next epoch when one ends. Returns None
        when the epoch limit is reached or when an epoch yields nothing."""
        if self._iter is None:
            self.start()
        group = self._group()
        if group is None:
            self.epoch += 1
            self.examples = 0
            if max_epochs is not None and self.epoch >= max_epochs:
                return None
            self._open(0)
            group = self._group()
            if group is None:
                raise RuntimeError(f"epoch {self.epoch} of the data is empty (fewer than {self.world} batches)")
        n = sum(batch_size_of(b) for b in group)
        self.examples += n
        self.consumed += n
        return group[self.rank]

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "examples_in_epoch": self.examples}
