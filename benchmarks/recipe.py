"""A stronger fine-tuning recipe, chosen by measurement at one fixed budget (issue 12).

Every variant changes one thing against the baseline point of benchmarks/learning_curve.py (the adapted
start fine-tuned for --steps steps with seed 0, constant learning rate after warm-up, batch 8 x 2 passages,
BM25-mined SQuAD + SciFact-train groups) and is evaluated the same way (four dev collections, subsampled,
96-token passages). Variants (worked through in the order given by --variants):

- wiki: the training groups plus Wikipedia title -> lead-section pairs from ../shared/data/wiki_vital
  (BM25 hard negatives mined with `llara mine` over the 10k leads; no dev collection text);
- group8: 1 positive + 7 hard negatives per query (GradCache, chunks of 16 sequences);
- temp05: InfoNCE temperature 0.05 instead of 0.01;
- lr1e4: learning rate 1e-4 instead of 3e-4;
- len160: training passages cut to 160 tokens instead of 96 (evaluation stays at 96);
- linear: the learning rate decays linearly to 0 after the warm-up (instead of staying constant).

Variants combine with "+" (e.g. ``linear+temp05``: the flags of both). ``--seed 1`` runs a variant with the
second seed of the learning curve (data order, LoRA init) and compares it with that seed's baseline.

Reproduce (from the repository root, after benchmarks/learning_curve.py has its adapted:0:<steps> point):

    .venv/bin/python benchmarks/recipe.py --variants wiki group8 temp05
    .venv/bin/python benchmarks/recipe.py --stage report

``--stage user`` times `llara recipe` as a user would run it, with its defaults, on one whole dev corpus
(--user-dataset, default cisi), then evaluates the fine-tuned model and BM25 on that collection's queries:

    .venv/bin/python benchmarks/recipe.py --stage user

``--stage compare`` (issue 21) runs `llara recipe` end to end on whole dev corpora (--compare-datasets) with
the old defaults (OLD_DEFAULTS, spelled out) and with this version's defaults, for each --compare-seeds, each
run ending with its own ``--eval`` of the collection's test queries (dense, BM25, hybrid through the index it
built), and writes the table side by side with the wall time per stage:

    .venv/bin/python benchmarks/recipe.py --stage compare --compare-datasets med cisi cranfield adi \
        --compare-seeds 0 1

Writes benchmarks/results/recipe.{md,json} (recipe_compare.{md,json} for --stage compare); runs go to
runs/bench/recipe/.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import finetune as ft
import learning_curve as lc
from adaptation import evaluate_models, load_rows, table
from zero_shot import DATA, RESULTS, ROOT, machine

from llara.io import iter_jsonl
from llara.io import write_json, write_jsonl

RUNS = ROOT / "runs" / "bench" / "recipe"
OUT_JSON = RESULTS / "recipe.json"
VARIANTS = {  # name: (label, extra `llara finetune` flags, extra data)
    "wiki": ("+ Wikipedia title -> lead pairs", {}, True),
    "group8": ("group of 8 (7 hard negatives), GradCache", {"--group-size": "8", "--grad-cache-chunk": "16"}, False),
    "temp05": ("temperature 0.05", {"--temperature": "0.05"}, False),
    "lr1e4": ("lr 1e-4", {"--lr": "1e-4"}, False),
    "len160": ("training passages of 160 tokens", {"--max-passage-length": "160"}, False),
    "linear": ("linear decay to 0", {"--lr-scheduler": "linear"}, False),
}


def variant(name: str) -> tuple[str, dict, bool]:
    """(label, flags, wiki) of a variant or of a "+"-joined combination of variants."""
    parts = name.split("+")
    unknown = [x for x in parts if x not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    flags = {k: v for x in parts for k, v in VARIANTS[x][1].items()}
    return " + ".join(VARIANTS[x][0] for x in parts), flags, any(VARIANTS[x][2] for x in parts)


def run_label(name: str, seed: int, steps: int) -> str:
    return f"{name}/{steps}" + (f"/s{seed}" if seed else "")


def wiki_groups(args) -> str:
    """train.jsonl + BM25-mined Wikipedia title -> lead groups, concatenated (the sampler shuffles)."""
    mixed = RUNS / "train_wiki.jsonl"
    if mixed.is_file():
        return str(mixed)
    beir = RUNS / "wiki_titles"
    if not (beir / "qrels" / "train.tsv").is_file():
        arts = [row for _, row in iter_jsonl(DATA / "wiki_vital" / "articles.jsonl")]
        write_jsonl(({"_id": f"d{i}", "title": "", "text": a["text"]} for i, a in enumerate(arts)),
                           beir / "corpus.jsonl")
        write_jsonl(({"_id": f"q{i}", "text": a["title"]} for i, a in enumerate(arts)), beir / "queries.jsonl")
        (beir / "qrels").mkdir(exist_ok=True)
        (beir / "qrels" / "train.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(arts))))
    mined = RUNS / "mined_wiki.jsonl"
    if not mined.is_file():
        ft.run([ft.LLARA, "mine", "--corpus", str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl"),
                "--qrels", str(beir / "qrels" / "train.tsv"), "--output", str(mined), "--method", "bm25",
                "--window", "5", "100", "--negatives", "7", "--seed", "0"], RUNS / "mine.log")
    rows = [row for path in (args.data, mined) for _, row in iter_jsonl(path)]
    write_jsonl(rows, mixed)
    return str(mixed)


def run_variants(args) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    base = lc.ensure_start("adapted", args)
    if not base:
        raise SystemExit(f"{args.adapted} is missing")
    for name in args.variants:
        label = run_label(name, args.seed, args.steps)
        if {r["dataset"] for r in load_rows(OUT_JSON) if r["method"] == f"{label}:llara"} >= set(args.datasets):
            continue
        _, flags, wiki = variant(name)
        run_args = argparse.Namespace(**vars(args))
        if wiki:
            run_args.data = wiki_groups(args)
        run_dir = RUNS / (name + (f"_s{args.seed}" if args.seed else ""))
        model = lc.train_to(run_dir, base, args.seed, args.steps, run_args, flags)
        with lc.heavy(args):
            evaluate_models({label: (str(model), ["llara"])}, OUT_JSON, args, bm25=False)


def parse_label(m: str) -> tuple[str, int, int]:
    """(variant name, seed, passage length) of a run label ``name/steps[/sSEED][@LENGTH]``."""
    m, _, length = m.partition("@")
    return m.split("/")[0], int(m.rsplit("/s", 1)[1]) if "/s" in m else 0, int(length or 96)


def long_eval(args) -> None:
    """The named variants (and with --long-baseline the baseline of the same seed), evaluated with --long-length-token passages
    (the rest of this benchmark cuts passages at 96 tokens; MiniLM reads 256 word pieces)."""
    L = args.long_length
    models = {}
    if args.long_baseline:
        models[f"baseline/s{args.seed}@{L}"] = (str(lc.RUNS / f"adapted_s{args.seed}" / f"step{args.steps}"), ["llara"])
    for name in args.variants:
        run_dir = RUNS / (name + (f"_s{args.seed}" if args.seed else ""))
        models[f"{run_label(name, args.seed, args.steps)}@{L}"] = (str(run_dir / f"step{args.steps}"), ["llara"])
    missing = [spec for spec, _ in models.values() if not (Path(spec) / "llara.json").is_file()]
    if missing:
        raise SystemExit(f"not trained yet: {missing}")
    with lc.heavy(args):
        evaluate_models(models, OUT_JSON, argparse.Namespace(**{**vars(args), "max_passage_length": L}), bm25=False)


def report(args) -> None:
    """One table over every run in recipe.json, each beside the baseline of its seed (and passage length)."""
    names = list(args.datasets)
    base = load_rows(lc.OUT_JSON)
    own = load_rows(OUT_JSON)
    runs = sorted({r["method"][: -len(":llara")] for r in own},
                  key=lambda m: (parse_label(m)[2], m.startswith("baseline"), parse_label(m)[1], m))
    seeds = sorted({parse_label(m)[1] for m in runs} | {0})
    rows = [r for r in base if r["method"] in ("bm25", "minilm")]
    methods = {"bm25": "BM25", "minilm": "all-MiniLM-L6-v2 (256 word pieces)"}
    for seed in seeds:
        key = f"{lc.point_label('adapted', seed, args.steps)}:llara"
        rows += [dict(r, method=f"baseline/s{seed}:llara") for r in base if r["method"] == key]
        methods[f"baseline/s{seed}:llara"] = f"baseline (learning_curve.py, adapted start), seed {seed}"
    rows += own
    for m in runs:
        name, seed, length = parse_label(m)
        what = "baseline" if name == "baseline" else variant(name)[0]
        methods[f"{m}:llara"] = f"{what}, seed {seed}" + (f", **{length}-token passages**" if length != 96 else "")
    get = {(r["method"], r["dataset"]): r["metrics"]["ndcg@10"] for r in rows}
    lines = ["# Fine-tuning recipe variants at one budget", "",
             f"Each row changes the named settings against the baseline of its seed: the adapted start (50 steps of "
             f"EBAE + EBAR + LM) fine-tuned for {args.steps} steps of 8 queries (lr 3e-4 constant after 4 warm-up "
             "steps, 2 passages per query, temperature 0.01, BM25-mined SQuAD + SciFact-train groups, LoRA r 64, "
             "bf16 with an fp32 LoRA base), evaluated on the subsampled dev collections with 96-token passages "
             "unless the row says otherwise. "
             f"Machine: {machine()}.", "",
             "## nDCG@10 / Recall@100", ""] + table(rows, methods, names) + [""]
    avg = {m: float(np.mean([get[(m, d)] for d in names])) for m in methods if all((m, d) in get for d in names)}
    deltas = []
    for m in runs:
        name, seed, length = parse_label(m)
        key, ref = f"{m}:llara", f"baseline/s{seed}" + (f"@{length}" if length != 96 else "") + ":llara"
        if key in avg and ref in avg and key != ref:
            deltas.append(f"{methods[key]}: {avg[key]:.3f} ({avg[key] - avg[ref]:+.3f})")
    if deltas:
        lines += ["Average nDCG@10 over the four collections, and its change against the baseline of the same seed "
                  "and passage length:", ""]
        lines += [f"- {d}" for d in deltas] + [""]
    steps = {}
    for run in sorted(RUNS.glob("*.log")):
        log = RUNS / run.stem / "train_log.jsonl"
        if log.is_file():
            entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            last = entries[-1]["step"]
            steps[run.stem] = (entries[-1]["elapsed_s"] / max(last, 1), last)
    if steps:
        lines += ["Training time per step (s, wall, 2 cores; light unit tests ran beside some runs): "
                  + ", ".join(f"{n} {t:.1f}" + (f" (stopped after {last} steps, not evaluated)" if last < args.steps
                                                 else "") for n, (t, last) in steps.items()) + ".", ""]
    user = RESULTS / "recipe_user.json"
    if user.is_file():
        u = json.loads(user.read_text())
        c = u["config"]
        lines += [f"## `llara recipe` on a whole corpus ({u['dataset']}, {u['docs']} documents)", "",
                  f"`llara recipe --corpus {u['dataset']}/corpus.jsonl` with its defaults: {c['adapt_steps']} adaptation "
                  f"steps, BM25 mining of the shipped SQuAD pairs, {c['finetune_steps']} fine-tuning steps of "
                  f"{c['batch_size']} x {c['group_size']}, {c['max_passage_length']}-token passages, index. "
                  f"Alone on the machine ({u['machine']}).", "",
                  "| stage | wall time | median step |", "|---|---|---|"]
        lines += [f"| {k} | {v:.0f} s | " + (f"{u['median_step_s'][k]:.1f} s |" if k in u["median_step_s"] else "|")
                  for k, v in u["stages"].items()]
        lines += ["", f"Then `llara evaluate` on the {u['dataset']} test queries (whole corpus, 96-token passages "
                  "for the dense side): nDCG@10 " + ", ".join(f"{k} {v:.3f}" for k, v in u["ndcg@10"].items())
                  + "; Recall@100 " + ", ".join(f"{k} {v:.3f}" for k, v in u["recall@100"].items()) + ".", ""]
    lines += ["## Commands", "", "```bash"]
    for seed in seeds:
        names_s = [m.split("/")[0] for m in runs if parse_label(m)[1] == seed and "@" not in m]
        if names_s:
            lines.append(f".venv/bin/python benchmarks/recipe.py --stage run --seed {seed} --variants " + " ".join(names_s))
    for m in runs:
        if "@" in m:
            name, seed, length = parse_label(m)
            lines.append(f".venv/bin/python benchmarks/recipe.py --stage long --long-length {length} --seed {seed} "
                         + ("--long-baseline" if name == "baseline" else f"--variants {name}"))
    if user.is_file():
        lines.append(".venv/bin/python benchmarks/recipe.py --stage user")
    lines += [".venv/bin/python benchmarks/recipe.py --stage report", "```", ""]
    (RESULTS / "recipe.md").write_text("\n".join(lines))
    print("\n".join(lines))


def user_run(args) -> None:
    """`llara recipe` with its defaults on a whole dev corpus: wall time per stage and per step, then
    `llara evaluate` (dense, BM25, hybrid) of the result on the collection's test queries."""
    ds = DATA / args.user_dataset
    out = RUNS / f"user_{args.user_dataset}"
    with lc.heavy(args):
        ft.run([ft.LLARA, "recipe", "--corpus", str(ds / "corpus.jsonl"), "--output", str(out), "--no-progress"],
               RUNS / f"user_{args.user_dataset}.log")
        if not (out / "eval" / "summary.json").is_file():
            ft.run([ft.LLARA, "evaluate", "--model", str(out / "finetune" / "final"), "--dataset", str(ds),
                    "--method", "dense", "--method", "bm25", "--method", "hybrid", "--output", str(out / "eval"),
                    "--no-cache"], RUNS / f"user_{args.user_dataset}.log")
    record = json.loads((out / "recipe.json").read_text())
    steps = {}
    for name in ("adapt", "finetune"):
        entries = [json.loads(x) for x in (out / name / "train_log.jsonl").read_text().splitlines() if x.strip()]
        times = np.diff([0.0] + [e["elapsed_s"] for e in entries])
        steps[name] = float(np.median(times[2:] if len(times) > 4 else times))
    rows = json.loads((out / "eval" / "summary.json").read_text())
    result = {"dataset": args.user_dataset, "docs": sum(1 for _ in open(ds / "corpus.jsonl")),
              "stages": {k: v["seconds"] for k, v in record["stages"].items()}, "median_step_s": steps,
              "ndcg@10": {r["retrieval"]: r["metrics"]["ndcg@10"] for r in rows},
              "recall@100": {r["retrieval"]: r["metrics"]["recall@100"] for r in rows},
              "config": record["config"], "machine": machine()}
    write_json(RESULTS / "recipe_user.json", result)
    print(json.dumps(result, indent=1))


