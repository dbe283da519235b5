"""Hybrid retrieval: fuse a dense run and a BM25 run into one ranking.

Runs are BEIR-style ``{qid: {doc_id: score}}``. Per query, each run is first cut to its top
``depth`` documents (in :func:`llara.retrieval.ranking.rank_docs` order: score descending, then doc
id descending), then:

* :func:`linear` (the default): each run's scores are normalised per query (``minmax`` to [0, 1],
  or ``zscore``), and a document scores ``alpha * dense + (1 - alpha) * bm25``; a document missing
  from one run gets that run's minimum normalised score for the query (0 with min-max). A run whose
  scores are all equal for a query normalises to 0 everywhere (it cannot order anything), and a
  run with no documents for a query contributes 0. Bruch et al. (arXiv 2210.11934) found this
  convex combination better than RRF, with one weight that transfers across collections.
* :func:`rrf`: reciprocal rank fusion, ``sum over runs of 1 / (rrf_k + rank)``, ranks from 1,
  ``rrf_k = 60`` by default (Cormack et al., 2009); a document missing from a run adds nothing.

The fused run holds, per query, the union of both runs' candidates (or its best ``k``), best first,
ranked by :func:`rank_docs`, so ties are broken the same deterministic way as everywhere else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

from .ranking import top

__all__ = ["FusionConfig", "fuse", "linear", "normalize", "rrf", "FUSIONS", "NORMALIZATIONS",
           "DEFAULT_ALPHA", "DEFAULT_DEPTH", "DEFAULT_RRF_K"]

Run = Mapping[str, Mapping[str, float]]

FUSIONS = ("linear", "rrf")
NORMALIZATIONS = ("minmax", "zscore")
# Weight of the dense run in `linear`: 0.2 was the choice on every leave-one-collection-out fold
# (and on all four) of the dev collections with the adapted + fine-tuned embedded model
# (benchmarks/hybrid.py, benchmarks/results/hybrid.md).
DEFAULT_ALPHA = 0.2
DEFAULT_RRF_K = 60.0
DEFAULT_DEPTH = 100


@dataclass(frozen=True)
class FusionConfig:
    """How to fuse: ``method`` (linear or rrf), its parameters, and each run's candidate ``depth``."""

    method: str = "linear"
    alpha: float = DEFAULT_ALPHA
    normalization: str = "minmax"
    rrf_k: float = DEFAULT_RRF_K
    depth: int = DEFAULT_DEPTH

    def __post_init__(self):
        if self.method not in FUSIONS:
            raise ValueError(f"unknown fusion {self.method!r}; choose one of {', '.join(FUSIONS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of "
                             f"{', '.join(NORMALIZATIONS)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.rrf_k, bool) or not isinstance(self.rrf_k, (int, float)) or not (
                math.isfinite(self.rrf_k) and self.rrf_k >= 0):
            raise ValueError(f"rrf_k must be a finite number >= 0, got {self.rrf_k!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be a positive integer, got {self.depth!r}")

    def candidate_depth(self, k: int) -> int:
        """Documents to take from each run to return ``k`` fused ones: ``max(depth, k)``."""
        return max(self.depth, k)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "FusionConfig":
        """From :meth:`to_dict` output (missing keys take the defaults, unknown keys are an error)."""
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fusion setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def describe(self) -> str:
        if self.method == "rrf":
            return f"rrf (k={self.rrf_k:g}, depth {self.depth})"
        return f"linear ({self.normalization}, alpha={self.alpha:g} on dense, depth {self.depth})"


def normalize(scores: Mapping[str, float], method: str = "minmax") -> dict[str, float]:
    """Per-query normalisation of one run's scores: ``minmax`` -> [0, 1], ``zscore`` -> mean 0, sd 1
    (population sd). Scores that are all equal map to 0. Non-finite scores are an error."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    vals = {d: float(s) for d, s in scores.items()}
    bad = next((d for d, s in vals.items() if not math.isfinite(s)), None)
    if bad is not None:
        raise ValueError(f"score of document {bad!r} is not finite ({vals[bad]})")
    if not vals:
        return {}
    if method == "minmax":
        lo, hi = min(vals.values()), max(vals.values())
        span = hi - lo
        return {d: (s - lo) / span if span > 0 else 0.0 for d, s in vals.items()}
    mean = math.fsum(vals.values()) / len(vals)
    sd = math.sqrt(math.fsum((s - mean) ** 2 for s in vals.values()) / len(vals))
    return {d: (s - mean) / sd if sd > 0 else 0.0 for d, s in vals.items()}


def _qids(dense: Run, bm25: Run) -> list[str]:
    return list(dict.fromkeys([*dense, *bm25]))


def _finish(fused: dict[str, float], k: int | None) -> dict[str, float]:
    return dict(top(fused, k))


def _check_k(k: int | None, depth: int | None) -> None:
    for name, v in (("k", k), ("depth", depth)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def linear(dense: Run, bm25: Run, alpha: float = DEFAULT_ALPHA, *, normalization: str = "minmax",
           depth: int | None = DEFAULT_DEPTH, k: int | None = None) -> dict[str, dict[str, float]]:
    """Convex combination of per-query normalised scores: ``alpha * dense + (1 - alpha) * bm25``.

    Each run contributes its top ``depth`` documents per query (None: all); the result keeps the
    best ``k`` fused documents per query (None: every candidate). Every query of either run is in
    the result.
    """
    FusionConfig(alpha=alpha, normalization=normalization)  # validates
    _check_k(k, depth)
    out: dict[str, dict[str, float]] = {}
    for qid in _qids(dense, bm25):
        nd = normalize(dict(top(dense.get(qid) or {}, depth)), normalization)
        nb = normalize(dict(top(bm25.get(qid) or {}, depth)), normalization)
        dmin = min(nd.values(), default=0.0)
        bmin = min(nb.values(), default=0.0)
        fused = {doc: alpha * nd.get(doc, dmin) + (1.0 - alpha) * nb.get(doc, bmin)
                 for doc in dict.fromkeys([*nd, *nb])}
        out[qid] = _finish(fused, k)
    return out


def rrf(dense: Run, bm25: Run, *, rrf_k: float = DEFAULT_RRF_K, depth: int | None = DEFAULT_DEPTH,
        k: int | None = None) -> dict[str, dict[str, float]]:
    """Reciprocal rank fusion: ``sum 1 / (rrf_k + rank)`` over the runs a document appears in, ranks
    from 1 in :func:`rank_docs` order within each run's top ``depth``."""
    FusionConfig(rrf_k=rrf_k)  # validates
    _check_k(k, depth)
    out: dict[str, dict[str, float]] = {}
    for qid in _qids(dense, bm25):
        fused: dict[str, float] = {}
        for run in (dense, bm25):
            for rank, (doc, _) in enumerate(top(run.get(qid) or {}, depth), start=1):
                fused[doc] = fused.get(doc, 0.0) + 1.0 / (rrf_k + rank)
        out[qid] = _finish(fused, k)
    return out


def fuse(dense: Run, bm25: Run, config: FusionConfig | None = None, k: int | None = None
         ) -> dict[str, dict[str, float]]:
    """Fuse two runs as ``config`` says (default: :class:`FusionConfig` defaults); each run
    contributes ``config.candidate_depth(k)`` documents per query, the result the best ``k``."""
    config = config or FusionConfig()
    depth = config.candidate_depth(k) if k is not None else config.depth
    if config.method == "rrf":
        return rrf(dense, bm25, rrf_k=config.rrf_k, depth=depth, k=k)
    return linear(dense, bm25, config.alpha, normalization=config.normalization, depth=depth, k=k)
