"""The search service with the real model: micro-batching against one request at a time.

Reproduce (from the repository root, after the README's set-up with the int8 extra; ~12 min on 2 CPU cores):

    .venv/bin/python benchmarks/serve_curve.py --requests 500

Builds an adi index with the embedded SmolLM2-135M (template `llara`) once per runtime (bf16 torch,
int8 ONNX Runtime), then, per runtime, starts two `llara serve` processes on that index: the default
micro-batching and `--max-batch 1` (one request at a time). For each number of concurrent clients
both servers get the same load one right after the other (same run, same machine load), from
`python -m llara.serve.loadtest` in a third process: adi's 35 queries cycled, k=10. `--requests`
requests at the concurrency the target is about (16) and `--curve-requests` at the others.
A tuning stage runs other `--max-batch:--max-wait-ms:clients` (default: the old 5 ms wait at 16 clients). Also measured: what one query
costs inside `Searcher.search` beside the model (tokenisation, tensors, pooling, FAISS).

Writes benchmarks/results/serve_curve.{md,json,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from adaptation import load_rows, save_rows
from index_bench import machine, run_load, serving
from zero_shot import DATA, RESULTS, ROOT

RUNS = ROOT / "runs" / "bench" / "serve"
QUERIES = DATA / "adi" / "queries.jsonl"
RUNTIMES = ("bf16", "int8")
# one-by-one gets the queue that batching has by default (8 x 32), so that neither answers 429 under load
POLICIES = {"batching": [], "one-by-one": ["--max-batch", "1", "--max-pending", "256"]}
OUT_JSON = RESULTS / "serve_curve.json"


def build_index(runtime: str) -> Path:
    out = RUNS / f"adi-{runtime}"
    if (out / "index.faiss").is_file():
        return out
    cmd = [str(ROOT / ".venv" / "bin" / "llara"), "index", "--model", "default", "--template", "llara",
           "--corpus", str(DATA / "adi" / "corpus.jsonl"), "--output", str(out), "--device", "cpu", "--resume"]
    cmd += ["--runtime", "onnx-int8"] if runtime == "int8" else ["--dtype", "bfloat16"]
    subprocess.run(cmd, check=True)
    return out


def save(data: dict) -> None:
    save_rows(OUT_JSON, data)


def curve(args, data: dict) -> None:
    """Every server (runtime x policy) up at once; concurrency outermost, so that the target
    concurrency, listed first, is measured for both runtimes before anything else."""
    rows = data.setdefault("curve", [])
    done = {(r["runtime"], r["policy"], r["concurrency"]) for r in rows}
    todo = [(c, rt) for c in args.concurrency for rt in args.runtimes if any((rt, p, c) not in done for p in POLICIES)]
    if not todo:
        return
    with contextlib.ExitStack() as stack:
        servers = {(rt, p): stack.enter_context(serving(build_index(rt), args.threads, extra))
                   for rt in dict.fromkeys(rt for _, rt in todo) for p, extra in POLICIES.items()}
        for c, runtime in todo:
            n = args.requests if c == args.target else args.curve_requests
            for policy in POLICIES:
                url, pid = servers[(runtime, policy)]
                r = run_load(url, pid, n, c, QUERIES, args.threads)
                rows.append({"runtime": runtime, "policy": policy, "concurrency": c, **r})
                print(f"{runtime} {policy:10s} c={c:3d} n={n} {r['requests_per_s']} req/s p50 "
                      f"{r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms batch {r['mean_batch']} "
                      f"statuses {r['statuses']}", flush=True)
                save(data)


def tune(args, data: dict) -> None:
    rows = data.setdefault("tuning", [])
    done = {(r["runtime"], r["max_batch"], r["max_wait_ms"], r["concurrency"]) for r in rows}
    index = build_index("bf16")
    for max_batch, max_wait, c in args.grid:
        if ("bf16", max_batch, max_wait, c) in done:
            continue
        with serving(index, args.threads, ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait)]) as (url, pid):
            r = run_load(url, pid, args.curve_requests, c, QUERIES, args.threads)
        rows.append({"runtime": "bf16", "max_batch": max_batch, "max_wait_ms": max_wait, "concurrency": c, **r})
        print(f"tune max_batch={max_batch} max_wait={max_wait} c={c}: {r['requests_per_s']} req/s "
              f"p99 {r['latency_ms']['p99']} ms batch {r['mean_batch']}", flush=True)
        save(data)


def overhead(args, data: dict) -> None:
    """One query through Searcher.search: total, the model (forward + pooling), the rest; and what
    the slot-token check cost per call before it was done once per template."""
    import torch

    from llara.modeling.loading import ensure_slot_tokens
    from llara.retrieval.searcher import Searcher

    torch.set_num_threads(args.threads)
    out = {}
    queries = [json.loads(x)["text"] for x in QUERIES.read_text().splitlines() if x.strip()]
    for runtime in args.runtimes:
        s = Searcher.from_index(build_index(runtime), verify=False)
        for q in queries[:3]:
            s.search(q)  # warm-up
        total, model = [], []
        for i in range(args.overhead_queries):
            t = time.perf_counter()
            s.search(queries[i % len(queries)], k=10)
            total.append(time.perf_counter() - t)
            model.append(s.encoder.last_stats.model_seconds)
        t = time.perf_counter()
        for _ in range(10):
            ensure_slot_tokens(s.encoder.tokenizer, s.encoder.model, s.encoder.template.slot_tokens)
        # The limit of micro-batching: the model alone on 16 queries, one by one against one batch.
        group = queries[:16]
        single, batched = [], []
        for _ in range(3):
            one = 0.0
            for q in group:
                s.encoder.encode([q], "query")
                one += s.encoder.last_stats.model_seconds
            single.append(one)
            s.encoder.encode(group, "query", batch_size=16)
            batched.append(s.encoder.last_stats.model_seconds)
        tokens = sum(len(s.encoder.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in group)
        out.setdefault(runtime, {})["model_16_queries"] = {
            "one_by_one_ms": round(min(single) * 1000, 1), "one_batch_ms": round(min(batched) * 1000, 1),
            "ratio": round(min(single) / min(batched), 2), "query_text_tokens": tokens}
        print(runtime, out[runtime], flush=True)
        out[runtime] |= {"queries": len(total), "median_total_ms": round(statistics.median(total) * 1000, 2),
                        "median_model_ms": round(statistics.median(model) * 1000, 2),
                        "median_rest_ms": round(statistics.median(t_ - m for t_, m in zip(total, model)) * 1000, 2),
                        "slot_check_ms_per_call_before": round((time.perf_counter() - t) / 10 * 1000, 2)}
        print(runtime, out[runtime], flush=True)
        del s
    data["overhead"] = out
    save(data)


def chart(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for runtime in RUNTIMES:
        for policy, style in (("batching", "-o"), ("one-by-one", "--s")):
            rs = sorted((r for r in data.get("curve", []) if r["runtime"] == runtime and r["policy"] == policy),
                        key=lambda r: r["concurrency"])
            if not rs:
                continue
            xs = [r["concurrency"] for r in rs]
            axes[0].plot(xs, [r["requests_per_s"] for r in rs], style, label=f"{runtime}, {policy}")
            axes[1].plot(xs, [r["latency_ms"]["p99"] for r in rs], style, label=f"{runtime}, {policy}")
    for ax, title in zip(axes, ("throughput (requests/s)", "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_curve.png", dpi=110)


def report(data: dict) -> None:
    lines = ["# Search service with the real model: micro-batching against one request at a time", "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores (AMD EPYC Zen 4, avx512_bf16 / "
             f"avx512_vnni, no AMX, no GPU; shared with other jobs, load average {data['machine']['load_average_at_start']:.1f} "
             f"at the start), torch {data['machine']['torch']}. Commands: " + "; ".join(f"`{c}`" for c in data.get("commands", {}).values()) + ". Each ran under `benchmarks/freeze.sh` (the other, niced jobs of the machine stopped meanwhile).", "",
             f"Index: adi (82 passages), SmolLM2-135M-Instruct (embedded), template `llara`, Flat; built with the "
             f"same runtime it is served with. One server process, {data['settings']['threads']} threads; load from "
             f"`python -m llara.serve.loadtest` in another process on the same 2 cores (adi's 35 queries cycled, k=10, "
             f"keep-alive connections). Server defaults: max_batch {data['defaults']['max_batch']}, max_wait_ms "
             f"{data['defaults']['max_wait_ms']}. For each concurrency both servers get the same load, one right after "
             "the other.", "",
             "| runtime | clients | requests | batching req/s | one-by-one req/s | ratio | batching p50 / p99 ms | "
             "one-by-one p50 / p99 ms | mean batch | errors |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    by = {(r["runtime"], r["policy"], r["concurrency"]): r for r in data.get("curve", [])}
    for runtime in RUNTIMES:
        for c in sorted({k[2] for k in by if k[0] == runtime}):
            b, o = by.get((runtime, "batching", c)), by.get((runtime, "one-by-one", c))
            if not (b and o):
                continue
            errors = (b["requests"] - b["ok"]) + (o["requests"] - o["ok"])
            lines.append(f"| {runtime} | {c} | {b['requests']} | {b['requests_per_s']} | {o['requests_per_s']} | "
                         f"{b['requests_per_s'] / o['requests_per_s']:.2f}x | {b['latency_ms']['p50']:.0f} / "
                         f"{b['latency_ms']['p99']:.0f} | {o['latency_ms']['p50']:.0f} / {o['latency_ms']['p99']:.0f} | "
                         f"{b['mean_batch']} | {errors} |")
    if data.get("tuning"):
        lines += ["", "## Tuning (bf16)", "", "| max_batch | max_wait_ms | clients | req/s | p50 ms | p99 ms | mean batch |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data["tuning"]:
            lines.append(f"| {r['max_batch']} | {r['max_wait_ms']} | {r['concurrency']} | {r['requests_per_s']} | "
                         f"{r['latency_ms']['p50']:.0f} | {r['latency_ms']['p99']:.0f} | {r['mean_batch']} |")
    if data.get("overhead"):
        lines += ["", "## One query inside Searcher.search", "",
                  "| runtime | total ms | model (forward + pooling) ms | rest ms | slot-token check per call before ms |",
                  "|---|---:|---:|---:|---:|"]
        for runtime, o in data["overhead"].items():
            lines.append(f"| {runtime} | {o['median_total_ms']} | {o['median_model_ms']} | {o['median_rest_ms']} | "
                         f"{o['slot_check_ms_per_call_before']} |")
        lines += ["", "The model alone on adi's first 16 queries (best of 3): what micro-batching can gain at most.", "",
                  "| runtime | 16 queries one by one ms | as one batch ms | ratio |", "|---|---:|---:|---:|"]
        for runtime, o in data["overhead"].items():
            m = o.get("model_16_queries")
            if m:
                lines.append(f"| {runtime} | {m['one_by_one_ms']} | {m['one_batch_ms']} | {m['ratio']}x |")
        lines += ["", "Medians over the queries. The last column is what every encode call paid before the slot-token "
                      "check was done once per template (it read the whole 49k-token vocabulary)."]
    if (RESULTS / "serve_curve.png").is_file():
        lines += ["", "![throughput and p99 latency](serve_curve.png)"]
    (RESULTS / "serve_curve.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "serve_curve.md").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "curve", "tune", "overhead", "report"], default="all")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--concurrency", nargs="+", type=int, default=[16, 1, 4, 64])
    p.add_argument("--target", type=int, default=16, help="concurrency that gets --requests")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--curve-requests", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    p.add_argument("--grid", nargs="+", default=["32:5:16"],
                   type=lambda s: tuple(float(x) if "." in x else int(x) for x in s.split(":")),
                   help="max_batch:max_wait_ms:clients runs for the tuning stage, beside the defaults in the curve")
    p.add_argument("--overhead-queries", type=int, default=20)
    args = p.parse_args(argv)
    from llara.serve.app import create_app
    import inspect

    sig = inspect.signature(create_app).parameters
    data = load_rows(OUT_JSON) or {}
    cli = " ".join([".venv/bin/python", "benchmarks/serve_curve.py", *(argv if argv is not None else sys.argv[1:])])
    data.setdefault("commands", {})[args.stage] = cli
    data.update(machine=machine(),
                settings={"threads": args.threads}, defaults={"max_batch": sig["max_batch"].default,
                                                              "max_wait_ms": sig["max_wait_ms"].default})
    if args.stage in ("all", "curve"):
        curve(args, data)
    if args.stage in ("all", "tune"):
        tune(args, data)
    if args.stage in ("all", "overhead"):
        overhead(args, data)
    chart(data)
    report(data)


if __name__ == "__main__":
    main()
