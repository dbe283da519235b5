"""Hard-negative mining for contrastive fine-tuning.

Retrieve with a dense model (FAISS) or BM25, then sample negatives from a rank window (the authors
sample from a dense retriever's top 200), never a judged positive, without duplicates, optionally
dropping candidates that score too close to the positive (a guard against unjudged positives).
Output lines: ``{"query", "pos": [...], "neg": [...], "query_id", "pos_ids", "neg_ids"}``.
:func:`mine` is the whole job (``llara mine``): read the positives, retrieve, sample, write.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..data.beir import load_corpus, load_qrels, load_queries
from ..io import DataError, iter_jsonl, passage_text, write_jsonl
from .ranking import rank_docs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningResult:
    groups: int  # training lines written
    mean_negatives: float  # negatives per query, on average


@dataclass(frozen=True)
class MiningConfig:
    window: tuple[int, int] = (10, 200)  # 1-based ranks [lo, hi], inclusive, to sample from
    num_negatives: int = 15
    margin: float | None = None  # drop candidates with score > best positive score - margin
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.window
        if not 1 <= lo <= hi:
            raise ValueError(f"rank window must satisfy 1 <= lo <= hi, got {self.window}")
        if self.num_negatives < 1:
            raise ValueError("num_negatives must be >= 1")


def sample_negatives(
    run: Mapping[str, Mapping[str, float]],
    positives: Mapping[str, set[str]],
    cfg: MiningConfig,
    positive_scores: Mapping[str, float] | None = None,
    fill_from: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Negative doc ids per query, from the run's rank window; where the window holds fewer than
    ``cfg.num_negatives`` usable documents, random documents of ``fill_from`` (the corpus ids) make up
    the rest.

    ``positive_scores[qid]`` is the best positive's score under the same retriever (for the margin
    guard); when missing, the best positive's score in the run is used, and without either the guard
    is skipped for that query."""
    out: dict[str, list[str]] = {}
    lo, hi = cfg.window
    skipped_guard = filled = 0
    for qid, pos in positives.items():
        ranked = rank_docs(run.get(qid, {}))
        ref = (positive_scores or {}).get(qid)
        if ref is None:
            in_run = [s for d, s in ranked if d in pos]
            ref = max(in_run) if in_run else None
        if cfg.margin is not None and ref is None:
            skipped_guard += 1
        seen: set[str] = set()
        candidates = []
        for d, s in ranked[lo - 1 : hi]:
            if d in pos or d in seen:
                continue
            if cfg.margin is not None and ref is not None and s > ref - cfg.margin:
                continue
            seen.add(d)
            candidates.append(d)
        rng = random.Random(f"{cfg.seed}:{qid}")
        chosen = rng.sample(candidates, min(cfg.num_negatives, len(candidates)))
        if len(chosen) < cfg.num_negatives and fill_from:
            # too few candidates in the window (a rare query term): top up with random documents, as
            # FlagEmbedding's miner does, so every group can be used at any group size up to num_negatives + 1
            taken = set(chosen) | set(pos)
            extra = [d for d in rng.sample(fill_from, min(len(fill_from), cfg.num_negatives + len(taken)))
                     if d not in taken]
            chosen += extra[: cfg.num_negatives - len(chosen)]
            filled += 1
        out[qid] = chosen
    if skipped_guard:
        log.warning("margin guard skipped for %d queries whose positives were not retrieved", skipped_guard)
    if filled:
        log.info("%d of %d queries had fewer than %d candidates in ranks %d-%d: topped up with random documents",
                 filled, len(positives), cfg.num_negatives, lo, hi)
    return out


def positives_from_train_jsonl(path: str | os.PathLike, corpus: Mapping[str, dict]) -> tuple[dict, dict, int]:
    """Read ``{"query", "pos": [text, ...]}`` lines; match positives to corpus docs by text.

    Returns (queries {qid: text}, positives {qid: {doc_id}}, unmatched positive count)."""
    by_text: dict[str, str] = {}
    for did, doc in corpus.items():
        by_text.setdefault(doc.get("text", "").strip(), did)
        by_text.setdefault(passage_text(doc).strip(), did)
    queries, positives, unmatched = {}, {}, 0
    path = Path(path)
    for n, obj in iter_jsonl(path):
        if not isinstance(obj.get("query"), str) or not isinstance(obj.get("pos"), list):
            raise DataError(path, n, "expected {\"query\": str, \"pos\": [str, ...]}")
        qid = str(obj.get("query_id", f"q{n}"))
        queries[qid] = obj["query"]
        ids = set()
        for p in obj["pos"]:
            did = by_text.get(str(p).strip())
            if did is None:
                unmatched += 1
            else:
                ids.add(did)
        positives[qid] = ids
    if not queries:
        raise DataError(path, None, "no training examples")
    return queries, positives, unmatched


