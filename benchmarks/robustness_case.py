"""Robustness to how text is written (issue 12): a dev collection written in capitals.

Builds an upper-cased copy of a collection (corpus titles and texts and queries; same ids and judgments)
under runs/bench/case/, never committed, and evaluates on the original and on the copy, with the subsample
and lengths of benchmarks/adaptation.py:

- BM25 (it lower-cases: the two copies should score alike);
- each dense model with the `llara` template's casing `keep` (the text as written; the default) and with
  `lower_all_caps` (a text without lower-case letters is lower-cased, queries and passages alike).

Reproduce (from the repository root; a few minutes per model on 2 CPU cores):

    .venv/bin/python benchmarks/robustness_case.py --model raw=default \\
        --model ft=runs/bench/learning_curve/adapted_s0/step128

Writes benchmarks/results/robustness_case.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil

from adaptation import evaluate_models, load_rows
from learning_curve import add_eval_args, heavy
from zero_shot import DATA, RESULTS, ROOT, machine

from llara.io import iter_jsonl
from llara.prompts import get_template
from llara.io import write_jsonl

RUNS = ROOT / "runs" / "bench" / "case"
OUT_JSON = RESULTS / "robustness_case.json"
KEEP = dataclasses.replace(get_template("llara"), name="llara_keep", casing="keep")
LOWER = dataclasses.replace(get_template("llara"), name="llara_lower_all_caps", casing="lower_all_caps")


def upper_copy(name: str) -> str:
    """runs/bench/case/<name>_upper: the collection with every title, text and query upper-cased."""
    out = RUNS / f"{name}_upper"
    if not (out / "queries.jsonl").is_file():
        src = DATA / name
        for f in ("corpus.jsonl", "queries.jsonl"):
            rows = ({k: v.upper() if k in ("title", "text") else v for k, v in row.items()}
                    for _, row in iter_jsonl(src / f))
            write_jsonl(rows, out / f)
        shutil.copytree(src / "qrels", out / "qrels", dirs_exist_ok=True)
    return out.name


def evaluate(args) -> None:
    import adaptation

    upper = upper_copy(args.dataset)
    for data_root, name in ((DATA, args.dataset), (RUNS, upper)):
        adaptation.DATA = data_root  # datasets() reads adaptation.DATA / name
        args.datasets = [name]
        for label, spec in args.model:
            with heavy(args):
                evaluate_models({label: (spec, [KEEP, LOWER])}, OUT_JSON, args, bm25=True)
    adaptation.DATA = DATA


def report(args) -> None:
    rows = load_rows(OUT_JSON)
    get = {(r["method"], r["dataset"]): r["metrics"] for r in rows}
    d, u = args.dataset, f"{args.dataset}_upper"
    lines = ["# Robustness to text written in capitals", "",
             f"Collection: {d} (subsampled as in benchmarks/adaptation.py, --max-docs {args.max_docs}) and a copy with "
             "every title, text and query upper-cased (same ids, same judgments). Dense rows: the `llara` template "
             "with casing `keep` (text as written) and `lower_all_caps` (texts without a lower-case "
             f"letter are lower-cased, queries and passages alike). Passages cut to {args.max_passage_length} "
             f"tokens, queries to {args.max_query_length}. Machine: {machine()}.", "",
             "| model | casing | original nDCG@10 / R@100 | capitals nDCG@10 / R@100 | capitals / original (nDCG@10) |",
             "|---|---|---|---|---|"]

    def row(method, label, casing):
        a, b = get.get((method, d)), get.get((method, u))
        if a is None or b is None:
            return
        lines.append(f"| {label} | {casing} | {a['ndcg@10']:.3f} / {a['recall@100']:.3f} | "
                     f"{b['ndcg@10']:.3f} / {b['recall@100']:.3f} | {b['ndcg@10'] / a['ndcg@10']:.2f} |")

    row("bm25", "BM25", "(lower-cases its tokens)")
    for label, _ in args.model:
        row(f"{label}:llara_keep", label, "keep")
        row(f"{label}:llara_lower_all_caps", label, "lower_all_caps")
    lines += ["", "Models: " + ", ".join(f"{label} = `{spec}`" for label, spec in args.model), "",
              "## Command", "", "```bash", ".venv/bin/python benchmarks/robustness_case.py "
              + " ".join(f"--model {label}={spec}" for label, spec in args.model), "```", ""]
    (RESULTS / "robustness_case.md").write_text("\n".join(lines))
    print("\n".join(lines))


def model_arg(text: str) -> tuple[str, str]:
    label, sep, spec = text.partition("=")
    if not sep or not label or not spec:
        raise argparse.ArgumentTypeError(f"expected LABEL=MODEL, got {text!r}")
    return label, spec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "eval", "report"], default="all")
    p.add_argument("--model", type=model_arg, action="append", required=True, help="LABEL=MODEL (repeatable)")
    p.add_argument("--dataset", default="cisi")
    add_eval_args(p)
    args = p.parse_args(argv)
    if args.stage in ("all", "eval"):
        evaluate(args)
    if args.stage in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
