"""Ray engine overhead and the Qdrant backend on the real embedded model (CPU).

Reproduce (from the repository root, after `make setup`; about 5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/scaleout.py

1. ``llara index`` of the first ``--passages`` passages of med in one process, then with
   ``--engine ray --workers 2`` on a local Ray cluster (one model per actor, 1 torch thread each)
   on the same machine: wall time of each command (model loading and Ray start-up included), the
   encoding seconds the build logs record, and whether the shards are identical.
2. The single-process index exported to embedded Qdrant (``QdrantClient(path=...)``), and the 30
   med test queries searched through FAISS Flat and Qdrant: top-10 overlap, time of the vector search.

The whole run holds ``/tmp/llara-heavy.lock`` (flock; a machine shared with other jobs), so both
commands meet the same conditions.
Writes benchmarks/results/scaleout.{json,md}.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MED = ROOT / "src" / "llara" / "data" / "demo" / "med"
LOCK = "/tmp/llara-heavy.lock"


def run_timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def shard_checksums(index: Path) -> list[str]:
    m = json.loads((index / "manifest.json").read_text())
    return [s["files"]["embeddings"]["sha256"] for s in m["shards"]]


def encode_seconds(index: Path) -> float:
    from llara.training.logging_utils import read_log

    return sum(row["seconds"] for row in read_log(index / "build-log.jsonl") if "shard" in row)


def ray_overhead(args, work: Path, env: dict) -> dict:
    corpus = work / "corpus.jsonl"
    with open(MED / "corpus.jsonl") as src, open(corpus, "w") as dst:
        for _, line in zip(range(args.passages), src):
            dst.write(line)
    common = ["--corpus", str(corpus), "--model", "default", "--max-passage-length", str(args.max_passage_length),
              "--shard-size", str(args.shard_size), "--batch-size", "16"]
    llara = [sys.executable, "-m", "llara.cli", "index"]
    single_cmd = [*llara, *common, "--output", str(work / "single")]
    ray_cmd = [*llara, *common, "--output", str(work / "ray"), "--engine", "ray", "--workers", "2"]
    single_s = run_timed(single_cmd, env)
    ray_s = run_timed(ray_cmd, env)
    from llara.retrieval.store import open_index

    a, b = open_index(work / "single"), open_index(work / "ray")
    diff = float(np.abs(a.embeddings() - b.embeddings()).max())
    same = sum(x == y for x, y in zip(shard_checksums(work / "single"), shard_checksums(work / "ray")))
    return {
        "passages": args.passages, "shard_size": args.shard_size, "max_passage_length": args.max_passage_length,
        "commands": {"single": "llara index " + " ".join(single_cmd[4:]),
                     "ray": "llara index " + " ".join(ray_cmd[4:])},
        "single_wall_s": round(single_s, 1), "ray_wall_s": round(ray_s, 1),
        "overhead_ratio": round(ray_s / single_s, 3),
        "single_encode_s": round(encode_seconds(work / "single"), 1),
        "ray_encode_s_sum_over_actors": round(encode_seconds(work / "ray"), 1),
        "identical_shards": f"{same}/{len(a.manifest['shards'])}", "max_abs_diff": diff,
    }


def qdrant_vs_faiss(work: Path) -> dict:
    from llara.data.beir import load_queries
    from llara.modeling.encoder import Encoder
    from llara.prompts import Template
    from llara.retrieval.store import open_index
    from llara.retrieval.qdrant import export_to_qdrant, open_qdrant

    index = open_index(work / "single")
    t0 = time.perf_counter()
    export_to_qdrant(work / "single", str(work / "qdrant"))
    export_s = time.perf_counter() - t0
    m = index.manifest["model"]
    queries = list(load_queries(MED / "queries.jsonl").values())[:30]
    enc = Encoder.from_pretrained(m["spec"], template=Template.from_dict(m["template"]), show_progress=False,
                                  max_query_length=m["max_query_length"], max_passage_length=m["max_passage_length"])
    q = enc.encode(queries, "query")
    db = open_qdrant(str(work / "qdrant"))
    t0 = time.perf_counter()
    fs, fr = index.search(q, 10)
    faiss_ms = (time.perf_counter() - t0) * 1000 / len(q)
    t0 = time.perf_counter()
    qs, qr = db.search(q, 10)
    qdrant_ms = (time.perf_counter() - t0) * 1000 / len(q)
    db.close()
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fr, qr)]))
    return {"passages": len(index), "queries": len(q), "export_s": round(export_s, 2),
            "top10_overlap_with_faiss_flat": overlap, "max_score_diff": float(np.abs(fs - qs).max()),
            "faiss_flat_ms_per_query": round(faiss_ms, 3), "qdrant_embedded_ms_per_query": round(qdrant_ms, 3),
            "mode": "embedded (local): exact brute-force search; HNSW recall needs a Qdrant server (not run)"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=160)
    p.add_argument("--shard-size", type=int, default=20)
    p.add_argument("--max-passage-length", type=int, default=128)
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    lock = open(LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="llara-scaleout-"))
    try:
        from llara.modeling.precision import resolve_dtype

        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "load_average_at_start": os.getloadavg()[0]},
                  "dtype": str(resolve_dtype("cpu")).replace("torch.", ""),
                  "command": "python benchmarks/scaleout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "ray": ray_overhead(args, work, env)}
        result["qdrant"] = qdrant_vs_faiss(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaleout.json").write_text(json.dumps(result, indent=2) + "\n")
    r, qd = result["ray"], result["qdrant"]
    md = [
        "# Ray engine and Qdrant backend",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores shared with other jobs (load average "
        f"{result['machine']['load_average_at_start']:.1f} at the start), no GPU. Command: `{result['command']}` "
        f"({result['total_s']:.0f} s).",
        "",
        "## `llara index`: one process vs. `--engine ray --workers 2` (local Ray cluster, same machine)",
        "",
        f"Embedded model (SmolLM2-135M, {result['dtype']} (`--dtype auto`), CPU), first {r['passages']} "
        "passages of med truncated to "
        f"{r['max_passage_length']} tokens, shards of {r['shard_size']}.",
        "",
        "| | wall s (whole command) | encoding s (manifest) |",
        "|---|---:|---:|",
        f"| one process (torch on all cores) | {r['single_wall_s']} | {r['single_encode_s']} |",
        f"| Ray, 2 actors x 1 thread | {r['ray_wall_s']} | {r['ray_encode_s_sum_over_actors']} (sum over actors) |",
        "",
        f"Overhead ratio (Ray wall / one-process wall): **{r['overhead_ratio']}**. Shards byte-identical: "
        f"{r['identical_shards']}; largest difference between the two indexes' vectors: {r['max_abs_diff']:.2e}.",
        "",
        "## Qdrant (embedded) vs. FAISS Flat, same vectors",
        "",
        f"{qd['passages']} passages, {qd['queries']} med test queries, k=10. Export: {qd['export_s']} s. "
        f"Top-10 overlap with FAISS Flat: **{qd['top10_overlap_with_faiss_flat']:.0%}** (largest score difference "
        f"{qd['max_score_diff']:.1e}). Vector search per query: FAISS Flat {qd['faiss_flat_ms_per_query']} ms, "
        f"embedded Qdrant {qd['qdrant_embedded_ms_per_query']} ms. {qd['mode']}.",
        "",
    ]
    (RESULTS / "scaleout.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
