"""What embedding on the wrong side costs: the default of ``input_type`` in ``POST /v1/embeddings``.

A client that does not send ``input_type`` gets the server's default side for every text. This
measures nDCG@10 and Recall@100 of a fine-tuned LLaRA model on one BEIR collection for the four
ways queries and passages can be embedded:

* queries as ``query``, passages as ``passage``: right;
* both as ``passage``: default ``passage``, queries sent without the field;
* both as ``query``: default ``query``, documents ingested without the field;
* swapped: queries as ``passage``, passages as ``query``.

Usage (a checkpoint from ``llara recipe``; writes results/input_type.{json,md})::

    python benchmarks/input_type.py --model runs/recipe/finetune --data ../shared/data/med
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llara.data.beir import load_beir
from llara.evaluation.metrics import evaluate_run
from llara.io import passage_text
from llara.modeling.encoder import Encoder
from llara.retrieval.dense import exact_search

RESULTS = Path(__file__).parent / "results"
CASES = [("query", "passage", "right: queries as query, passages as passage"),
         ("passage", "passage", "default passage, queries sent without input_type"),
         ("query", "query", "default query, documents ingested without input_type"),
         ("passage", "query", "swapped")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a fine-tuned llara checkpoint")
    p.add_argument("--data", required=True, help="a BEIR directory (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--out", default=str(RESULTS / "input_type"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    ds = load_beir(args.data)
    enc = Encoder.from_pretrained(args.model, device="cpu", show_progress=False,
                                  max_passage_length=args.max_passage_length)
    qids = [q for q in ds.queries if q in ds.qrels]
    dids = list(ds.corpus)
    t0 = time.perf_counter()
    q = {side: enc.encode([ds.queries[i] for i in qids], side) for side in ("query", "passage")}
    d = {side: enc.encode([passage_text(ds.corpus[i]) for i in dids], side) for side in ("query", "passage")}
    seconds = time.perf_counter() - t0
    rows = []
    for q_side, d_side, what in CASES:
        m = evaluate_run(ds.qrels, exact_search(q[q_side], d[d_side], dids, qids, k=100))
        rows.append({"queries_as": q_side, "passages_as": d_side, "case": what,
                     "ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4)})
    out = {"model": args.model, "template": enc.template.name, "data": ds.name, "queries": len(qids),
           "passages": len(dids), "max_passage_length": args.max_passage_length, "encode_seconds": round(seconds, 1),
           "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "command": "python benchmarks/input_type.py " + " ".join(argv or __import__("sys").argv[1:]),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    right = rows[0]["ndcg@10"]
    lines = [f"# input_type: what embedding on the wrong side costs ({ds.name}, {len(qids)} queries, "
             f"{len(dids)} passages)", "",
             f"Model: `{args.model}` (template `{enc.template.name}`), passages cut to {args.max_passage_length} "
             f"tokens, exact inner-product search. {out['machine']}.", "",
             "| queries as | passages as | case | nDCG@10 | Recall@100 | nDCG@10 vs right |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['queries_as']} | {r['passages_as']} | {r['case']} | {r['ndcg@10']:.3f} | "
                     f"{r['recall@100']:.3f} | {r['ndcg@10'] / right:.2f}x |")
    lines += ["", f"Command: `{out['command']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