def retrieve(method: str, corpus, queries, k: int, encoder=None) -> tuple[dict, dict | None, dict]:
    """(run, embeddings or None, doc id list) with BM25 or a dense encoder."""
    if method == "bm25":
        from .bm25 import bm25_search

        return bm25_search(corpus, queries, k=k), None, list(corpus)
    from .dense import exact_search

    dids, qids = list(corpus), list(queries)
    d = encoder.encode_corpus([corpus[x] for x in dids])
    q = encoder.encode_queries([queries[x] for x in qids])
    return exact_search(q, d, dids, qids, k=k), {"q": q, "d": d, "qids": qids}, dids


def dense_positive_scores(emb: dict, dids: list[str], positives: Mapping[str, set[str]]) -> dict[str, float]:
    row = {d: i for i, d in enumerate(dids)}
    out = {}
    for i, qid in enumerate(emb["qids"]):
        idx = [row[d] for d in positives.get(qid, ()) if d in row]
        if idx:
            out[qid] = float(np.max(emb["d"][idx] @ emb["q"][i]))
    return out


def iter_training_lines(queries, positives, negatives, corpus) -> Iterator[dict]:
    for qid, neg in negatives.items():
        pos = sorted(positives[qid])
        if not pos:
            continue
        yield {
            "query": queries[qid],
            "pos": [passage_text(corpus[d]) for d in pos],
            "neg": [passage_text(corpus[d]) for d in neg],
            "query_id": qid,
            "pos_ids": pos,
            "neg_ids": neg,
        }


def read_positives(corpus: Mapping[str, dict], *, queries: str | os.PathLike | None = None,
                   qrels: str | os.PathLike | None = None,
                   train: str | os.PathLike | None = None) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(queries {qid: text}, positives {qid: {doc_id}}) from a BEIR split (``queries`` + ``qrels``:
    judgments > 0 are positives) or from a ``train`` JSONL file (positives matched by text)."""
    if train:
        found, positives, unmatched = positives_from_train_jsonl(train, corpus)
        if unmatched:
            log.warning("%d positives of %s are not in the corpus (they are still kept out of the negatives "
                        "only if their text matches a corpus document)", unmatched, train)
        return found, positives
    if not (queries and qrels):
        raise FileNotFoundError("give --queries and --qrels (a BEIR split), or --train train.jsonl")
    all_queries = load_queries(queries)
    positives = {q: {d for d, s in rel.items() if s > 0} for q, rel in load_qrels(qrels).items()}
    unknown = [q for q in positives if q not in all_queries]
    if unknown:
        raise FileNotFoundError(f"{qrels}: query id {unknown[0]!r} is not in {queries}")
    return {q: all_queries[q] for q in positives}, positives


def mine(corpus: str | os.PathLike, output: str | os.PathLike, *, queries: str | os.PathLike | None = None,
         qrels: str | os.PathLike | None = None, train: str | os.PathLike | None = None, method: str = "dense",
         config: MiningConfig = MiningConfig(), encoder: Callable[[], Any] | None = None) -> MiningResult:
    """Mine hard negatives for every query with positives and write the training lines to ``output``
    (atomically). ``method``: ``dense`` or ``bm25``; ``encoder``: a callable returning the encoder,
    called (after the inputs are read) only for ``dense``."""
    docs = load_corpus(corpus)
    found, positives = read_positives(docs, queries=queries, qrels=qrels, train=train)
    k = config.window[1] + max((len(p) for p in positives.values()), default=0)
    run, emb, dids = retrieve(method, docs, found, k, encoder() if method == "dense" else None)
    pos_scores = dense_positive_scores(emb, dids, positives) if emb is not None else None
    negatives = sample_negatives(run, positives, config, pos_scores, fill_from=list(docs))
    n = write_jsonl(iter_training_lines(found, positives, negatives, docs), output)
    counts = [len(v) for v in negatives.values()]
    return MiningResult(n, float(np.mean(counts)) if counts else 0.0)