# The recipe's defaults before issue 21, spelled out (so that this stays the old recipe when defaults change).
OLD_DEFAULTS = ["--pairs", "squad", "--finetune-steps", "32", "--adapt-steps", "50", "--batch-size", "8",
                "--group-size", "2", "--max-passage-length", "96", "--budget-minutes", "0"]


def _share_adaptation(done: Path, out: Path) -> None:
    """Start ``out`` with the adaptation of ``done`` (same corpus, seed and adaptation settings: the new
    defaults change only later stages), so that one adaptation serves both recipes."""
    if (out / "recipe.json").is_file() or not (done / "adapt" / "final" / "llara.json").is_file():
        return
    record = json.loads((done / "recipe.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    # the adapted model and its log; not the checkpoints (2 GB each: full weights and AdamW states)
    shutil.copytree(done / "adapt", out / "adapt", ignore=shutil.ignore_patterns("checkpoint-*"))
    write_json(out / "recipe.json", {"stages": {"adapt": record["stages"]["adapt"]}, "adapt_shared_from": str(done)})


def compare(args) -> None:
    """`llara recipe` with the old defaults and with this version's, whole corpora, --eval each."""
    out_json = RESULTS / "recipe_compare.json"
    rows = json.loads(out_json.read_text()) if out_json.is_file() else []
    done = {(r["recipe"], r["dataset"], r["seed"]) for r in rows}
    # new: the 128-step default with the shipped pairs only (the defaults of the first runs, spelled out);
    # mix: with pairs from the corpus too (--compare-mix: the defaults now, --pairs auto)
    # --budget-minutes 0: every run trains the steps asked, the quality compared here (the default 30-minute
    # cap only binds on a slow machine, e.g. a CPU without bf16; the report gives the wall times)
    extra = ["--budget-minutes", "0"] + list(args.compare_extra)
    recipes = {"old": OLD_DEFAULTS, "new": extra + ["--pairs", "squad"], "mix": extra + ["--pairs", args.compare_mix]}
    recipes = {k: v for k, v in recipes.items() if k in args.compare_recipes}
    for seed in args.compare_seeds:
        for name in args.compare_datasets:
            for label, flags in recipes.items():
                if (label, name, seed) in done:
                    continue
                ds = DATA / name
                out = RUNS / "compare" / f"{label}_{name}_s{seed}"
                if label == "mix" and "title" in args.compare_mix and not any(
                        row.get("title", "").strip() for _, row in iter_jsonl(ds / "corpus.jsonl")):
                    # a corpus without titles (med) cannot make title pairs: the rest of the mix
                    used = ",".join(x for x in args.compare_mix.split(",") if x.partition(":")[0] != "title")
                    flags = extra + ["--pairs", used]
                if label != "old":
                    _share_adaptation(RUNS / "compare" / f"old_{name}_s{seed}", out)
                with lc.heavy(args):
                    ft.run([ft.LLARA, "recipe", "--corpus", str(ds / "corpus.jsonl"), "--output", str(out),
                            "--seed", str(seed), "--eval", str(ds), "--no-progress"] + flags, out.with_suffix(".log"))
                record = json.loads((out / "recipe.json").read_text())
                rows.append({"recipe": label, "flags": flags, "config": record["config"], "dataset": name,
                             "seed": seed, "docs": sum(1 for _ in open(ds / "corpus.jsonl")),
                             "adapt_shared_from": record.get("adapt_shared_from"),
                             "eval": {r["mode"]: {"ndcg@10": r["ndcg@10"], "recall@100": r["recall@100"]}
                                      for r in record["eval"]["rows"]},
                             "stages": {k: v["seconds"] for k, v in record["stages"].items()},
                             "machine": machine()})
                write_json(out_json, rows)
    report_compare(rows, args)


ORDER = ("old", "new", "mix")


def _machines(rows: list[dict]) -> str:
    """The machines the rows ran on, each with the runs it made (wall times compare within one machine only)."""
    by: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["seed"], r["dataset"], ORDER.index(r["recipe"]))):
        by.setdefault(r.get("machine", "?"), []).append(f"{r['recipe']} {r['dataset']} s{r['seed']}")
    if len(by) == 1:
        return f"Machine: {next(iter(by))}."
    return "Machines (wall times compare within one only): " + "; ".join(
        f"{m}: {', '.join(runs)}" for m, runs in by.items()) + "."


