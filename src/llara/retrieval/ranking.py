"""Ranking a run's scores: the one ordering every part of llara uses (search results, fusion, mining,
TREC run files, metrics).

The rule is trec_eval's: score descending, ties broken by doc id *descending* (byte-wise string
order), so that ranks agree with what ``pytrec_eval`` scores.
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["rank_docs", "top"]


def rank_docs(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(doc_id, score)`` pairs in trec_eval order: score descending, then doc id descending."""
    return sorted(((str(d), float(s)) for d, s in scores.items()), key=lambda x: (x[1], x[0]), reverse=True)


def top(scores: Mapping[str, float], depth: int | None) -> list[tuple[str, float]]:
    """The best ``depth`` ``(doc_id, score)`` pairs (all when ``depth`` is None), best first."""
    ranked = rank_docs(scores)
    return ranked if depth is None else ranked[:depth]
