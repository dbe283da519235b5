"""sentence-transformers / MTEB / PEFT parity and sizes on the embedded model (SmolLM2-135M).

Reproduce (from the repository root, after `make setup`; about 10 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/interop.py

1. `llara export default` once per template; SentenceTransformer(export, trust_remote_code=True)
   vs llara's Encoder on adi's 35 queries and 82 documents: the lowest cosine per side.
2. mteb.evaluate on adi as a local task vs `llara evaluate` (nDCG@10), template llara, zero-shot.
3. One LoRA fine-tuning step (r=64, authors' recipe) exported merged and as the adapter alone:
   directory sizes, and the lowest cosine between the two (training precision auto: bf16 autocast on
   this CPU, so the merged export rounds W + BA to bf16 while the adapter merges in fp32 on load).
Writes benchmarks/results/interop.{json,md}.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llara.cli import main as llara
from llara.data.beir import load_beir
from llara.io import passage_text
from llara.interop.convert import export_checkpoint
from llara.interop.mteb_task import beir_task
from llara.modeling.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
ADI = ROOT.parent / "shared" / "data" / "adi"
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATES = ("llara", "paper", "eos", "mean")


def min_cos(a, b) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def size_mb(d: Path) -> float:
    return round(sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**20, 2)


def main() -> int:
    import mteb
    from sentence_transformers import SentenceTransformer

    ds = load_beir(ADI)
    queries, docs = list(ds.queries.values()), [passage_text(d) for d in ds.corpus.values()]
    tmp = Path(tempfile.mkdtemp(prefix="llara-interop-"))
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads, float32", "dataset": "adi (35 queries, 82 docs)",
           "st_parity": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        for name in TEMPLATES:
            d = export_checkpoint("default", tmp / name, template=name)
            st = SentenceTransformer(str(d), device="cpu", trust_remote_code=True)
            enc = Encoder.from_pretrained(str(d), device="cpu", dtype="float32", show_progress=False)
            out["st_parity"][name] = {
                "query_min_cos": min_cos(st.encode_query(queries), enc.encode_queries(queries)),
                "document_min_cos": min_cos(st.encode_document(docs), enc.encode(docs, "passage")),
                "prompt_name_min_cos": min_cos(st.encode(queries, prompt_name="query"), enc.encode_queries(queries)),
            }
            print(name, out["st_parity"][name], flush=True)
        d = tmp / "llara"
        assert llara(["evaluate", "--model", str(d), "--dataset", str(ADI), "--output", str(tmp / "eval"),
                      "--dtype", "float32", "--device", "cpu", "--no-cache"]) == 0
        ours = json.loads((tmp / "eval" / "summary.json").read_text())[0]["metrics"]["ndcg@10"]
        st = SentenceTransformer(str(d), device="cpu", trust_remote_code=True)
        theirs = mteb.evaluate(st, beir_task(ADI), cache=None, show_progress_bar=False).task_results[0].get_score()
        out["mteb"] = {"llara_evaluate_ndcg@10": round(ours, 5), "mteb_ndcg@10": theirs}
        print(out["mteb"], flush=True)

        train = tmp / "train.jsonl"
        assert llara(["mine", "--method", "bm25", "--corpus", str(ADI / "corpus.jsonl"), "--queries",
                      str(ADI / "queries.jsonl"), "--qrels", str(ADI / "qrels" / "test.tsv"), "--negatives", "3",
                      "--window", "2", "20", "--output", str(train)]) == 0
        runs = {}
        for kind, flag in (("merged", "--merge-lora"), ("adapter", "--no-merge-lora")):
            assert llara(["finetune", "--model", "default", "--data", str(train), "--output", str(tmp / kind),
                          "--batch-size", "2", "--group-size", "2", "--max-passage-length", "64", "--max-steps", "1",
                          "--lora", "--seed", "0", "--cpu", "--no-progress", flag]) == 0
            runs[kind] = tmp / kind / "final"
        merged = Encoder.from_pretrained(str(runs["merged"]), device="cpu", dtype="float32", show_progress=False)
        adapter = Encoder.from_pretrained(str(runs["adapter"]), device="cpu", dtype="float32", show_progress=False)
        out["lora"] = {
            "merged_dir_mb": size_mb(runs["merged"]), "adapter_dir_mb": size_mb(runs["adapter"]),
            "adapter_vs_merged_min_cos": min(min_cos(adapter.encode_queries(queries), merged.encode_queries(queries)),
                                             min_cos(adapter.encode(docs, "passage"), merged.encode(docs, "passage"))),
        }
        print(out["lora"], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interop.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = ["| template | query min cos | document min cos | prompt_name='query' min cos |", "|---|---|---|---|"]
    rows += [f"| {k} | {v['query_min_cos']:.7f} | {v['document_min_cos']:.7f} | {v['prompt_name_min_cos']:.7f} |"
             for k, v in out["st_parity"].items()]
    m, lo = out["mteb"], out["lora"]
    text = (f"# interop ({out['started']}; {out['machine']}; {out['dataset']})\n\n"
            "Command: `.venv/bin/python benchmarks/interop.py` (model: embedded SmolLM2-135M-Instruct)\n\n"
            "SentenceTransformer(export, trust_remote_code=True) vs llara Encoder:\n\n" + "\n".join(rows) +
            f"\n\nnDCG@10 on adi, template llara: llara evaluate {m['llara_evaluate_ndcg@10']:.5f}, "
            f"mteb {m['mteb_ndcg@10']:.5f}\n\n"
            f"LoRA r=64 (1 step): merged export {lo['merged_dir_mb']} MB, adapter export {lo['adapter_dir_mb']} MB; "
            f"adapter vs merged lowest cosine {lo['adapter_vs_merged_min_cos']:.7f}\n")
    (RESULTS / "interop.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
