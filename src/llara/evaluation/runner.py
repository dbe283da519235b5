"""Evaluate retrieval methods on BEIR-format datasets and write self-describing results.

Methods: ``bm25``, ``dense`` (one result per template) and ``hybrid`` (each dense run fused with the
BM25 run, :mod:`llara.retrieval.fusion`). Each dataset gets at most one BM25 pass and one encoder
pass, whichever methods are asked for. Each (dataset, method) pair writes
``<output>/<dataset>/<label>/metrics.json`` and ``run.trec``; ``summary.json`` and ``summary.md`` at
the top hold the comparison tables.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..data.beir import BeirDataset, load_beir
from ..io import passage_text, write_json, write_text
from ..retrieval.fusion import FusionConfig, fuse
from ..retrieval.ranking import top
from .metrics import evaluate_run, write_trec_run

log = logging.getLogger(__name__)

REPORTED = ("ndcg@10", "recall@100", "mrr@10", "map@100")
METHODS = ("bm25", "dense", "hybrid")


@dataclass
class Result:
    dataset: str
    model: str
    template: str
    metrics: dict[str, float]
    num_queries: int
    num_docs: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    retrieval: str = "dense"  # bm25, dense or hybrid

    @property
    def label(self) -> str:
        if self.retrieval == "hybrid":
            return f"hybrid:{self.model}:{self.template}"
        return self.template if self.model in ("bm25", "") else f"{self.model}:{self.template}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "template": self.template,
            "metrics": {k: self.metrics[k] for k in REPORTED if k in self.metrics},
            "num_queries": self.num_queries,
            "num_docs": self.num_docs,
            "seconds": round(self.seconds, 3),
            "retrieval": self.retrieval,
            "settings": self.settings,
        }


def save_result(result: Result, run: dict, out_dir: Path) -> Path:
    safe = result.label.replace("/", "_").replace(":", "__")
    d = Path(out_dir) / result.dataset / safe
    write_trec_run(run, d / "run.trec", tag=safe[:40])
    write_json(d / "metrics.json", result.to_dict())
    return d


def evaluate_bm25(ds: BeirDataset, k: int = 100) -> tuple[Result, dict]:
    from ..retrieval.bm25 import bm25_search

    t0 = time.perf_counter()
    run = bm25_search(ds.corpus, ds.queries, k=k)
    m = evaluate_run(ds.qrels, run)
    res = Result(ds.name, "bm25", "bm25", m, len(ds.qrels), len(ds.corpus), time.perf_counter() - t0,
                 {"k": k, "stemmer": "PyStemmer english", "stopwords": "bm25s english"}, retrieval="bm25")
    return res, run


def evaluate_dense(ds: BeirDataset, encoder, templates: Sequence, k: int = 100) -> list[tuple[Result, dict]]:
    """Encode once per distinct prompt input (templates that differ only in pooling share a pass)."""
    from ..prompts import get_template
    from ..retrieval.dense import exact_search

    templates = [get_template(t) for t in templates]
    qids = [q for q in ds.queries if q in ds.qrels]
    dids = list(ds.corpus)
    t0 = time.perf_counter()
    q_emb = encoder.encode_multi([ds.queries[q] for q in qids], "query", templates)
    q_stats = encoder.last_stats
    d_emb = encoder.encode_multi([passage_text(ds.corpus[d]) for d in dids], "passage", templates)
    d_stats = encoder.last_stats
    enc_seconds = time.perf_counter() - t0
    out = []
    for t in templates:
        t1 = time.perf_counter()
        run = exact_search(q_emb[t.name], d_emb[t.name], dids, qids, k=k)
        m = evaluate_run(ds.qrels, run)
        settings = {
            "max_query_length": encoder.max_length["query"],
            "max_passage_length": encoder.max_length["passage"],
            "truncated_passages": d_stats.truncated,
            "truncated_queries": q_stats.truncated,
            "k": k,
            "dtype": str(next(encoder.model.parameters()).dtype).replace("torch.", ""),
            "device": str(encoder.device),
        }
        secs = enc_seconds / len(templates) + time.perf_counter() - t1
        out.append((Result(ds.name, encoder.model_id or "model", t.name, m, len(ds.qrels), len(dids), secs, settings), run))
    return out


def evaluate_hybrid(ds: BeirDataset, bm25: tuple[Result, dict], dense: tuple[Result, dict],
                    fusion: FusionConfig | None = None, k: int = 100) -> tuple[Result, dict]:
    """Fuse a dense and a BM25 run of ``ds`` (as :func:`evaluate_dense` / :func:`evaluate_bm25`
    return them, retrieved to at least ``fusion.candidate_depth(k)``) into a ``k``-deep run."""
    fusion = fusion or FusionConfig()
    (b_res, b_run), (d_res, d_run) = bm25, dense
    depth = fusion.candidate_depth(k)
    short = [r.label for r in (b_res, d_res) if r.settings.get("k", depth) < min(depth, r.num_docs)]
    if short:
        raise ValueError(f"{', '.join(short)}: retrieved fewer than the {depth} candidates the fusion needs")
    t0 = time.perf_counter()
    run = fuse(d_run, b_run, fusion, k=k)
    m = evaluate_run(ds.qrels, run)
    settings = {**d_res.settings, "k": k, "fusion": fusion.to_dict(),
                "depth": {"bm25": min(depth, b_res.settings.get("k", depth)),
                          "dense": min(depth, d_res.settings.get("k", depth))},
                "bm25": {x: b_res.settings[x] for x in ("stemmer", "stopwords") if x in b_res.settings}}
    secs = b_res.seconds + d_res.seconds + time.perf_counter() - t0
    return Result(ds.name, d_res.model, d_res.template, m, d_res.num_queries, d_res.num_docs, secs, settings,
                  retrieval="hybrid"), run


def _cut(ds: BeirDataset, pair: tuple[Result, dict], k: int) -> tuple[Result, dict]:
    """A run retrieved deeper than ``k`` (for fusion), cut to ``k`` and scored again."""
    res, run = pair
    if res.settings.get("k", k) <= k:
        return pair
    run = {q: dict(top(docs, k)) for q, docs in run.items()}
    res = Result(**{**res.__dict__, "metrics": evaluate_run(ds.qrels, run), "settings": {**res.settings, "k": k}})
    return res, run


def evaluate_datasets(
    datasets: Sequence,
    methods: Sequence[str],
    out_dir: "Path | str",
    *,
    encoder: "Callable[[], Any] | None" = None,
    templates: Sequence | None = None,
    split: str = "test",
    k: int = 100,
    fusion: FusionConfig | None = None,
) -> list[tuple[Result, dict]]:
    """Evaluate every (dataset, method[, template]), save each result and the summary, and return
    the ``(Result, run)`` pairs in order (dataset by dataset, methods in the order given).

    ``datasets``: BEIR directories or loaded :class:`BeirDataset`; ``encoder``: a callable returning
    the encoder, called once and only if a dense or hybrid method is asked for. Per dataset, BM25
    runs once and the encoder encodes the queries and the corpus once (all templates together),
    however many of bm25, dense and hybrid are asked for.

    Examples:
        BM25, dense and hybrid on the shipped MED collection (``model_dir``: a tiny random
        checkpoint here, so only BM25's score means something; ``tmp``: a scratch directory):

        >>> from llara import Encoder, evaluate
        >>> pairs = evaluate([med], ["bm25", "dense", "hybrid"], tmp / "eval",
        ...                  encoder=lambda: Encoder.from_pretrained(model_dir, show_progress=False))
        >>> [(r.label, r.num_queries, r.num_docs) for r, run in pairs]   # dense and hybrid: label model:template
        [('bm25', 30, 1033), ('model:llara', 30, 1033), ('hybrid:model:llara', 30, 1033)]
        >>> round(pairs[0][0].metrics["ndcg@10"], 3)                   # BM25 on MED, as in the README
        0.696
        >>> sorted(p.name for p in (tmp / "eval").iterdir())          # + med/<method>/metrics.json, run.trec
        ['med', 'summary.json', 'summary.md']
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    fusion = fusion or FusionConfig()
    depth = fusion.candidate_depth(k) if "hybrid" in methods else k
    enc = None
    pairs: list[tuple[Result, dict]] = []
    for path in datasets:
        ds = path if isinstance(path, BeirDataset) else load_beir(path, split=split)
        bm25 = evaluate_bm25(ds, k=depth) if {"bm25", "hybrid"} & set(methods) else None
        dense = None
        if {"dense", "hybrid"} & set(methods):
            if enc is None:
                if encoder is None:
                    raise ValueError("dense and hybrid evaluation need an encoder")
                enc = encoder()
            dense = evaluate_dense(ds, enc, templates or [enc.template], k=depth)
            tr = dense[0][0].settings.get("truncated_passages")
            if tr:
                log.info("%s: %d of %d passages truncated to %d tokens (prompt included)", ds.name, tr,
                         dense[0][0].num_docs, dense[0][0].settings["max_passage_length"])
        for method in dict.fromkeys(methods):
            if method == "bm25":
                new = [_cut(ds, bm25, k)]
            elif method == "dense":
                new = [_cut(ds, p, k) for p in dense]
            else:
                new = [evaluate_hybrid(ds, bm25, p, fusion, k) for p in dense]
            for res, run in new:
                save_result(res, run, out_dir)
            pairs += new
    write_summary([r for r, _ in pairs], out_dir)
    return pairs


def side_by_side(results: Sequence[Result], metric: str = "ndcg@10") -> tuple[list[str], list[list[str]]]:
    """One row per dataset, one column per method label: ``(header, rows)`` of formatted cells."""
    labels = list(dict.fromkeys(r.label for r in results))
    get = {(r.dataset, r.label): r.metrics.get(metric) for r in results}
    rows = [[d] + [f"{get[(d, lab)]:.4f}" if get.get((d, lab)) is not None else "–" for lab in labels]
            for d in dict.fromkeys(r.dataset for r in results)]
    return ["dataset"] + labels, rows


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (no final newline): cells are written with ``str``."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(results: Sequence[Result]) -> str:
    """A markdown table, one row per (dataset, method)."""
    return markdown_table(
        ["dataset", "method", *REPORTED, "queries", "docs", "seconds"],
        ([r.dataset, r.label, *(f"{r.metrics.get(k, float('nan')):.4f}" for k in REPORTED), r.num_queries,
          r.num_docs, f"{r.seconds:.1f}"] for r in results))


def write_summary(results: Sequence[Result], out_dir: Path, header: str = "") -> None:
    """summary.json and summary.md (``header`` markdown, the comparison table, then nDCG@10 with
    the methods side by side when there are several), written atomically."""
    write_json(Path(out_dir) / "summary.json", [r.to_dict() for r in results])
    text = (header + "\n\n" if header else "") + comparison_table(results) + "\n"
    head, rows = side_by_side(results)
    if len(head) > 2:
        text += "\nnDCG@10, methods side by side:\n\n" + markdown_table(head, rows) + "\n"
    write_text(Path(out_dir) / "summary.md", text)
