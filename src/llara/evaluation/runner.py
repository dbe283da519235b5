"""Evaluate retrieval methods on BEIR-format datasets and write self-describing results.

Each (dataset, method) pair writes ``<output>/<dataset>/<label>/metrics.json`` and ``run.trec``;
``summary.json`` and ``summary.md`` at the top hold the comparison table.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.beir import BeirDataset, passage_text
from .metrics import evaluate_run, write_trec_run

log = logging.getLogger(__name__)

REPORTED = ("ndcg@10", "recall@100", "mrr@10", "map@100")


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

    @property
    def label(self) -> str:
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
            "settings": self.settings,
        }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_result(result: Result, run: dict, out_dir: Path) -> Path:
    safe = result.label.replace("/", "_").replace(":", "__")
    d = Path(out_dir) / result.dataset / safe
    write_trec_run(run, d / "run.trec", tag=safe[:40])
    _atomic_write(d / "metrics.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return d


def evaluate_bm25(ds: BeirDataset, k: int = 100) -> tuple[Result, dict]:
    from ..retrieval.bm25 import bm25_search

    t0 = time.perf_counter()
    run = bm25_search(ds.corpus, ds.queries, k=k)
    m = evaluate_run(ds.qrels, run)
    res = Result(ds.name, "bm25", "bm25", m, len(ds.qrels), len(ds.corpus), time.perf_counter() - t0,
                 {"k": k, "stemmer": "PyStemmer english", "stopwords": "bm25s english"})
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


def comparison_table(results: Sequence[Result]) -> str:
    """A markdown table, one row per (dataset, method)."""
    head = "| dataset | method | " + " | ".join(REPORTED) + " | queries | docs | seconds |"
    sep = "|" + "---|" * (len(REPORTED) + 5)
    rows = [head, sep]
    for r in results:
        vals = " | ".join(f"{r.metrics.get(k, float('nan')):.4f}" for k in REPORTED)
        rows.append(f"| {r.dataset} | {r.label} | {vals} | {r.num_queries} | {r.num_docs} | {r.seconds:.1f} |")
    return "\n".join(rows)


def write_summary(results: Sequence[Result], out_dir: Path, header: str = "") -> None:
    """summary.json and summary.md (``header`` markdown, then the comparison table), written atomically."""
    _atomic_write(Path(out_dir) / "summary.json", json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    _atomic_write(Path(out_dir) / "summary.md", (header + "\n\n" if header else "") + comparison_table(results) + "\n")
