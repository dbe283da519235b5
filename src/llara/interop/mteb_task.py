"""A local BEIR-format collection as an MTEB retrieval task (``pip install 'llara[mteb]'``).

MTEB's own tasks download their data from the Hugging Face hub; this one reads the files llara
reads (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, checked by ``llara.data.beir``),
so ``mteb.evaluate`` runs offline on any collection ``llara evaluate`` takes:

>>> import mteb                                                                 # doctest: +SKIP
>>> from sentence_transformers import SentenceTransformer                       # doctest: +SKIP
>>> from llara.interop.mteb_task import beir_task                               # doctest: +SKIP
>>> model = SentenceTransformer("runs/ft/final", trust_remote_code=True)        # doctest: +SKIP
>>> result = mteb.evaluate(model, beir_task("data/adi"), cache=None)            # doctest: +SKIP
>>> result.task_results[0].get_score()                                          # doctest: +SKIP

MTEB encodes queries with ``encode_query`` and documents (``title + " " + text``) with
``encode_document``, the same texts and prompts as ``llara evaluate``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.beir import load_beir

__all__ = ["beir_task"]


def beir_task(dataset_dir: str | os.PathLike, split: str = "test", name: str | None = None):
    """An ``AbsTaskRetrieval`` over the BEIR directory ``dataset_dir`` (its ``split`` judgments)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    path = Path(dataset_dir)
    ds = load_beir(path, split)
    task_name = name or f"LocalBEIR-{ds.name}"

    class LocalBeirRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=task_name,
            description=f"BEIR-format collection read from {path.resolve()} ({split} judgments)",
            reference=None,
            dataset={"path": str(path.resolve()), "revision": "local"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=[split],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs) -> None:
            if self.data_loaded:
                return
            queries = Dataset.from_list([{"id": q, "text": t} for q, t in ds.queries.items()])
            corpus = Dataset.from_list(
                [{"id": d, "title": doc.get("title") or "", "text": doc.get("text") or ""} for d, doc in ds.corpus.items()]
            )
            self.dataset = {"default": {split: {"queries": queries, "corpus": corpus,
                                                "relevant_docs": {q: dict(r) for q, r in ds.qrels.items()},
                                                "top_ranked": None}}}
            self.dataset_transform(num_proc=num_proc)
            self.data_loaded = True

    return LocalBeirRetrieval()
