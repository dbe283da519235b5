"""The int8 runtime (ONNX Runtime, `--runtime onnx-int8`) against bf16 torch: speed and quality.

Reproduce (from the repository root, after the README's set-up with the int8 extra; ~15 min on 2 CPU cores):

    flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/int8.py                  # both stages
    flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/int8.py --stage speed    # or one: speed, quality

1. speed: `Encoder.encode` of the first passages of med (96-token passages, prompt included, batch 32)
   with each runtime, against that runtime's own raw forward pass over the same batches (the limit);
2. quality: nDCG@10 on the four dev collections, subsampled and truncated exactly as in
   benchmarks/adaptation.py (its helpers), untrained `llara` slot template (no adapted model here).

Writes benchmarks/results/int8.{md,json}. Embeddings are cached (the key holds the dtype and the
runtime), so an interrupted quality stage resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from adaptation import DATASETS, datasets, load_rows, save_rows
from index_bench import raw_forward_seconds
from zero_shot import DATA, RESULTS, SUBSAMPLED, machine

from llara.io import passage_text
from llara.evaluation.runner import evaluate_dense
from llara.modeling.encoder import Encoder
from llara.io import cache_root

RUNTIMES = {"bf16": {"dtype": "bfloat16"}, "int8": {"runtime": "onnx-int8"}}  # label: from_pretrained kwargs
OUT_JSON = RESULTS / "int8.json"


def encoder(label: str, args, cache: bool) -> Encoder:
    return Encoder.from_pretrained("default", template="llara", device="cpu", max_query_length=args.max_query_length,
                                   max_passage_length=args.max_passage_length, batch_size=args.batch_size,
                                   show_progress=False, cache_dir=cache_root() / "embeddings" if cache else None,
                                   **RUNTIMES[label])


def speed(args) -> dict:
    texts = []
    with open(DATA / "med" / "corpus.jsonl", encoding="utf-8") as fh:
        for _, line in zip(range(args.passages), fh):
            texts.append(passage_text(json.loads(line)))
    out = {}
    for label in RUNTIMES:
        t = time.perf_counter()
        enc = encoder(label, args, cache=False)
        load_s = time.perf_counter() - t
        enc.encode(texts[: args.batch_size], "passage")  # warm-up
        best = None
        for _ in range(args.repeats):  # best of: the machine is shared
            t = time.perf_counter()
            enc.encode(texts, "passage")
            wall = time.perf_counter() - t
            raw, tokens = raw_forward_seconds(enc, texts, args.batch_size)
            row = {"tokens": tokens, "encode_s": round(wall, 2), "encode_tokens_per_s": round(tokens / wall, 1),
                   "raw_forward_s": round(raw, 2), "raw_tokens_per_s": round(tokens / raw, 1)}
            if best is None or row["encode_tokens_per_s"] > best["encode_tokens_per_s"]:
                best = row
        best["ratio_to_raw"] = round(best["encode_tokens_per_s"] / best["raw_tokens_per_s"], 3)
        best["load_s"] = round(load_s, 1)
        out[label] = best
        print(label, best, flush=True)
        del enc
    return out


def quality(args) -> list[dict]:
    rows = load_rows(OUT_JSON).get("quality", []) if OUT_JSON.is_file() else []
    done = {(r["runtime"], r["dataset"]) for r in rows}
    sets = list(datasets(args))
    for label in RUNTIMES:
        enc = None
        for ds in sets:
            if (label, ds.name) in done:
                continue
            enc = enc or encoder(label, args, cache=True)
            r, _ = evaluate_dense(ds, enc, ["llara"])[0]
            rows.append({"runtime": label, **r.to_dict()})
            print(f"{ds.name:10s} {label} nDCG@10={r.metrics['ndcg@10']:.4f} ({r.seconds:.0f}s)", flush=True)
            save(quality=rows)
        del enc
    return rows


def save(**parts) -> None:
    data = load_rows(OUT_JSON) if OUT_JSON.is_file() else {}
    data.update(parts)
    save_rows(OUT_JSON, data)


def report(args) -> None:
    data = load_rows(OUT_JSON)
    lines = ["# int8 runtime (ONNX Runtime) against bf16 torch", "",
             f"Machine: {data['machine']} (AMD EPYC Zen 4, avx512_vnni / avx512_bf16, no AMX, no GPU; "
             "shared with other jobs). Model: SmolLM2-135M-Instruct (embedded), untrained, template `llara` "
             "(8 slot tokens). int8: torch.export -> ONNX, ONNX Runtime dynamic quantisation (int8 weights per "
             "output channel, activations per batch, MatMul only), ONNX Runtime CPU execution provider.", "",
             f"Command: `{data['command']}`", ""]
    if "speed" in data:
        sp = data["speed"]
        lines += ["## Encode speed", "",
                  f"The first {data['settings']['passages']} passages of med, {data['settings']['max_passage_length']}"
                  f" tokens at most (prompt included), batch {data['settings']['batch_size']}, best of "
                  f"{data['settings']['repeats']}. Raw forward: the runtime's forward pass alone over the same "
                  "batches.", "",
                  "| runtime | encode tokens/s | raw forward tokens/s | encode / raw | vs bf16 encode | load s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, r in sp.items():
            lines.append(f"| {label} | {r['encode_tokens_per_s']:.0f} | {r['raw_tokens_per_s']:.0f} | "
                         f"{r['ratio_to_raw']:.2f} | {r['encode_tokens_per_s'] / sp['bf16']['encode_tokens_per_s']:.2f}x"
                         f" | {r['load_s']} |")
        lines.append("")
    if data.get("quality"):
        by = {(r["runtime"], r["dataset"]): r["metrics"]["ndcg@10"] for r in data["quality"]}
        names = [d for d in DATASETS if ("bf16", d) in by and ("int8", d) in by]
        lines += ["## nDCG@10 on the dev collections", "",
                  f"Subsampled corpora as in benchmarks/adaptation.py (every judged document + a seeded sample, "
                  f"{data['settings']['max_docs']} at most), {data['settings']['max_passage_length']}-token passages, "
                  f"{data['settings']['max_query_length']}-token queries; exact search.", "",
                  "| collection | bf16 | int8 | int8 - bf16 |", "|---|---:|---:|---:|"]
        diffs = []
        for d in names:
            diffs.append(by[("int8", d)] - by[("bf16", d)])
            lines.append(f"| {d} | {by[('bf16', d)]:.4f} | {by[('int8', d)]:.4f} | {diffs[-1]:+.4f} |")
        if diffs:
            mean = sum(diffs) / len(diffs)
            lines += [f"| mean | | | {mean:+.4f} |", "",
                      f"Largest loss on one collection: {-min(diffs):.4f}; mean change {mean:+.4f}. "
                      f"The issue's bar for making int8 the default is a loss <= 0.005: "
                      f"{'met' if -min(diffs) <= 0.005 else 'not met, so int8 stays opt-in (`--runtime onnx-int8`)'}."]
    (RESULTS / "int8.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "int8.md").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "speed", "quality", "report"], default="all")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--passages", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-docs", type=int, default=800)
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--max-query-length", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {k: getattr(args, k) for k in ("passages", "repeats", "batch_size", "max_docs", "max_passage_length",
                                              "max_query_length")}
    save(machine=machine(), settings=settings, command="flock /tmp/llara-heavy.lock .venv/bin/python "
                                                       "benchmarks/int8.py" + (f" --stage {args.stage}"
                                                                               if args.stage != "all" else ""))
    if args.stage in ("all", "speed"):
        save(speed=speed(args))
    if args.stage in ("all", "quality"):
        quality(args)
        save(subsampled={k: list(v) for k, v in SUBSAMPLED.items()})
    report(args)


if __name__ == "__main__":
    main()
