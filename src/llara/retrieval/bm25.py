"""BM25 baseline retrieval with ``bm25s``.

Documents are represented by :func:`llara.data.beir.passage_text` (the same string the dense
encoder sees).  Tokenisation is ``bm25s.tokenize``: lower-casing, the ``\\b\\w\\w+\\b`` token
pattern, stopword removal and a PyStemmer (Snowball) stemmer for ``language``.  Scoring uses the
bm25s defaults (``method="lucene"``, ``k1=1.5``, ``b=0.75``).

Only documents that share at least one term with the query (score > 0) are returned, so a query
that tokenises to nothing (only stopwords or punctuation, or only terms absent from the corpus)
gets an empty result list.
"""
from __future__ import annotations

import logging
from typing import Mapping

import bm25s
import numpy as np
import Stemmer

from llara.data.beir import passage_text

logger = logging.getLogger(__name__)
# bm25s sets its own logger to DEBUG on import; keep its per-call chatter out of our output.
logging.getLogger("bm25s").setLevel(logging.WARNING)

__all__ = ["bm25_search", "bm25_tokenize"]


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


def bm25_tokenize(texts: list[str], language: str = "english") -> list[list[str]]:
    """Tokenise texts exactly as :func:`bm25_search` does (lower-case, stopwords, stemming)."""
    return bm25s.tokenize(
        list(texts),
        stopwords=_stopwords(language),
        stemmer=_stemmer(language),
        return_ids=False,
        show_progress=False,
    )


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

    stopwords = _stopwords(language)
    stemmer = _stemmer(language)

    def tok(texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords=stopwords, stemmer=stemmer, return_ids=False, show_progress=False)

    corpus_tokens = tok([passage_text(corpus[d]) for d in doc_ids])
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(corpus_tokens, show_progress=False)
    vocab = retriever.vocab_dict

    qids = list(run)
    query_tokens = tok([queries[q] for q in queries])
    empty = 0
    for qid, tokens in zip(qids, query_tokens):
        tokens = [t for t in tokens if t and t in vocab]
        if not tokens:
            empty += 1
            continue
        scores = np.asarray(retriever.get_scores(tokens), dtype=np.float64)
        candidates = np.flatnonzero(scores > 0)
        if candidates.size > k:
            top = np.argpartition(-scores[candidates], k - 1)[:k]
            candidates = candidates[top]
        order = candidates[np.lexsort((candidates, -scores[candidates]))]
        run[qid] = {doc_ids[i]: float(scores[i]) for i in order}
    if empty:
        logger.info("%d of %d queries have no term in the BM25 vocabulary (empty results)", empty, len(qids))
    logger.debug("BM25: %d queries over %d docs, k=%d", len(qids), len(doc_ids), k)
    return run
