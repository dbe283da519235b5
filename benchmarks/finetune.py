"""Contrastive fine-tuning benchmark (issue 4): what `llara finetune` adds to the raw and to the adapted model.

1. mine: BM25 hard negatives for SQuAD (squad_pairs, queries + qrels/train.tsv) and SciFact's training
   claims (qrels/train.tsv), with `llara mine`; the two files are concatenated into one train.jsonl.
2. train: `llara finetune` of the raw embedded model and of the adapted one (the EBAE + EBAR + LM run
   of benchmarks/adaptation.py), with the same data, settings and seed.
3. eval: raw, adapted, raw + fine-tuned, adapted + fine-tuned and BM25 on scifact, cranfield, med, cisi,
   with the settings of benchmarks/adaptation.py (cached embeddings are reused).
4. memory: peak memory (RSS) and throughput of a large-batch step with and without gradient caching.

Reproduce (from the repository root, after the README's set-up and benchmarks/adaptation.py; about 30 min on 2 CPU cores):

    .venv/bin/python benchmarks/finetune.py                    # every stage, resumable
    .venv/bin/python benchmarks/finetune.py --stage memory     # one stage: mine, train, eval, memory, report

Writes benchmarks/results/finetune.{md,json,png} and benchmarks/results/finetune/<run>/ (logs, curves).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from adaptation import (DATASETS, RUNS as ADAPT_RUNS, bar_chart, datasets, evaluate_models, load_rows,
                        settings_line, table)
from zero_shot import DATA, RESULTS, ROOT, machine

from llara.io import write_text

RUNS = ROOT / "runs" / "bench" / "finetune"
LLARA = str(ROOT / ".venv" / "bin" / "llara")
ADAPTED = ADAPT_RUNS / "ebae_ebar_lm" / "final"
BASES = {"raw": "default", "adapted": str(ADAPTED)}
METHODS = {"bm25": "BM25", "default:llara": "raw (untrained slots)",
           "adapted:llara": "adapted (EBAE + EBAR + LM)", "raw_ft:llara": "raw + fine-tuned",
           "adapted_ft:llara": "adapted + fine-tuned"}


def rel(p) -> str:
    return str(p).replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(rel(c) for c in cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def mine_commands(args) -> dict[str, list[str]]:
    common = ["--method", "bm25", "--window", str(args.window[0]), str(args.window[1]),
              "--negatives", str(args.negatives), "--seed", "0"]
    return {
        "squad": [LLARA, "mine", "--corpus", str(DATA / "squad_pairs" / "corpus.jsonl"),
                  "--queries", str(DATA / "squad_pairs" / "queries.jsonl"),
                  "--qrels", str(DATA / "squad_pairs" / "qrels" / "train.tsv"),
                  "--output", str(RUNS / "mined_squad.jsonl")] + common,
        "scifact": [LLARA, "mine", "--corpus", str(DATA / "scifact" / "corpus.jsonl"),
                    "--queries", str(DATA / "scifact" / "queries.jsonl"),
                    "--qrels", str(DATA / "scifact" / "qrels" / "train.tsv"),
                    "--output", str(RUNS / "mined_scifact.jsonl")] + common,
    }


def mine(args) -> None:
    train = RUNS / "train.jsonl"
    if train.is_file():
        print("mined data already there", flush=True)
        return
    for name, cmd in mine_commands(args).items():
        if not (RUNS / f"mined_{name}.jsonl").is_file():
            run(cmd, RUNS / "mine.log")
    write_text(train, "".join((RUNS / f"mined_{name}.jsonl").read_text() for name in ("squad", "scifact")))


def finetune_command(base: str, out: Path, args, *, steps: int, batch: int, group: int,
                     grad_cache: int = 0) -> list[str]:
    return [LLARA, "finetune", "--model", BASES[base], "--data", str(RUNS / "train.jsonl"), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", str(batch), "--group-size", str(group),
            "--lr", str(args.lr), "--warmup-ratio", "0.1", "--lora", "--lora-r", "64", "--lora-alpha", "16",
            "--lora-dropout", "0.1", "--temperature", "0.01", "--max-query-length", "64",
            "--max-passage-length", str(args.max_passage_length), "--grad-cache-chunk", str(grad_cache),
            "--save-every", "10", "--seed", "0", "--no-progress", "--resume"]


def train(args) -> None:
    for base in args.bases:
        out = RUNS / f"{base}_ft"
        if (out / "final" / "llara.json").is_file():
            print(f"{base}_ft: already trained", flush=True)
            continue
        if base == "adapted" and not (ADAPTED / "llara.json").is_file():
            sys.exit(f"{ADAPTED} is missing: run benchmarks/adaptation.py --stage train first")
        run(finetune_command(base, out, args, steps=args.steps, batch=args.batch_size, group=args.group_size),
            RUNS / f"{base}_ft.log")


def evaluate(args) -> None:
    models = {"default": ("default", ["llara"]), "adapted": (str(ADAPTED), ["llara"])}
    for base in ("raw", "adapted"):
        final = RUNS / f"{base}_ft" / "final"
        if final.is_dir():
            models[f"{base}_ft"] = (str(final), ["llara"])
    evaluate_models(models, RESULTS / "finetune.json", args)


def memory(args) -> None:
    """Peak RSS and tokens/s of `llara finetune` steps at a large batch, plain vs. GradCache."""
    rows = []
    for chunk in (0, args.memory_chunk):
        out = RUNS / f"memory_gc{chunk}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = finetune_command("raw", out, args, steps=args.memory_steps, batch=args.memory_batch,
                               group=args.memory_group, grad_cache=chunk) + ["--no-export"]
        # a fresh wrapper process per run, so that its RUSAGE_CHILDREN peak is this run's alone
        wrapper = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                   "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"]
        print("$", " ".join(rel(c) for c in cmd), flush=True)
        proc = subprocess.run(wrapper + cmd, check=True, capture_output=True, text=True)
        (RUNS / f"memory_gc{chunk}.log").write_text(proc.stdout + proc.stderr)
        peak = int(proc.stdout.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])  # KiB on Linux
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
        secs = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])] or [log[0]["elapsed_s"]]
        row = {"grad_cache_chunk": chunk, "batch_size": args.memory_batch, "group_size": args.memory_group,
               "peak_rss_mib": peak / 1024, "step_s": statistics.median(secs),
               "tokens_per_s": log[-1].get("tokens_per_s"), "losses": [r["loss"] for r in log]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (RESULTS / "finetune_memory.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


def reading(rows: list[dict], names: list[str], logs: dict, args) -> list[str]:
    """Sentences computed from the table, so that they stay true when the benchmark is rerun."""
    get = {(r["method"], r["dataset"]): r["metrics"]["ndcg@10"] for r in rows}
    need = ["default:llara", "adapted:llara", "raw_ft:llara", "adapted_ft:llara", "bm25"]
    if any((m, d) not in get for m in need for d in names):
        return []
    avg = {m: float(np.mean([get[(m, d)] for d in names])) for m in need}
    ahead = [d for d in names if get[("adapted_ft:llara", d)] > get[("raw_ft:llara", d)]]
    text = (f"**Reading.** {args.steps} fine-tuning steps ({args.steps * args.batch_size} queries) raise the average "
            f"nDCG@10 from {avg['default:llara']:.3f} to {avg['raw_ft:llara']:.3f} for the raw model and from "
            f"{avg['adapted:llara']:.3f} to {avg['adapted_ft:llara']:.3f} for the adapted one. The adapted start "
            f"stays ahead after fine-tuning by {avg['adapted_ft:llara'] - avg['raw_ft:llara']:+.3f} on average "
            f"(on {len(ahead)} of {len(names)} collections: {', '.join(ahead) or 'none'})")
    if "raw" in logs and "adapted" in logs:
        first = {b: np.mean([r["loss"] for r in log[:5]]) for b, log in logs.items()}
        text += f", and its contrastive loss starts lower ({first['adapted']:.2f} vs {first['raw']:.2f} over the first 5 steps)"
    text += (". SciFact's training claims are part of the fine-tuning data (its test claims are not), so its gain is "
             "partly in-domain supervision; the other three collections contributed no labels. "
             f"BM25 ({avg['bm25']:.3f}) still leads on average. One seed.")
    return [text]


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for _ in datasets(args):
        pass
    rows = load_rows(RESULTS / "finetune.json")
    logs = {}
    for base in ("raw", "adapted"):
        p = RUNS / f"{base}_ft" / "train_log.jsonl"
        if p.is_file():
            logs[base] = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            dst = RESULTS / "finetune" / f"{base}_ft"
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("train_log.jsonl", "loss.png"):
                if (RUNS / f"{base}_ft" / f).is_file():
                    shutil.copyfile(RUNS / f"{base}_ft" / f, dst / f)
    counts = {n: sum(1 for _ in open(RUNS / f"mined_{n}.jsonl")) for n in ("squad", "scifact")
              if (RUNS / f"mined_{n}.jsonl").is_file()}
    mem = json.loads((RESULTS / "finetune_memory.json").read_text()) \
        if (RESULTS / "finetune_memory.json").is_file() else None
    lines = [
        "# Contrastive fine-tuning of the embedded model, raw and adapted",
        "",
        f"Model: SmolLM2-135M-Instruct (the embedded default), fp32 on CPU ({machine()}).",
        "",
        "Training data: BM25 hard negatives mined with `llara mine` (rank window "
        f"{args.window[0]}–{args.window[1]}, {args.negatives} negatives per query, judged positives never used) for "
        + ", ".join(f"{n} ({c} queries)" for n, c in counts.items())
        + ": SQuAD v1.1 dev questions (`squad_pairs`, qrels/train.tsv) and SciFact's training claims "
        "(qrels/train.tsv; the test claims are disjoint, the corpus is shared as in BEIR).",
        "",
        f"Fine-tuning: `llara finetune`, LoRA with the authors' settings (r 64, alpha 16, dropout 0.1 on the attention "
        f"and MLP projections, slot-token rows trained), lr {args.lr} with 10% warm-up, temperature 0.01, "
        f"{args.steps} steps of {args.batch_size} queries x {args.group_size} passages (1 positive + "
        f"{args.group_size - 1} hard negative) plus in-batch negatives, queries cut to 64 tokens and passages to "
        f"{args.max_passage_length}, seed 0. The CPU budget allows only {args.steps * args.batch_size} training "
        "queries per run: this measures the direction of the effect, not a converged model.",
        "",
        settings_line(args),
        "",
        "## Retrieval, nDCG@10 / Recall@100",
        "",
    ] + table(rows, METHODS, list(args.datasets)) + [""] + reading(rows, list(args.datasets), logs, args) + [
        "", "![nDCG@10](finetune.png)", ""]
    if logs:
        lines += ["## Training", "", "| run | steps | wall (s) | median step (s) | tokens/s | loss first 5 → last 5 |",
                  "|---|---|---|---|---|---|"]
        for base, log in logs.items():
            secs = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])]
            lines.append(f"| {base} + fine-tuning | {log[-1]['step']} | {log[-1]['elapsed_s']:.0f} | "
                         f"{statistics.median(secs):.1f} | {np.median([r['tokens_per_s'] for r in log]):.0f} | "
                         f"{np.mean([r['loss'] for r in log[:5]]):.3f} → {np.mean([r['loss'] for r in log[-5:]]):.3f} |")
        lines += ["", "Curves: " + ", ".join(f"[{b}](finetune/{b}_ft/loss.png)" for b in logs), ""]
    if mem:
        r0 = mem["rows"][0]
        lines += ["## Gradient caching: memory and throughput", "",
                  f"`llara finetune` of the raw model, {r0['batch_size']} queries x {r0['group_size']} passages per "
                  f"step ({r0['batch_size'] * (r0['group_size'] + 1)} sequences), {len(r0['losses'])} step(s) per mode, same "
                  "settings as above otherwise. The plain step keeps the activations of all the sequences for the "
                  "backward pass (fp32, plus LoRA's dropout copies); GradCache keeps those of one chunk, at the price "
                  "of a second forward pass. Both give the same loss (and, as the tests check, the same gradients). Peak memory is the peak resident set size of the training process "
                  "(CPU; it includes the model, optimizer and Python).", "",
                  "| mode | peak RSS (MiB) | median step (s) | tokens/s | losses |", "|---|---|---|---|---|"]
        for r in mem["rows"]:
            mode = f"GradCache, chunks of {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else "plain step"
            lines.append(f"| {mode} | {r['peak_rss_mib']:.0f} | {r['step_s']:.1f} | {r['tokens_per_s']} | "
                         + ", ".join(f"{x:.4f}" for x in r["losses"]) + " |")
        lines += ["", "Peak RSS: getrusage(RUSAGE_CHILDREN) of a fresh wrapper process around each run.", ""]
    lines += ["## Commands", "", "```bash", ".venv/bin/python benchmarks/finetune.py   # all stages", "```", "",
              "which runs:", "", "```bash"]
    lines += [" ".join(rel(c) for c in cmd) for cmd in mine_commands(args).values()]
    lines += ["cat runs/bench/finetune/mined_squad.jsonl runs/bench/finetune/mined_scifact.jsonl > "
              "runs/bench/finetune/train.jsonl"]
    lines += [" ".join(rel(c) for c in finetune_command(b, RUNS / f"{b}_ft", args, steps=args.steps,
                                                         batch=args.batch_size, group=args.group_size))
              for b in ("raw", "adapted")]
    lines += ["```", ""]
    (RESULTS / "finetune.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(12, 4.8))
    bar_chart(rows, METHODS, list(args.datasets), ax, "Contrastive fine-tuning of SmolLM2-135M: nDCG@10")
    fig.tight_layout()
    fig.savefig(RESULTS / "finetune.png", dpi=120)
    print((RESULTS / "finetune.md").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", help="all, or a comma list of mine, train, eval, memory, report")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--bases", nargs="+", default=["raw", "adapted"], choices=["raw", "adapted"],
                   help="models to fine-tune in the train stage (default: both)")
    p.add_argument("--window", nargs=2, type=int, default=[5, 100])
    p.add_argument("--negatives", type=int, default=7)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-docs", type=int, default=800)
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--memory-batch", type=int, default=16)
    p.add_argument("--memory-group", type=int, default=4)
    p.add_argument("--memory-chunk", type=int, default=8)
    p.add_argument("--memory-steps", type=int, default=1)
    args = p.parse_args(argv)
    stages = ["mine", "train", "eval", "memory", "report"] if args.stage == "all" else args.stage.split(",")
    RUNS.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        {"mine": mine, "train": train, "eval": evaluate, "memory": memory, "report": report}[stage](args)


if __name__ == "__main__":
    main()
