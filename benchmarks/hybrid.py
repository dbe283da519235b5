"""Hybrid retrieval benchmark (issue 9): BM25 fused with the embedded model, and the default alpha.

For the zero-shot, adapted and adapted + fine-tuned embedded models on the four dev collections
(the subsampled corpora and 96-token passages of benchmarks/adaptation.py and finetune.py):

1. models: the adapted model (benchmarks/adaptation.py, variant ebae_ebar_lm) and its fine-tuned
   version (benchmarks/finetune.py, mine + train of the adapted base) when they are missing.
2. runs: one BM25 run and one dense run per (model, collection), 1,000 deep (whole subsampled
   corpora), saved as TREC files under runs/bench/hybrid/ (resumable; embeddings are cached too).
3. report: linear fusion (min-max, alpha 0 to 1 by 0.1; z-score too) and RRF (k 60) of each pair of
   runs; alpha chosen by leave-one-collection-out (the alpha with the best mean nDCG@10 on the
   other three collections is reported on the fourth), and the default alpha (best mean on all
   four, adapted + fine-tuned model). Writes benchmarks/results/hybrid.{md,json,png}.

Reproduce (from the repository root; each stage resumes):

    flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/hybrid.py --stage models
    flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/hybrid.py --stage runs
    .venv/bin/python benchmarks/hybrid.py --stage report
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from adaptation import DATASETS, RUNS as ADAPT_RUNS, datasets, save_rows, settings_line
from finetune import ADAPTED, RUNS as FT_RUNS
from zero_shot import RESULTS, ROOT, machine

from llara.evaluation.metrics import evaluate_run, read_trec_run, write_trec_run
from llara.evaluation.runner import evaluate_bm25, evaluate_dense
from llara.modeling.encoder import Encoder
from llara.io import cache_root
from llara.retrieval.fusion import DEFAULT_ALPHA, FusionConfig, fuse

RUNS = ROOT / "runs" / "bench" / "hybrid"
MODELS = {  # name: (label, model spec)
    "zero_shot": ("zero-shot (untrained slots)", "default"),
    "adapted": ("adapted (EBAE + EBAR + LM)", str(ADAPTED)),
    "adapted_ft": ("adapted + fine-tuned", str(FT_RUNS / "adapted_ft" / "final")),
}
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
PY = sys.executable


def models(args) -> None:
    bench = ROOT / "benchmarks"
    if not (ADAPTED / "llara.json").is_file():
        subprocess.run([PY, str(bench / "adaptation.py"), "--stage", "train", "--variants", "ebae_ebar_lm"], check=True)
    if not (FT_RUNS / "adapted_ft" / "final" / "llara.json").is_file():
        subprocess.run([PY, str(bench / "finetune.py"), "--stage", "mine,train", "--bases", "adapted"], check=True)


def run_path(model: str, dataset: str, kind: str):
    return RUNS / model / dataset / f"{kind}.trec"


def runs(args) -> None:
    """BM25 and dense runs, ``args.run_depth`` deep, one model loaded at a time; skips the runs on disk."""
    sets = list(datasets(args))
    for ds in sets:
        p = run_path("bm25", ds.name, "bm25")
        if not p.is_file():
            res, run = evaluate_bm25(ds, k=args.run_depth)
            write_trec_run(run, p, tag="bm25")
            print(f"{ds.name:10s} bm25 nDCG@10={res.metrics['ndcg@10']:.4f}", flush=True)
    for name in args.models:
        spec = MODELS[name][1]
        todo = [ds for ds in sets if not run_path(name, ds.name, "dense").is_file()]
        if not todo:
            continue
        if spec != "default" and not (ROOT / spec / "llara.json").is_file():
            print(f"{name}: {spec} is missing, run --stage models first", flush=True)
            continue
        enc = Encoder.from_pretrained(spec, template="llara", device="cpu", max_query_length=args.max_query_length,
                                      max_passage_length=args.max_passage_length, batch_size=32,
                                      cache_dir=cache_root() / "embeddings")
        for ds in todo:
            res, run = evaluate_dense(ds, enc, ["llara"], k=args.run_depth)[0]
            write_trec_run(run, run_path(name, ds.name, "dense"), tag=name)
            meta = {"model": name, "spec": spec, "seconds": res.seconds, "dataset": ds.name, **res.settings}
            save_rows(run_path(name, ds.name, "meta").with_suffix(".json"), meta)
            print(f"{ds.name:10s} {name} nDCG@10={res.metrics['ndcg@10']:.4f} ({res.seconds:.0f}s, "
                  f"{res.settings['dtype']})", flush=True)
        del enc


# --------------------------------------------------------------------------- report
def sweep(args, depth: int, norms=("minmax", "zscore")) -> dict:
    """nDCG@10 (and Recall@100) of every fusion setting with ``depth`` candidates per run, per model
    and collection; fused runs are 100 deep."""
    out = {}
    for ds in datasets(args):
        bm25 = read_trec_run(run_path("bm25", ds.name, "bm25"))
        out.setdefault("bm25", {})[ds.name] = _scores(ds.qrels, bm25)
        for name in args.models:
            p = run_path(name, ds.name, "dense")
            if not p.is_file():
                continue
            dense = read_trec_run(p)
            row = {"dense": _scores(ds.qrels, dense), "rrf": _scores(ds.qrels, fuse(dense, bm25, FusionConfig(
                method="rrf", depth=depth), k=100))}
            for norm in norms:
                row[norm] = {str(a): _scores(ds.qrels, fuse(dense, bm25, FusionConfig(
                    alpha=a, normalization=norm, depth=depth), k=100)) for a in ALPHAS}
            out.setdefault(name, {})[ds.name] = row
    return out


def _scores(qrels, run) -> dict:
    m = evaluate_run(qrels, run)
    return {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"]}


def best_alpha(curves: dict[str, dict], names: list[str], norm: str = "minmax") -> float:
    """The alpha with the best mean nDCG@10 over ``names`` (ties: the smaller alpha)."""
    means = {a: np.mean([curves[d][norm][str(a)]["ndcg@10"] for d in names]) for a in ALPHAS}
    return max(ALPHAS, key=lambda a: (round(float(means[a]), 12), -a))


def loco(curves: dict[str, dict], names: list[str], norm: str = "minmax") -> dict[str, dict]:
    """Leave one collection out: alpha chosen on the other three, scored on the held-out one."""
    out = {}
    for held in names:
        a = best_alpha(curves, [d for d in names if d != held], norm)
        out[held] = {"alpha": a, **curves[held][norm][str(a)]}
    return out


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = sweep(args, args.depth)
    deep = sweep(args, args.run_depth, norms=("minmax",))
    names = [d for d in args.datasets if d in res["bm25"]]
    have = [m for m in args.models if m in res and all(d in res[m] for d in names)]
    bm = {d: res["bm25"][d]["ndcg@10"] for d in names}
    summary = {"machine": machine(), "depth": args.depth, "run_depth": args.run_depth, "alphas": ALPHAS, "sweep": res, "models": {}}
    for m in have:
        lo = loco(res[m], names)
        summary["models"][m] = {"loco": lo, "loco_zscore": loco(res[m], names, "zscore"),
                                f"loco_depth_{args.run_depth}": loco(deep[m], names),
                                "alpha_all_four": best_alpha(res[m], names)}
    default = summary["models"].get("adapted_ft", {}).get("alpha_all_four")
    summary["default_alpha"] = default
    summary["library_default_alpha"] = DEFAULT_ALPHA
    save_rows(RESULTS / "hybrid.json", summary)

    def avg(vals):
        return float(np.mean(list(vals)))

    lines = ["# Hybrid retrieval: BM25 + the embedded model, fused", "",
             f"Machine: {machine()}; dtype of the dense runs: "
             + ", ".join(sorted({_dtype(m, d) for m in have for d in names})) + ".", "",
             settings_line(args), "",
             f"Fusion (`llara.retrieval.fusion`): each run's top {args.depth} per query; linear = alpha x dense + "
             "(1 - alpha) x BM25 on per-query min-max normalised scores (a document missing from a run gets that "
             "run's minimum); RRF = sum of 1 / (60 + rank). Models: the slot embeddings (`llara` template) of "
             "the embedded SmolLM2-135M-Instruct untrained, adapted (benchmarks/adaptation.py, EBAE + EBAR + LM, "
             "50 steps) and adapted + fine-tuned (benchmarks/finetune.py, 24 LoRA steps on BM25-mined SQuAD + "
             "SciFact-train negatives).", "",
             "## Out-of-sample: alpha chosen by leave-one-collection-out", "",
             "For each collection, alpha is the one with the best mean nDCG@10 on the *other three* collections "
             "(same model); the number is that alpha's nDCG@10 on the held-out collection. nDCG@10:", "",
             "| model | " + " | ".join(names) + " | average | vs BM25 |", "|---|" + "---|" * (len(names) + 2),
             "| BM25 | " + " | ".join(f"{bm[d]:.3f}" for d in names) + f" | {avg(bm.values()):.3f} | |"]
    for m in have:
        dense = {d: res[m][d]["dense"]["ndcg@10"] for d in names}
        lines.append(f"| {MODELS[m][0]}, dense alone | " + " | ".join(f"{dense[d]:.3f}" for d in names)
                     + f" | {avg(dense.values()):.3f} | {avg(dense.values()) - avg(bm.values()):+.3f} |")
    for m in have:
        lo = summary["models"][m]["loco"]
        lines.append(f"| **hybrid, {MODELS[m][0]}** (alpha) | " + " | ".join(
            f"{lo[d]['ndcg@10']:.3f} ({lo[d]['alpha']:g})" for d in names)
            + f" | **{avg(lo[d]['ndcg@10'] for d in names):.3f}** | "
            f"{avg(lo[d]['ndcg@10'] for d in names) - avg(bm.values()):+.3f} |")
    for m in have:
        r = {d: res[m][d]["rrf"]["ndcg@10"] for d in names}
        lines.append(f"| RRF, {MODELS[m][0]} | " + " | ".join(f"{r[d]:.3f}" for d in names)
                     + f" | {avg(r.values()):.3f} | {avg(r.values()) - avg(bm.values()):+.3f} |")
    lines += [""] + _reading(summary, res, names, bm, have) + [""]
    lines += ["## nDCG@10 against alpha (min-max linear fusion)", "", "![nDCG@10 vs alpha](hybrid.png)", "",
              "alpha = 0 is BM25 alone, alpha = 1 the dense model alone (re-ranked among the union of both runs' "
              "candidates).", ""]
    for m in have:
        lines += [f"**{MODELS[m][0]}**", "", "| alpha | " + " | ".join(names) + " | average |",
                  "|---|" + "---|" * (len(names) + 1)]
        for a in ALPHAS:
            v = [res[m][d]["minmax"][str(a)]["ndcg@10"] for d in names]
            lines.append(f"| {a:g} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {np.mean(v):.3f} |")
        for key, what in (("loco_zscore", "z-score normalisation instead of min-max"),
                          (f"loco_depth_{args.run_depth}", f"{args.run_depth} candidates per run instead of {args.depth}")):
            zs = summary["models"][m][key]
            lines += ["", f"{what}, leave-one-collection-out: " + ", ".join(
                f"{d} {zs[d]['ndcg@10']:.3f} (alpha {zs[d]['alpha']:g})" for d in names)
                + f"; average {avg(zs[d]['ndcg@10'] for d in names):.3f}."]
        lines.append("")
    lines += ["## Commands", "", "```bash",
              "flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/hybrid.py --stage models   # adaptation + fine-tuning",
              "flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/hybrid.py --stage runs",
              ".venv/bin/python benchmarks/hybrid.py --stage report", "```", ""]
    (RESULTS / "hybrid.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), sharey=False)
    for ax, d in zip(np.atleast_1d(axes), names):
        for m in have:
            line, = ax.plot(ALPHAS, [res[m][d]["minmax"][str(a)]["ndcg@10"] for a in ALPHAS], marker=".",
                            label=MODELS[m][0])
            ax.axhline(res[m][d]["rrf"]["ndcg@10"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(bm[d], color="black", ls="--", lw=1, label="BM25")
        if default is not None:
            ax.axvline(default, color="grey", lw=0.8)
        ax.set_title(d)
        ax.set_xlabel("alpha (weight of the dense run)")
    np.atleast_1d(axes)[0].set_ylabel("nDCG@10")
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Linear fusion of BM25 and the embedded model (dotted: RRF; grey: default alpha)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "hybrid.png", dpi=120)
    print((RESULTS / "hybrid.md").read_text())


def _dtype(model: str, dataset: str) -> str:
    p = run_path(model, dataset, "meta").with_suffix(".json")
    return json.loads(p.read_text()).get("dtype", "?") if p.is_file() else "?"


def _reading(summary, res, names, bm, have) -> list[str]:
    if "adapted_ft" not in have:
        return []
    lo = summary["models"]["adapted_ft"]["loco"]
    wins = [d for d in names if lo[d]["ndcg@10"] > bm[d]]
    gain = np.mean([lo[d]["ndcg@10"] - bm[d] for d in names])
    rel = np.mean([lo[d]["ndcg@10"] / bm[d] - 1 for d in names])
    picks = sorted({lo[d]["alpha"] for d in names})
    rrf_worse = [m for m in have if np.mean([res[m][d]["rrf"]["ndcg@10"] for d in names])
                 < np.mean([summary["models"][m]["loco"][d]["ndcg@10"] for d in names])]
    text = (f"**Reading.** With alpha chosen out of sample, the hybrid of BM25 and the adapted + fine-tuned model "
            f"beats BM25 on {len(wins)} of {len(names)} collections ({', '.join(wins) or 'none'}); average nDCG@10 "
            f"{np.mean([lo[d]['ndcg@10'] for d in names]):.3f} against {np.mean(list(bm.values())):.3f} "
            f"({gain:+.3f}, {100 * rel:+.1f}% per collection on average); the dense model alone averages "
            f"{np.mean([res['adapted_ft'][d]['dense']['ndcg@10'] for d in names]):.3f}. The leave-one-out choices "
            f"are alpha {', '.join(f'{a:g}' for a in picks)}; on all four collections the best alpha is "
            f"{summary['default_alpha']:g} (library default, `llara.retrieval.fusion.DEFAULT_ALPHA`: "
            f"{summary['library_default_alpha']:g}). "
            f"RRF, which ignores the score gaps, averages below the out-of-sample linear fusion for "
            f"{len(rrf_worse)} of {len(have)} models. One seed; subsampled corpora.")
    return [text]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", help="all, or a comma list of models, runs, report")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--depth", type=int, default=100, help="candidates per run for the fusion (default: %(default)s)")
    p.add_argument("--run-depth", type=int, default=1000,
                   help="depth of the saved runs, and of the deeper fusion compared in the report (default: %(default)s)")
    p.add_argument("--max-docs", type=int, default=800)
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--max-query-length", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    stages = ["models", "runs", "report"] if args.stage == "all" else args.stage.split(",")
    t0 = time.perf_counter()
    for stage in stages:
        {"models": models, "runs": runs, "report": report}[stage](args)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
