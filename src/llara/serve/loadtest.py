"""A bounded load test for ``llara serve``, meant to run in its own process.

    llara loadtest --url http://127.0.0.1:8000 --requests 2000 --concurrency 16 --pid SERVER_PID
    python -m llara.serve.loadtest ...  (the same, without the CLI's logging set-up)

Sends ``--requests`` POST /search requests from ``--concurrency`` concurrent clients, cycling
through the queries given (a BEIR queries.jsonl, a text file with one query per line, or a small
built-in list), and writes one JSON object to stdout: counts by status, wall time, requests/s,
latency percentiles, and the server's resident memory (read from /proc/PID/status, Linux only)
sampled every 5% of the requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_QUERIES = [
    "what is dense retrieval", "the capital of france", "index of the passage", "fish in the river",
    "blood and the heart", "a study of the brain", "search for a document", "train a language model",
]


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of process ``pid`` in MiB, or None where /proc is not available."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def read_queries(path: str | None) -> list[str]:
    if path is None:
        return DEFAULT_QUERIES
    p = Path(path)
    lines = [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    if p.suffix == ".jsonl":
        return [json.loads(x)["text"] for x in lines]
    return lines


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    xs = sorted(values)
    rank = max(1, min(len(xs), int(-(-q * len(xs) // 100))))
    return xs[rank - 1]


async def run_load(url: str, queries: list[str], requests: int, concurrency: int, k: int,
                   pid: int | None = None, timeout: float = 60.0) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    every = max(requests // 20, 1)
    next_id = 0
    done = 0

    async def worker(client):
        nonlocal next_id, done
        while next_id < requests:
            i = next_id
            next_id += 1
            body = {"query": queries[i % len(queries)], "k": k}
            t = time.perf_counter()
            try:
                r = await client.post("/search", json=body)
                key = str(r.status_code)
                if r.status_code == 200 and len(r.json().get("hits", [])) == 0:
                    key = "200-without-hits"
                if r.status_code != 200 and len(failures) < 5:
                    failures.append(r.text[:200])
            except httpx.HTTPError as e:
                key = type(e).__name__
                if len(failures) < 5:
                    failures.append(repr(e))
            latencies.append(time.perf_counter() - t)
            statuses[key] = statuses.get(key, 0) + 1
            done += 1
            if done % every == 0:
                m = rss_mb(pid)
                if m is not None:
                    rss.append((done / requests, m))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        start_rss = rss_mb(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    quarter = [m for f, m in rss if f <= 0.25]
    out = {
        "requests": requests,
        "concurrency": concurrency,
        "k": k,
        "statuses": statuses,
        "ok": statuses.get("200", 0),
        "failures": failures,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 1),
        "latency_ms": {p: round(percentile(ms, q), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(max(ms), 2), "mean": round(sum(ms) / len(ms), 2)},
        "rss_mb": {"start": start_rss, "samples": [(round(f, 2), round(m, 1)) for f, m in rss]},
    }
    if quarter and rss:
        out["rss_mb"]["growth_first_to_last_quarter"] = round(rss[-1][1] - quarter[-1], 1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--queries", default=None, help="queries.jsonl (BEIR) or a text file, one query per line")
    p.add_argument("--pid", type=int, default=None, help="server process id, to sample its memory")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def run(args: argparse.Namespace) -> int:
    """Run the load test the flags describe, write its JSON line to stdout; 0 when every request got 200."""
    result = asyncio.run(run_load(args.url, read_queries(args.queries), args.requests, args.concurrency, args.k,
                                  pid=args.pid, timeout=args.timeout))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["ok"] == args.requests else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llara.serve.loadtest", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
