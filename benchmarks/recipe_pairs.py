"""Which training pairs should `llara recipe` fine-tune on? (issue 21)

Compares pair mixes of `llara recipe --pairs` at the recipe's fine-tuning settings (batch 8 x 2 passages,
96-token passages, 64-token queries, lr 3e-4 with linear decay, temperature 0.05, LoRA r 64; seed 0 unless
a plan item says otherwise), each fine-tuned from the embedded SmolLM2-135M-Instruct WITHOUT the recipe's
adaptation stage (to fit the CPU time here), and evaluated like every earlier table: scifact, cranfield,
med and cisi, subsampled (judged documents plus seeded random others, --max-docs 800), 96-token passages.

The corpus pairs (title -> text, inverse cloze task, doc2query) are made by the recipe's own code
(`llara.retrieval.corpus_pairs.build_pairs`) from each collection's subsampled corpus, documents only (no
query, no judgment), with BM25 hard negatives over that corpus; one model per mix is trained on the pairs
of the four corpora pooled (a proxy for the recipe, which trains one model per corpus: the pooled model
has seen in-domain pairs of each collection, a quarter of them each). The shipped SQuAD pairs are those
of `llara recipe` (all 10,570 mined with BM25 when alone, as the old default; their share of the mix
otherwise). Pairs per run = steps x 8, split by the mix's ratios, the corpus share evenly over the four
collections; med has no titles, so its quarter is made by the other corpus sources of the mix.

Plan items are MIX:SEED:STEPS (mixes: see MIXES); each is resumable (`llara finetune --resume`, results
rows appended per collection). `--stage d2q` measures doc2query's cost on CPU with the embedded model.

    PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --plan shipped:0:32 shipped+title+ict:0:32
    PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --stage d2q
    PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --stage report

Writes benchmarks/results/recipe_pairs.{md,json}; runs go to runs/bench/recipe_pairs/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import finetune as ft
import learning_curve as lc
from adaptation import datasets, evaluate_models, load_rows, table
from zero_shot import DATA, RESULTS, ROOT, machine

from llara.data.shipped import shipped_pairs
from llara.io import iter_jsonl, write_json, write_jsonl, write_text
from llara.retrieval.corpus_pairs import CORPUS_SOURCES, PairsConfig, build_pairs, parse_mix, quotas

RUNS = ROOT / "runs" / "bench" / "recipe_pairs"
OUT_JSON = RESULTS / "recipe_pairs.json"
COST_JSON = RESULTS / "recipe_pairs_d2q.json"
LLARA = [sys.executable, "-m", "llara.cli"]
MIXES = {  # label: --pairs
    "shipped": "squad:1",
    "shipped+title+ict": "squad:1,title:1,ict:1",
    "title+ict": "title:1,ict:1",
    "shipped+ict": "squad:1,ict:1",
    "ict": "ict:1",
}


def label(mix: str, seed: int, steps: int) -> str:
    return f"{mix}/s{seed}/{steps}"


def run_dir(mix: str, seed: int, steps: int) -> Path:
    return RUNS / (f"ft_{mix.replace('+', '_')}_s{seed}" + (f"_{steps}" if steps != 32 else ""))


def shipped_mined() -> Path:
    """All 10,570 shipped SQuAD pairs with BM25 negatives, as `llara recipe` mines them (ranks 5-100, 7)."""
    out = RUNS / "squad_mined.jsonl"
    if not out.is_file():
        f = shipped_pairs("squad")
        ft.run(LLARA + ["mine", "--method", "bm25", "--corpus", str(f["corpus"]), "--queries", str(f["queries"]),
                        "--qrels", str(f["qrels"]), "--window", "5", "100", "--negatives", "7", "--seed", "0",
                        "--output", str(out)], RUNS / "mine.log")
    return out


def pairs_file(mix: str, seed: int, steps: int, args) -> Path:
    spec = parse_mix(MIXES[mix])
    if spec == {"squad": 1.0}:
        return shipped_mined()  # the old default: every shipped line; fine-tuning draws steps x 8 by the seed
    out = RUNS / f"pairs_{mix.replace('+', '_')}_s{seed}_{steps}.jsonl"
    if out.is_file():
        return out
    total = steps * args.batch_size
    want = quotas(spec, total)
    lines = []
    if "squad" in want:
        pool = [row for _, row in iter_jsonl(shipped_mined())]
        lines += [dict(x, source="squad") for x in random.Random(f"{seed}:squad").sample(pool, want["squad"])]
    corpus_mix = {k: v for k, v in spec.items() if k in CORPUS_SOURCES}
    corpus_total = total - want.get("squad", 0)
    if corpus_mix:
        sets = list(datasets(args))
        for ds in sets:
            corpus = RUNS / "corpora" / f"{ds.name}.jsonl"
            write_jsonl(({"_id": d, **doc} for d, doc in ds.corpus.items()), corpus)
            has_titles = any((doc.get("title") or "").strip() for doc in ds.corpus.values())
            mix_here = {k: v for k, v in corpus_mix.items() if has_titles or k != "title"}
            n = quotas(mix_here, max(round(corpus_total / len(sets)), 1))  # med: its title share goes to ict
            part = RUNS / "corpora" / f"pairs_{mix.replace('+', '_')}_s{seed}_{steps}_{ds.name}.jsonl"
            report = build_pairs(mix_here, corpus, part, sum(n.values()),
                                 PairsConfig(window=(5, 100), num_negatives=7, seed=seed))
            print(f"{mix} {ds.name}: {report}", flush=True)
            lines += [dict(row, collection=ds.name) for _, row in iter_jsonl(part)]
    random.Random(f"{seed}:order").shuffle(lines)
    write_jsonl(lines, out)
    return out


def train(mix: str, seed: int, steps: int, args, stop_at: int = 0) -> Path:
    """The fine-tuned model of a plan item; with ``stop_at``, the run (scheduled for ``steps``) is stopped
    once its checkpoint at step ``stop_at`` is written, and that checkpoint is exported (the run resumes
    to ``steps`` later with the same command)."""
    out = run_dir(mix, seed, steps)
    export = out.with_name(out.name + f"_at{stop_at}") if stop_at else out / "final"
    if (export / "llara.json").is_file():
        return export
    data = pairs_file(mix, seed, steps, args)
    cmd = LLARA + ["finetune", "--model", "default", "--data", str(data), "--output", str(out),
                   "--max-steps", str(steps), "--batch-size", str(args.batch_size), "--group-size", "2",
                   "--max-passage-length", "96", "--max-query-length", "64", "--seed", str(seed),
                   "--data-seed", str(seed), "--save-every", "8", "--keep-last", "0", "--cpu", "--no-progress",
                   "--resume"]
    ckpt = out / f"checkpoint-{stop_at:06d}"
    with lc.heavy(args):
        if not stop_at:
            ft.run(cmd, out.with_suffix(".log"))
            return export
        if not ckpt.is_dir():
            print("$", " ".join(ft.rel(c) for c in cmd), f"(stopped at step {stop_at})", flush=True)
            with open(out.with_suffix(".log"), "a") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                while not ckpt.is_dir() and proc.poll() is None:  # checkpoints are written atomically
                    time.sleep(5)
                proc.terminate()
                proc.wait()
        ft.run(LLARA + ["export", str(ckpt / "model"), str(export), "--template", "llara"],
               out.with_suffix(".log"))
    return export


def run_plan(args) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    for item in args.plan:
        mix, seed, steps = item.split(":")
        if mix not in MIXES:
            raise SystemExit(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
        seed, steps = int(seed), int(steps)
        name = label(mix, seed, steps) + (f"@{args.stop_at}" if args.stop_at else "")
        if {r["dataset"] for r in load_rows(OUT_JSON) if r["method"] == f"{name}:llara"} >= set(args.datasets):
            continue
        model = train(mix, seed, steps, args, args.stop_at)
        with lc.heavy(args):
            evaluate_models({name: (str(model), ["llara"])}, OUT_JSON, args, bm25=True)


def d2q_cost(args) -> None:
    """doc2query with the embedded model on --d2q-docs documents of cisi: tokens/s, seconds per 100 docs."""
    import torch

    from llara.data.beir import load_corpus
    from llara.modeling.loading import load_model
    from llara.retrieval.corpus_pairs import doc2query

    corpus = load_corpus(DATA / "cisi" / "corpus.jsonl")
    ids = sorted(corpus)
    random.Random(0).shuffle(ids)
    docs = [corpus[d] for d in ids[: args.d2q_docs]]
    with lc.heavy(args):
        t0 = time.perf_counter()
        model, tok, _ = load_model("default", causal_lm=True, device="cpu")
        load_s = time.perf_counter() - t0
        cfg = PairsConfig(d2q_batch_size=args.d2q_batch_size)
        queries, cost = doc2query(model, tok, docs, cfg)
    result = {**cost, "load_s": round(load_s, 1), "batch_size": cfg.d2q_batch_size,
              "max_new_tokens": cfg.d2q_max_new_tokens, "doc_words": cfg.d2q_doc_words, "dtype": str(model.dtype),
              "threads": torch.get_num_threads(), "machine": machine(),
              "examples": [{"title": d["title"], "query": q} for d, q in zip(docs[:8], queries[:8])],
              "empty": sum(not q for q in queries)}
    write_json(COST_JSON, result)
    print(json.dumps(result, indent=1))


def report(args) -> None:
    names = list(args.datasets)
    rows = load_rows(OUT_JSON)
    methods = {"bm25": "BM25"}
    def parts(m):  # "mix/sSEED/STEPS[@AT]:llara" -> (mix, seed, steps, at)
        mix, seed, steps = m.split(":")[0].split("/")
        steps, _, at = steps.partition("@")
        return mix, int(seed[1:]), int(steps), int(at or steps)

    runs = sorted({r["method"] for r in rows if r["method"] != "bm25"},
                  key=lambda m: (parts(m)[3], parts(m)[2], parts(m)[1], list(MIXES).index(parts(m)[0])))
    for m in runs:
        mix, seed, steps, at = parts(m)
        methods[m] = f"`{MIXES[mix]}`, " + (f"step {at} of a {steps}-step schedule" if at != steps
                                             else f"{steps} steps") + f", seed {seed}"
    get = {(r["method"], r["dataset"]): r["metrics"]["ndcg@10"] for r in rows}
    avg = {m: float(np.mean([get[(m, d)] for d in names])) for m in methods if all((m, d) in get for d in names)}
    lines = ["# Training pairs for `llara recipe`: shipped SQuAD vs pairs made from the corpus", "",
             "Each row fine-tunes the embedded SmolLM2-135M-Instruct (no adaptation) with the recipe's settings on "
             "the named `--pairs` mix (8 queries a step, 2 passages each, 96-token passages, BM25 hard "
             f"negatives, lr 3e-4 with linear decay, temperature 0.05), the corpus pairs made from the subsampled "
             f"corpora of the collections evaluated ({', '.join(names)}; documents only) and pooled: one model per "
             "mix (see the script's docstring). nDCG@10 / Recall@100 on those collections, subsampled (judged "
             f"documents plus seeded random others, at most {args.max_docs} unless more are judged), 96-token "
             f"passages. Machine: {machine()}, its 2 cores shared with other jobs (load 8-14), so wall times are "
             "not clean.", "",
             "## nDCG@10 / Recall@100", ""] + table(rows, methods, names) + [""]
    deltas = []
    for m in runs:
        mix, seed, steps, at = parts(m)
        ref = f"shipped/s{seed}/{steps}" + (f"@{at}" if at != steps else "") + ":llara"
        if m in avg and ref in avg and m != ref:
            deltas.append(f"{methods[m]}: {avg[m]:.3f} ({avg[m] - avg[ref]:+.3f} against `squad:1` at the same "
                          "seed and steps)")
    if deltas:
        lines += ["Average nDCG@10 and its change against the shipped pairs alone (the old default):", ""]
        lines += [f"- {d}" for d in deltas] + [""]
    steps_s = {}
    for m in runs:
        mix, seed, steps, at = parts(m)
        log = run_dir(mix, seed, steps) / "train_log.jsonl"
        if log.is_file():
            entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            steps_s[f"`{MIXES[mix]}` seed {seed}"] = entries[-1]["elapsed_s"] / max(entries[-1]["step"], 1)
    if steps_s:
        lines += ["Fine-tuning wall time per step (s, 2 shared cores): "
                  + "; ".join(f"{k} {v:.1f}" for k, v in steps_s.items()) + ".", ""]
    if COST_JSON.is_file():
        c = json.loads(COST_JSON.read_text())
        lines += ["## doc2query cost on this CPU", "",
                  f"The embedded model ({c['dtype']}, {c['threads']} threads) writing one query for each of "
                  f"{c['docs']} cisi documents (batches of {c['batch_size']}, left-padded, greedy, at most "
                  f"{c['max_new_tokens']} new tokens, documents cut to {c['doc_words']} words): "
                  f"{c['generated_tokens']} tokens in {c['seconds']:.0f} s = **{c['tokens_per_s']:.1f} tokens/s, "
                  f"{c['seconds_per_100_docs']:.0f} s per 100 documents** (model load {c['load_s']:.0f} s not "
                  f"included; {c['empty']} empty replies). Examples:", ""]
        lines += [f"- {e['title'][:70]!r} -> {e['query']!r}" for e in c["examples"]] + [""]
    lines += ["## Commands", "", "```bash",
              ]
    common = f" --datasets {' '.join(names)} --max-docs {args.max_docs}"
    for at in sorted({parts(m)[3] for m in runs}):
        items = [m for m in runs if parts(m)[3] == at]
        stop = f" --stop-at {at}" if parts(items[0])[2] != at else ""
        lines.append("PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --plan "
                     + " ".join(f"{parts(m)[0]}:{parts(m)[1]}:{parts(m)[2]}" for m in items) + stop + common)
    if COST_JSON.is_file():
        lines.append(f"PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --stage d2q --d2q-docs "
                     f"{json.loads(COST_JSON.read_text())['docs']}")
    lines += ["PYTHONPATH=src .venv/bin/python benchmarks/recipe_pairs.py --stage report" + common, "```", ""]
    write_text(RESULTS / "recipe_pairs.md", "\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["run", "d2q", "report"], default="run")
    p.add_argument("--plan", nargs="+", default=["shipped:0:32", "shipped+title+ict:0:32", "title+ict:0:32"],
                   help=f"MIX:SEED:STEPS items, in order; mixes: {', '.join(MIXES)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stop-at", type=int, default=0, help="stop each run at this step (a multiple of 8) of its "
                                                            "STEPS-step schedule and evaluate that checkpoint")
    p.add_argument("--d2q-docs", type=int, default=32)
    p.add_argument("--d2q-batch-size", type=int, default=16)
    lc.add_eval_args(p)
    args = p.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    if args.stage == "run":
        run_plan(args)
    elif args.stage == "d2q":
        d2q_cost(args)
    report(args)


if __name__ == "__main__":
    main()