def report_compare(rows: list[dict], args) -> None:
    labels = [x for x in ORDER if any(r["recipe"] == x for r in rows)]
    described = {"old": "the defaults before issue 21, `" + " ".join(OLD_DEFAULTS) + "`",
                 "new": "128 fine-tuning steps on the shipped pairs only (`--pairs squad`, defaults otherwise)",
                 "mix": "this version's defaults: 128 steps and `--pairs auto` = "
                        f"`{args.compare_mix}` (without title on a corpus without titles: med); new and mix run with "
                        "`--budget-minutes 0` (all 128 steps; the default 30-minute cap did not bind on the bf16 "
                        "machine)"}
    lines = ["# `llara recipe` end to end: the old defaults against this version's", "",
             "Whole dev corpora; each run evaluates the index it built (`--eval`: dense, BM25 and hybrid "
             "search of that index) on the collection's test queries, nDCG@10. "
             + "; ".join(f"{k}: {described[k]}" for k in labels)
             + ". Every run of a (collection, seed) after the old one starts from the old run's adaptation (the "
             f"same stage with the same settings; its time is counted once, in the old row). " + _machines(rows),
             "", "| collection | seed | recipe | BM25 | dense | hybrid | hybrid / BM25 | adapt / mine / finetune / index (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["seed"], ORDER.index(r["recipe"]))):
        e, st = r["eval"], r["stages"]
        shared = r.get("adapt_shared_from")
        pairs = next((f for i, f in enumerate(r["flags"][1:]) if r["flags"][i] == "--pairs"), None)
        label = r["recipe"] + (f" (`{pairs}`)" if r["recipe"] == "mix" and pairs else "")
        lines.append(f"| {r['dataset']} ({r['docs']}) | {r['seed']} | {label} | {e['bm25']['ndcg@10']:.3f} | "
                     f"{e['dense']['ndcg@10']:.3f} | {e['hybrid']['ndcg@10']:.3f} | "
                     f"{e['hybrid']['ndcg@10'] / e['bm25']['ndcg@10']:.2f} | "
                     + " / ".join("shared" if k == "adapt" and shared else f"{st.get(k, 0):.0f}"
                                  for k in ("adapt", "mine", "finetune", "index")) + " |")
    means = {}
    for label in labels:
        keys = {(r["dataset"], r["seed"]) for r in rows if r["recipe"] == "old"} & \
            {(r["dataset"], r["seed"]) for r in rows if r["recipe"] == label}
        mine = [r for r in rows if r["recipe"] == label and (r["dataset"], r["seed"]) in keys]
        old = [r for r in rows if r["recipe"] == "old" and (r["dataset"], r["seed"]) in keys]
        if not mine:
            continue
        m = {k: float(np.mean([r["eval"][k]["ndcg@10"] for r in mine])) for k in ("bm25", "dense", "hybrid")}
        o = float(np.mean([r["eval"]["dense"]["ndcg@10"] for r in old]))
        means[label] = (len(mine), sorted({r["dataset"] for r in mine}), m, o)
    lines += ["", "Mean over the (collection, seed) runs each recipe shares with the old one:", "",
              "| recipe | runs | collections | BM25 | dense | dense / BM25 | hybrid | hybrid / BM25 | dense - old dense |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, (n, names, m, o) in means.items():
        lines.append(f"| {label} | {n} | {', '.join(names)} | {m['bm25']:.3f} | {m['dense']:.3f} | "
                     f"{m['dense'] / m['bm25']:.2f} | {m['hybrid']:.3f} | {m['hybrid'] / m['bm25']:.2f} | "
                     f"{m['dense'] - o:+.3f} |")
    # Per collection, the mean over seeds of the old and the default recipe (mix): what issue 21 asks.
    seeds = sorted({r["seed"] for r in rows if r["recipe"] == "mix"})
    if "mix" in means and len(seeds) > 1:
        lines += ["", "Per collection, mean over the seeds run with both (" + ", ".join(map(str, seeds)) + "):", "",
                  "| collection | seeds | BM25 | old dense | default dense | dense gain | default hybrid | hybrid / BM25 |",
                  "|---|---|---|---|---|---|---|---|"]
        gains = []
        for name in sorted({r["dataset"] for r in rows if r["recipe"] == "mix"}):
            pair = [(o, m) for o in rows for m in rows if o["recipe"] == "old" and m["recipe"] == "mix"
                    and o["dataset"] == m["dataset"] == name and o["seed"] == m["seed"]]
            if not pair:
                continue
            mean = lambda xs: float(np.mean(xs))  # noqa: E731
            od, md = mean([o["eval"]["dense"]["ndcg@10"] for o, _ in pair]), mean([m["eval"]["dense"]["ndcg@10"] for _, m in pair])
            bm, hy = mean([m["eval"]["bm25"]["ndcg@10"] for _, m in pair]), mean([m["eval"]["hybrid"]["ndcg@10"] for _, m in pair])
            gains.append(md - od)
            lines.append(f"| {name} | {', '.join(str(m['seed']) for _, m in pair)} | {bm:.3f} | {od:.3f} | {md:.3f} | "
                         f"{md - od:+.3f} | {hy:.3f} | {hy / bm:.2f} |")
        lines += ["", f"Mean dense gain of the defaults over the old recipe, per collection then averaged: "
                      f"**{np.mean(gains):+.3f}** nDCG@10 ({len(gains)} collections)."]
    own = [r for r in rows if r["recipe"] != "old" and not r.get("adapt_shared_from")]
    if own:
        lines += ["", "Ran their own adaptation (same settings and seed; the old run's directory was not there to "
                      "share, e.g. after a machine restart): " + ", ".join(f"{r['recipe']} {r['dataset']} seed {r['seed']}"
                                                                           for r in own) + "."]
    # Wall time of the default recipe on a 3,000-document corpus: adaptation, mining and fine-tuning do not
    # depend on the corpus's size (fixed steps of fixed length), the index grows with it.
    label = "mix" if "mix" in means else "new"
    for where in dict.fromkeys(r.get("machine", "?") for r in rows):
        new = [r for r in rows if r["recipe"] == label and r["docs"] >= 500 and r.get("machine", "?") == where]
        adapt = [r["stages"]["adapt"] for r in rows if r["recipe"] == "old" and r.get("machine", "?") == where]
        if not new or not adapt:
            continue
        per_doc = [r["stages"]["index"] / r["docs"] for r in new]
        tune = np.median([r["stages"].get("mine", 0) + r["stages"]["finetune"] for r in new])
        total = np.median(adapt) + tune + 3000 * np.median(per_doc)
        lines += ["", f"The default recipe (all 128 steps) on a 3,000-document corpus on {where}, from these runs' "
                      f"stage times (medians of {len(new)} + {len(adapt)} runs): adaptation {np.median(adapt):.0f} s + "
                      f"pairs and fine-tuning {tune:.0f} s + index 3,000 x {np.median(per_doc):.3f} s = "
                      f"**{total / 60:.1f} minutes**" + (" (the budget is 30)." if total <= 1800 else
                                                         " (over the 30-minute budget: the default cap runs fewer "
                                                         "fine-tuning steps on this machine).")]
    lines += ["", "```bash", ".venv/bin/python benchmarks/recipe.py --stage compare --compare-datasets "
              f"{' '.join(args.compare_datasets)} --compare-seeds {' '.join(map(str, args.compare_seeds))} "
              f"--compare-recipes {' '.join(args.compare_recipes)}"
              + (f" --compare-mix {args.compare_mix}" if "mix" in args.compare_recipes else "")
              + "".join(f" --compare-extra={x}" for x in args.compare_extra), "```", ""]
    (RESULTS / "recipe_compare.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "run", "user", "long", "report", "compare"], default="all")
    p.add_argument("--compare-datasets", nargs="+", default=["med", "cisi", "cranfield", "adi"])
    p.add_argument("--compare-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--compare-recipes", nargs="+", default=["old", "mix"], choices=["old", "new", "mix"],
                   help="--stage compare: old (OLD_DEFAULTS), new (128 steps, --pairs squad), mix (128 steps, "
                        "--pairs --compare-mix, title dropped on a corpus without titles: the defaults)")
    p.add_argument("--compare-mix", default="squad:1,title:1,ict:1")
    p.add_argument("--compare-extra", action="append", default=[],
                   help="--stage compare: one more `llara recipe` argument for the new recipe's runs "
                        "(repeatable), e.g. --compare-extra=--finetune-steps=64")
    p.add_argument("--long-length", type=int, default=256, help="passage length of --stage long")
    p.add_argument("--long-baseline", action="store_true", help="--stage long: the baseline too")
    p.add_argument("--user-dataset", default="cisi", help="the dev collection whose corpus --stage user runs on")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=lambda v: variant(v) and v,
                   help=f"variants, or '+'-joined combinations of them: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the runs (the baseline of the same seed is compared)")
    lc.add_train_args(p)
    lc.add_eval_args(p)
    args = p.parse_args(argv)
    if args.stage in ("all", "run"):
        run_variants(args)
    if args.stage == "user":
        user_run(args)
    if args.stage == "compare":
        compare(args)
    if args.stage == "long":
        long_eval(args)
    if args.stage in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
