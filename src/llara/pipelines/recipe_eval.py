"""The end of ``llara recipe --eval DIR``: the index the run built, searched in each of its modes
(dense, BM25, hybrid) with the test queries of a BEIR directory of the same corpus, scored (nDCG@10,
Recall@100 by :mod:`llara.evaluation.metrics`) and written as a table (``<output>/eval.md``)."""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["eval_files", "eval_table", "evaluate_index"]


def eval_files(directory: str) -> tuple[Path, Path]:
    """(queries.jsonl, qrels/test.tsv) of an --eval directory, or a ValueError naming what is missing."""
    d = Path(directory)
    queries, qrels = d / "queries.jsonl", d / "qrels" / "test.tsv"
    missing = [str(x) for x in (queries, qrels) if not x.is_file()]
    if missing:
        raise ValueError(f"--eval {directory}: missing {', '.join(missing)} (a BEIR directory with queries and "
                         "test judgments of the corpus)")
    return queries, qrels


def evaluate_index(searcher, directory: str, k: int = 100) -> list[dict]:
    """nDCG@10 and Recall@100 of ``searcher`` (dense, BM25, hybrid) on an --eval directory's test queries."""
    from ..data.beir import load_qrels, load_queries
    from ..evaluation.metrics import evaluate_run

    queries_path, qrels_path = eval_files(directory)
    qrels = {q: {d: s for d, s in rel.items() if s > 0} for q, rel in load_qrels(qrels_path).items()}
    queries = load_queries(queries_path)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ValueError(f"{qrels_path}: query id {missing[0]!r} is not in {queries_path}")
    ids = set(searcher.index.ids)
    judged = {d for rel in qrels.values() for d in rel}
    if not judged & ids:
        raise ValueError(f"--eval {directory}: none of its judged documents is in the index: another corpus?")
    qids = [q for q in qrels if qrels[q]]
    rows = []
    for mode in searcher.modes:
        t0 = time.perf_counter()
        hits = searcher.search([queries[q] for q in qids], k=k, mode=mode)
        run = {q: {h.doc_id: h.score for h in hs} for q, hs in zip(qids, hits)}
        m = evaluate_run(qrels, run, ndcg_at=10, recall_at=100)
        rows.append({"mode": mode, "ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"],
                     "queries": m["num_queries"], "seconds": round(time.perf_counter() - t0, 1)})
    if len(judged - ids):
        rows[0]["note"] = f"{len(judged - ids)} judged documents are not in the index"
    return rows


def eval_table(rows: list[dict], directory: str) -> str:
    bm25 = next((r["ndcg@10"] for r in rows if r["mode"] == "bm25"), None)
    lines = [f"nDCG@10 and Recall@100 on {directory} ({rows[0]['queries']} judged queries), the index this run built:",
             "", "| mode | nDCG@10 | Recall@100 | nDCG@10 / BM25 |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ndcg@10'] / bm25:.2f}x" if bm25 else "-"
        lines.append(f"| {r['mode']} | {r['ndcg@10']:.3f} | {r['recall@100']:.3f} | {ratio} |")
    notes = [r["note"] for r in rows if "note" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
