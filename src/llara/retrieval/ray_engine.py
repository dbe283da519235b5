"""``llara index --engine ray``: the shards of :func:`llara.retrieval.index.build_index` encoded by Ray
Data actors, on a local Ray cluster or one you run (``--ray-address``).

Each actor loads the model once (``map_batches`` with a callable class and ``concurrency=workers``)
and encodes whole shards; inside a shard, :meth:`Encoder.encode` sorts the passages by length, so
every batch is made of passages of similar length. An actor gets one GPU when the cluster has GPUs
(and no ``device`` says otherwise), else ``cpus_per_worker`` CPUs and as many torch threads.

The driver (the process running ``llara index``) reads and checks the corpus, hands the shards that
are not finished yet to Ray (their texts go through Ray's object store), and writes every shard's
files and the manifest itself as results arrive, exactly as the single-process path does: the same
files, checksums and manifest, resumable shard by shard with ``--resume``. Only the driver needs the
output directory; every node needs llara installed (or a ``runtime_env``) and the model reachable
under the same spec (a hub id, or a path on a shared file system).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

import numpy as np

from .index import ShardJob, ShardResult

log = logging.getLogger(__name__)

__all__ = ["RayEngine"]


class _ShardEncoder:
    """A Ray Data actor: one Encoder, built once; each call encodes a batch of whole shards."""

    def __init__(self, model_spec: str, template: dict, max_query_length: int, max_passage_length: int,
                 batch_size: int | None, device: str | None, dtype: str | None, threads: int | None,
                 max_batch_tokens: int | None = None):
        import torch

        from ..modeling.encoder import Encoder
        from ..prompts import Template

        if threads:
            torch.set_num_threads(threads)
        self.encoder = Encoder.from_pretrained(
            model_spec, template=Template.from_dict(template, source="ray engine"), device=device, dtype=dtype,
            max_query_length=max_query_length, max_passage_length=max_passage_length, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, show_progress=False,
        )

    def __call__(self, batch: dict) -> dict:
        numbers, embeddings, tokens, seconds = [], [], [], []
        for number, texts in zip(batch["number"], batch["texts"]):
            t0 = time.perf_counter()
            embeddings.append(self.encoder.encode([str(t) for t in texts], "passage"))
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(self.encoder.last_stats.tokens))
            numbers.append(int(number))
        # map_batches(batch_size=1): one shard per call, so the stacked shapes always agree.
        return {"number": np.array(numbers), "embeddings": np.stack(embeddings), "tokens": np.array(tokens),
                "seconds": np.array(seconds)}


class RayEngine:
    """``engine(jobs) -> results`` for :func:`build_index`, run by Ray Data actors."""

    def __init__(self, model_spec: str, template: dict, max_query_length: int, max_passage_length: int, *,
                 workers: int = 2, address: str | None = None, batch_size: int | None = 32, device: str | None = None,
                 dtype: str | None = None, cpus_per_worker: int = 1, max_batch_tokens: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.model_spec, self.template = model_spec, template
        self.lengths = (max_query_length, max_passage_length)
        self.workers, self.address, self.batch_size = workers, address, batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device, self.dtype, self.cpus_per_worker = device, dtype, cpus_per_worker

    @classmethod
    def from_encoder(cls, encoder, model_spec: str, **kw) -> "RayEngine":
        """Actors that load ``model_spec`` with ``encoder``'s template, lengths and (unless ``dtype`` is
        given) dtype: the precision the manifest records is the one the actors encode in."""
        if kw.get("dtype") in (None, "auto"):
            kw["dtype"] = str(next(encoder.model.parameters()).dtype).replace("torch.", "")
        return cls(model_spec, encoder.template.to_dict(), encoder.max_length["query"],
                   encoder.max_length["passage"], **kw)

    def _init_ray(self):
        try:
            import ray
        except ImportError:
            raise ImportError("--engine ray needs Ray: pip install 'llara[ray]'") from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            else:  # a local cluster with one CPU slot per worker
                ray.init(num_cpus=self.workers * self.cpus_per_worker, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        return ray

    def __call__(self, jobs: Iterator[ShardJob]) -> Iterator[ShardResult]:
        items = [{"number": job.number, "texts": job.texts} for job in jobs]
        if not items:
            return
        ray = self._init_ray()
        gpus = 1 if self.device in (None, "cuda") and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        device = self.device or ("cuda" if gpus else "cpu")
        log.info("ray: %d shards on %d actors (%s)", len(items), self.workers, f"{gpus} GPU each" if gpus else
                 f"{self.cpus_per_worker} CPU each")
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(
            _ShardEncoder, batch_size=1, concurrency=self.workers, num_gpus=gpus,
            num_cpus=0 if gpus else self.cpus_per_worker,
            fn_constructor_kwargs=dict(model_spec=self.model_spec, template=self.template,
                                       max_query_length=self.lengths[0], max_passage_length=self.lengths[1],
                                       batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens,
                                       device=device, dtype=self.dtype,
                                       threads=None if gpus else self.cpus_per_worker),
        )
        for row in out.iter_rows():
            yield ShardResult(int(row["number"]), np.asarray(row["embeddings"], dtype=np.float32),
                              int(row["tokens"]), float(row["seconds"]))
