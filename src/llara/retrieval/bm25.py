"""BM25 baseline retrieval with ``bm25s``.

Documents are represented by :func:`llara.io.passage_text` (the same string the dense
encoder sees).  Tokenisation is ``bm25s.tokenize``: lower-casing, the ``\\b\\w\\w+\\b`` token
pattern, stopword removal and a PyStemmer (Snowball) stemmer for ``language``.  Scoring uses the
bm25s defaults (``method="lucene"``, ``k1=1.5``, ``b=0.75``).

Only documents that share at least one term with the query (score > 0) are returned, so a query
that tokenises to nothing (only stopwords or punctuation, or only terms absent from the corpus)
gets an empty result list.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping, Sequence

import bm25s
import numpy as np
import Stemmer

from ..io import passage_text

logger = logging.getLogger(__name__)
# bm25s sets its own logger to DEBUG on import; keep its per-call chatter out of our output.
logging.getLogger("bm25s").setLevel(logging.WARNING)

__all__ = ["BM25Index", "bm25_search"]


# Languages whose stopword list ships with bm25s (passed to bm25s.tokenize by name).
_BM25S_STOPWORDS = {
    "english", "german", "dutch", "french", "spanish", "portuguese", "italian",
    "russian", "swedish", "norwegian", "chinese", "turkish", "korean", "danish",
}


def _stopwords(language: str) -> str | list[str]:
    """bm25s's own list for ``language`` when it has one, else the ``stop-words`` package's."""
    if language in _BM25S_STOPWORDS:
        return language
    try:
        from stop_words import get_stop_words

        return list(get_stop_words(language))
    except Exception as exc:  # stop_words raises its own StopWordError
        raise ValueError(f"no stopword list for language {language!r}") from exc


def _stemmer(language: str):
    try:
        return Stemmer.Stemmer(language)
    except KeyError as exc:
        raise ValueError(f"PyStemmer has no stemmer for language {language!r}") from exc


class BM25Index:
    """A ``bm25s`` index with this module's tokenisation; documents are rows ``0..n-1`` in the order
    they were given. Saved and loaded with bm25s's own files (no pickles)."""

    def __init__(self, retriever: "bm25s.BM25", language: str = "english"):
        self.retriever = retriever
        self.language = language
        self._stopwords = _stopwords(language)
        self._stemmer = _stemmer(language)

    @classmethod
    def build(cls, texts: Iterable[str], language: str = "english", *, k1: float = 1.5, b: float = 0.75,
              chunk: int = 10_000) -> "BM25Index":
        """Index ``texts`` (tokenised ``chunk`` at a time, so a stream of texts is read once)."""
        self = cls(bm25s.BM25(k1=k1, b=b), language)
        tokens: list[list[str]] = []
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == chunk:
                tokens += self.tokenize(batch)
                batch = []
        if batch:
            tokens += self.tokenize(batch)
        if not tokens:
            raise ValueError("no documents to index with BM25")
        # bm25s numbers the vocabulary in set order, which changes with PYTHONHASHSEED: number it in
        # sorted order, so one corpus gives the same files every time (scores are the same either way).
        vocab = {term: i for i, term in enumerate(sorted({t for doc in tokens for t in doc}))}
        self.retriever.index(([[vocab[t] for t in doc] for doc in tokens], vocab), show_progress=False)
        return self

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(list(texts), stopwords=self._stopwords, stemmer=self._stemmer, return_ids=False,
                              show_progress=False)

    @property
    def num_docs(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` ``(row, score)`` pairs with score > 0, best first (ties: lower row
        first). A query with no term in the vocabulary gets an empty list."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        vocab = self.retriever.vocab_dict
        out: list[list[tuple[int, float]]] = []
        empty = 0
        for tokens in self.tokenize(list(queries)) if queries else []:
            tokens = [t for t in tokens if t and t in vocab]
            if not tokens:
                empty += 1
                out.append([])
                continue
            scores = np.asarray(self.retriever.get_scores(tokens), dtype=np.float64)
            candidates = np.flatnonzero(scores > 0)
            if candidates.size > k:
                top = np.argpartition(-scores[candidates], k - 1)[:k]
                candidates = candidates[top]
            order = candidates[np.lexsort((candidates, -scores[candidates]))]
            out.append([(int(i), float(scores[i])) for i in order])
        if empty:
            # per query, so DEBUG: at INFO a client would decide how fast the service's log grows
            logger.debug("%d of %d queries have no term in the BM25 vocabulary (empty results)", empty, len(out))
        return out

    def settings(self) -> dict:
        """What the scores depend on, for manifests and metrics.json."""
        return {"language": self.language, "k1": float(self.retriever.k1), "b": float(self.retriever.b),
                "method": self.retriever.method, "stemmer": f"PyStemmer {self.language}",
                "stopwords": self._stopwords if isinstance(self._stopwords, str) else "stop-words package"}

    def save(self, directory: "str | os.PathLike") -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: "str | os.PathLike", language: str = "english", *, mmap: bool = False) -> "BM25Index":
        return cls(bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False), language)


def bm25_search(
    corpus: Mapping[str, Mapping[str, str]],
    queries: Mapping[str, str],
    k: int = 100,
    language: str = "english",
    *,
    k1: float = 1.5,
    b: float = 0.75,
) -> dict[str, dict[str, float]]:
    """Index ``corpus`` with BM25 and return the top-``k`` documents per query.

    Returns a run ``{qid: {doc_id: score}}``; every query id is present (possibly with no results).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    doc_ids = list(corpus)
    run: dict[str, dict[str, float]] = {str(qid): {} for qid in queries}
    if not doc_ids or not queries:
        return run
    index = BM25Index.build((passage_text(corpus[d]) for d in doc_ids), language, k1=k1, b=b)
    for qid, hits in zip(run, index.search([queries[q] for q in queries], k)):
        run[qid] = {doc_ids[i]: s for i, s in hits}
    logger.debug("BM25: %d queries over %d docs, k=%d", len(run), len(doc_ids), k)
    return run
