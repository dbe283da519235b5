"""fp32 vs bf16 on this CPU (issue 10): encoding speed, retrieval quality, training-step speed and memory.

Stages (each resumable: finished rows are kept in benchmarks/results/precision.json):

* ``encode``: ``Encoder.encode`` tokens/s in each precision against the model's own forward pass
  in that precision (``EncodeStats.model_seconds``: the limit), over the same 240 real passages
  (60 per dev collection, 128 tokens with the authors' SELF prompt), batch 32, best of N interleaved.
* ``quality``: nDCG@10 / Recall@100 of the same models on the four dev collections (the subsampled
  corpora and 96-token passages of benchmarks/adaptation.py) encoded in fp32 and in bf16.
* ``step``: one adaptation step (the demo's: 8 MED pairs of 96-token chunks, joint SELF+NEXT pass,
  EBAE + EBAR + LM loss, full fine-tuning, fused AdamW) timed forward / backward / optimizer, fp32 and
  bf16 autocast interleaved in one process, so that both see the same load on the machine.
* ``train``: ``llara pretrain`` (joint SELF+NEXT pass, EBAE + EBAR + LM loss, 8 pairs of 96-token
  chunks) and ``llara finetune`` (8 queries x (1 positive + 1 BM25 hard negative), GradCache off)
  for a few steps with ``--precision fp32`` and ``bf16``: median tokens/s over the steps after the
  first two, peak resident memory of the process, and the losses of both runs.

Reproduce (from the repository root, after the README's set-up; about 25 min on 2 CPU cores):

    .venv/bin/python benchmarks/precision.py                       # every stage
    .venv/bin/python benchmarks/precision.py --stage train         # one stage: encode, quality, train, report
    .venv/bin/python benchmarks/precision.py --stage quality --templates llara \
        --finetuned runs/bench/finetune/adapted_ft/final       # + the model benchmarks/hybrid.py fine-tuned

Writes benchmarks/results/precision.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adaptation import datasets, load_rows, save_rows
from zero_shot import DATA, RESULTS, ROOT, machine

from llara.data.beir import load_beir
from llara.io import passage_text, write_text
from llara.evaluation.runner import evaluate_dense
from llara.modeling.encoder import Encoder
from llara.io import cache_root
from llara.modeling.precision import cpu_bf16_speedup, training_kernels

OUT = RESULTS / "precision.json"
RUNS = ROOT / "runs" / "bench" / "precision"
LLARA = str(ROOT / ".venv" / "bin" / "llara")
DTYPES = ("float32", "bfloat16")
DEV = ("scifact", "cranfield", "med", "cisi")


def _store(kind: str, key: str, row: dict) -> None:
    rows = [r for r in load_rows(OUT) if not (r["kind"] == kind and r["key"] == key)]
    save_rows(OUT, rows + [{"kind": kind, "key": key, **row}])


def _done(kind: str, key: str) -> bool:
    return any(r["kind"] == kind and r["key"] == key for r in load_rows(OUT))


# --------------------------------------------------------------------------- encode speed
def encode_speed(args) -> None:
    if _done("encode", "speed") and not args.force:
        return
    rng = random.Random(0)
    texts = []
    for name in DEV:
        docs = list(load_beir(DATA / name, split="test").corpus.values())
        texts += [passage_text(d) for d in rng.sample(docs, min(60, len(docs)))]
    rng.shuffle(texts)
    encoders = {dt: Encoder.from_pretrained("default", template="llara", device="cpu", dtype=dt, show_progress=False,
                                            max_passage_length=128, batch_size=32) for dt in DTYPES}
    for enc in encoders.values():
        enc.encode(texts[:32], "passage")  # warm-up
    runs = {dt: {"encoder": [], "forward": []} for dt in DTYPES}
    for _ in range(args.repeats):  # interleaved: both precisions see the same load on the machine
        for dt, enc in encoders.items():
            enc.encode(texts, "passage")
            s = enc.last_stats
            runs[dt]["encoder"].append(s.tokens / s.seconds)
            runs[dt]["forward"].append(s.tokens / s.model_seconds)
            print(f"{dt}: encoder {runs[dt]['encoder'][-1]:.0f} tok/s, forward {runs[dt]['forward'][-1]:.0f}", flush=True)
    row = {"texts": len(texts), "tokens": encoders["float32"].last_stats.tokens, "runs": runs,
           "best": {dt: {k: max(v) for k, v in r.items()} for dt, r in runs.items()},
           "median": {dt: {k: statistics.median(v) for k, v in r.items()} for dt, r in runs.items()},
           "probe_speedup": cpu_bf16_speedup(), "load_average": os.getloadavg(), "machine": machine()}
    _store("encode", "speed", row)


# --------------------------------------------------------------------------- quality
def quality(args) -> None:
    models = {"untrained": ("default", list(args.templates))}
    if args.adapted:
        models["adapted"] = (args.adapted, ["llara"])
    if args.finetuned:
        models[args.finetuned_label] = (args.finetuned, ["llara"])
    sets = None
    for label, (spec, templates) in models.items():
        for mode in args.modes:
            todo = [t for t in templates for name in args.datasets if not _done("quality", f"{label}:{t}:{mode}:{name}")]
            if not todo:
                continue
            sets = sets or list(datasets(args))
            enc = Encoder.from_pretrained(spec, template=templates[0], device="cpu", dtype=mode, batch_size=32,
                                          max_query_length=64, max_passage_length=args.max_passage_length,
                                          cache_dir=cache_root() / "embeddings", show_progress=False)
            for ds in sets:
                if all(_done("quality", f"{label}:{t}:{mode}:{ds.name}") for t in templates):
                    continue
                for r, _ in evaluate_dense(ds, enc, templates):
                    key = f"{label}:{r.template}:{mode}:{ds.name}"
                    _store("quality", key, {"model": label, "template": r.template, "dtype": mode, "dataset": ds.name,
                                            "metrics": r.metrics, "seconds": r.seconds, "num_docs": r.num_docs})
                    print(f"{key} nDCG@10={r.metrics['ndcg@10']:.4f} ({r.seconds:.0f}s)", flush=True)


# --------------------------------------------------------------------------- training steps
def _train_run(kind: str, precision: str, args) -> dict:
    out = RUNS / f"{kind}-{precision}"
    if out.exists():
        shutil.rmtree(out)
    common = ["--model", "default", "--output", str(out), "--max-steps", str(args.train_steps), "--batch-size", "8",
              "--precision", precision, "--seed", "0", "--no-progress", "--no-export", "--save-every", "0"]
    if kind == "pretrain":
        cmd = [LLARA, "pretrain", "--data", str(DATA / "med" / "corpus.jsonl"), "--chunk-tokens", "96",
               "--lr", "5e-5", *common]
    else:
        cmd = [LLARA, "finetune", "--data", str(_finetune_data()), "--group-size", "2", "--lr", "1e-4",
               "--max-passage-length", "96", *common]
    print("$", " ".join(cmd), flush=True)
    # Each run in a fresh process, alone, so that its peak RSS is its own (ru_maxrss of the child).
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
    peak_mib = int(res.stdout.strip().splitlines()[-1]) / 1024
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if "tokens_per_s" in r and r["step"] > 2]
    tok_s = []
    for prev, cur in zip(log, log[1:]):
        if cur["step"] > 2:
            tok_s.append((cur["tokens"] - prev["tokens"]) / (cur["elapsed_s"] - prev["elapsed_s"]))
    return {"kind": kind, "precision": precision, "steps": len(log), "tokens_per_s": statistics.median(tok_s),
            "seconds_per_step": statistics.median(
                [c["elapsed_s"] - p["elapsed_s"] for p, c in zip(log, log[1:]) if c["step"] > 2]),
            "peak_rss_mib": peak_mib, "losses": [round(r["loss"], 4) for r in log], "measured_steps": len(steps),
            "command": " ".join(c.replace(str(ROOT) + "/", "") for c in cmd)}


def _finetune_data() -> Path:
    path = RUNS / "scifact_train.jsonl"
    if not path.is_file():
        RUNS.mkdir(parents=True, exist_ok=True)
        sf = DATA / "scifact"
        subprocess.run([LLARA, "mine", "--method", "bm25", "--corpus", str(sf / "corpus.jsonl"), "--queries",
                        str(sf / "queries.jsonl"), "--qrels", str(sf / "qrels" / "train.tsv"), "--negatives", "1",
                        "--output", str(path)], check=True)
    return path


def train_speed(args) -> None:
    for kind in ("pretrain", "finetune"):
        for precision in ("fp32", "bf16"):
            key = f"{kind}:{precision}"
            if _done("train", key) and not args.force:
                continue
            row = _train_run(kind, precision, args)
            print(f"{key}: {row['tokens_per_s']:.0f} tok/s, {row['seconds_per_step']:.2f} s/step, "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
            _store("train", key, row)


def _adaptation_step_setup(args):
    """The demo's adaptation step: fp32 model, one batch of 8 MED pairs, the loss, fused AdamW."""
    from itertools import islice

    from torch.utils.data import DataLoader

    from llara.data.collator import PretrainCollator
    from llara.data.pretrain import PretrainDataConfig, PretrainDataset
    from llara.modeling.loading import ensure_slot_tokens, load_model
    from llara.prompts import get_template
    from llara.training.pretrain import PretrainLossConfig, make_loss_fn

    model, tok, _ = load_model("default", causal_lm=True, device="cpu", dtype="float32")
    template = get_template("llara")
    ensure_slot_tokens(tok, model, template.slot_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = PretrainCollator(tok, template, vocab_size=vocab)
    collate = PretrainCollator(tok, template, max_length=96 + probe.prompt_tokens, keep=probe.keep, vocab_size=vocab)
    data = PretrainDataset([str(DATA / "med" / "corpus.jsonl")], tok, PretrainDataConfig(chunk_tokens=96))
    batch = next(islice(iter(DataLoader(data, batch_size=8, collate_fn=collate)), 1))
    loss_fn = make_loss_fn(PretrainLossConfig())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    model.train()
    return model, batch, loss_fn, opt


def _one_step(model, batch, loss_fn, opt, precision: str) -> dict:
    """One step as the training loop runs it: autocast in bf16, with the attention kernel that
    ``training_kernels`` picks for this CPU."""
    t0 = time.perf_counter()
    with training_kernels(precision, on_cpu=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = loss_fn(model, batch)
        t1 = time.perf_counter()
        out["loss"].backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0,
            "loss": out["loss"].item()}


def step_split(args) -> None:
    if _done("step", "split") and not args.force:
        return
    model, batch, loss_fn, opt = _adaptation_step_setup(args)
    times = {"fp32": [], "bf16": []}
    for precision in ["fp32", "bf16"] * args.repeats:
        times[precision].append(_one_step(model, batch, loss_fn, opt, precision))
        print(precision, {k: round(v, 2) for k, v in times[precision][-1].items()}, flush=True)
    _store("step", "split", {"tokens": int(batch["num_tokens"]), "times": times, "load_average": os.getloadavg(),
                             "machine": machine()})


def step_profile(args) -> None:
    """Where the step's time goes: torch.profiler over one step per precision (after a warm-up
    step each), operators ranked by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    if _done("profile", "step") and not args.force:
        return
    model, batch, loss_fn, opt = _adaptation_step_setup(args)
    result = {}
    for precision in ("fp32", "bf16"):
        _one_step(model, batch, loss_fn, opt, precision)  # warm-up: oneDNN primitives, allocator
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = _one_step(model, batch, loss_fn, opt, precision)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        result[precision] = {"step_s": t["total"], "ops": [
            {"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total} for e in ops[:args.profile_top]]}
        print(precision, round(t["total"], 2), "s", flush=True)
        for o in result[precision]["ops"]:
            print(f"  {o['op']:45s} {o['calls']:6d} {o['self_s']:7.3f} s {100 * o['share']:5.1f}%", flush=True)
    _store("profile", "step", {"tokens": int(batch["num_tokens"]), **result, "load_average": os.getloadavg()})


# --------------------------------------------------------------------------- report
def report(args) -> None:
    rows = load_rows(OUT)
    lines = ["# fp32 vs bf16 on this CPU", "",
             f"Machine: {machine()}; oneDNN bf16 probe (1024-cube matmul): bf16 "
             f"{cpu_bf16_speedup():.2f}x fp32. `--dtype auto` / `--precision auto` pick bf16 here.", ""]
    enc = next((r for r in rows if r["kind"] == "encode"), None)
    if enc:
        b, m = enc["best"], enc["median"]
        lines += ["## Encoding speed", "",
                  f"{enc['texts']} real passages (60 per dev collection, <= 128 tokens with the SELF prompt, "
                  f"{enc['tokens']} tokens), batch 32, best / median of {len(enc['runs']['float32']['encoder'])} "
                  "interleaved runs. The limit is the model's forward pass in the same precision. "
                  f"Load average when measured: {', '.join(f'{x:.1f}' for x in enc.get('load_average', []))} "
                  "(other jobs shared the 2 cores: absolute rates are below an idle machine's; the ratio is "
                  "what interleaving keeps fair).", "",
                  "| precision | `Encoder.encode` tokens/s | forward pass tokens/s (limit) | encoder / limit |",
                  "|---|---|---|---|"]
        for dt in DTYPES:
            lines.append(f"| {dt} | {b[dt]['encoder']:.0f} / {m[dt]['encoder']:.0f} | "
                         f"{b[dt]['forward']:.0f} / {m[dt]['forward']:.0f} | "
                         f"{100 * b[dt]['encoder'] / b[dt]['forward']:.0f}% |")
        lines += ["", f"bf16 encodes **{b['bfloat16']['encoder'] / b['float32']['encoder']:.2f}x** faster than fp32 "
                  f"(best of each; medians {m['bfloat16']['encoder'] / m['float32']['encoder']:.2f}x).", ""]
    q = [r for r in rows if r["kind"] == "quality"]
    if q:
        lines += ["## Retrieval quality (nDCG@10)", "",
                  "Subsampled corpora and 96-token passages of benchmarks/adaptation.py; queries 64 tokens. "
                  "untrained: the embedded model as shipped (its slot embeddings are near-random rankings, so small "
                  "perturbations reorder them); adapted_ft: the adapted + fine-tuned model of benchmarks/hybrid.py, "
                  "the kind of model one deploys. The bound of the issue: 0.01 per collection, 0.005 on average.", "",
                  "| model:template | " + " | ".join(f"{d} fp32 / bf16 (diff)" for d in DEV) + " | average diff |",
                  "|---|" + "---|" * (len(DEV) + 1)]
        for label in dict.fromkeys(f"{r['model']}:{r['template']}" for r in q):
            get = {(r["dtype"], r["dataset"]): r["metrics"]["ndcg@10"] for r in q
                   if f"{r['model']}:{r['template']}" == label}
            cells, diffs = [], []
            for d in DEV:
                if ("float32", d) in get and ("bfloat16", d) in get:
                    a, c = get[("float32", d)], get[("bfloat16", d)]
                    diffs.append(c - a)
                    cells.append(f"{a:.3f} / {c:.3f} ({c - a:+.3f})")
                else:
                    cells.append("-")
            avg = f"{statistics.mean(diffs):+.4f}" if diffs else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
        lines.append("")
    trained = {"adapted_ft_trained_fp32": "fp32", "adapted_ft": "bf16 autocast, LoRA base cast to bf16 (before)",
               "adapted_ft_bf16_fp32base": "bf16 autocast, LoRA base kept fp32 (now on CPUs)"}
    tq = {(r["model"], r["dataset"]): r["metrics"]["ndcg@10"] for r in q if r["dtype"] == "bfloat16"}
    if any((label, d) in tq for label in trained for d in DEV if label != "adapted_ft"):
        speed = {r["key"]: r for r in rows if r["kind"] == "ft_speed"}
        lines += ["## Training precision: the same fine-tuning in fp32 and bf16", "",
                  "The adapted start of benchmarks/hybrid.py fine-tuned as benchmarks/finetune.py does (LoRA r 64, "
                  "24 steps of 8 queries x 2 passages, seed 0, same data), once per training precision; every model "
                  "encoded in bf16. tokens/s: median training speed over steps 3-24 (runs alone on the machine, "
                  "except the bf16-base run, which shared it). Each: `llara finetune --model runs/bench/adapted50 "
                  "--data runs/bench/finetune/train.jsonl --max-steps 24 --batch-size 8 --group-size 2 --lr 0.0003 "
                  "--warmup-ratio 0.1 --lora --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --temperature 0.01 "
                  "--max-query-length 64 --max-passage-length 96 --seed 0 --precision fp32|bf16 --output DIR`, then "
                  "`benchmarks/precision.py --stage quality --templates llara --finetuned DIR/final "
                  "--finetuned-label LABEL --modes bfloat16`.", "",
                  "| training precision | " + " | ".join(DEV) + " | average | tokens/s |", "|---|" + "---|" * (len(DEV) + 2)]
        for label, name in trained.items():
            vals = [tq.get((label, d)) for d in DEV]
            if None in vals:
                continue
            sp = speed.get(label, {}).get("tokens_per_s")
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) +
                         f" | {statistics.mean(vals):.3f} | {'-' if sp is None else f'{sp:.0f}'} |")
        lines.append("")
    st = next((r for r in rows if r["kind"] == "step"), None)
    if st:
        med = {p: {k: statistics.median(x[k] for x in v) for k in ("forward", "backward", "optimizer", "total")}
               for p, v in st["times"].items()}
        lines += ["## One adaptation step, split", "",
                  f"The demo's step ({st['tokens']} tokens: 8 pairs of 96-token MED chunks, joint pass, EBAE + EBAR + "
                  "LM loss, full fine-tuning, fused AdamW), fp32 and bf16 autocast interleaved in one process, "
                  f"median of {len(st['times']['fp32'])} each; load average "
                  f"{', '.join(f'{x:.1f}' for x in st['load_average'])} (1, 5, 15 min) when it ended.", "",
                  "| precision | forward s | backward s | optimizer s | step s | tokens/s |", "|---|---|---|---|---|---|"]
        for p, m in med.items():
            lines.append(f"| {p} | {m['forward']:.2f} | {m['backward']:.2f} | {m['optimizer']:.2f} | {m['total']:.2f} | "
                         f"{st['tokens'] / m['total']:.0f} |")
        lines += ["", f"bf16 step **{med['fp32']['total'] / med['bf16']['total']:.2f}x** faster than fp32.", ""]
    pr = next((r for r in rows if r["kind"] == "profile"), None)
    if pr:
        lines += ["## Where the step's time goes", "",
                  "torch.profiler over one step of each precision (the step above, after a warm-up step), operators "
                  "by their own CPU time; the step as the training loop runs it (`training_kernels`: math attention "
                  "in bf16 on this CPU). Matrix products (`aten::mm`, and `aten::bmm` in the math attention) gain "
                  "what the bf16 units give; the casts of autocast (`aten::copy_`: fp32 weights to bf16 in the "
                  "forward, bf16 gradients to fp32 in the backward) and the fp32 log-softmax over the vocabulary "
                  "gain nothing, so the step cannot gain more than its products do.", "",
                  "| operator | fp32 s | bf16 s | fp32 / bf16 |", "|---|---:|---:|---:|"]
        by = {p_: {o["op"]: o["self_s"] for o in pr[p_]["ops"]} for p_ in ("fp32", "bf16")}
        for op in list(dict.fromkeys([*by["bf16"], *by["fp32"]]))[:12]:
            a, b = by["fp32"].get(op), by["bf16"].get(op)
            ratio = f"{a / b:.2f}x" if a and b else "-"
            lines.append(f"| `{op}` | {'-' if a is None else round(a, 3)} | {'-' if b is None else round(b, 3)} | {ratio} |")
        lines += ["", f"Step: fp32 {pr['fp32']['step_s']:.2f} s, bf16 {pr['bf16']['step_s']:.2f} s (profiled, so a little "
                  "slower than unprofiled).", ""]
    t = {r["key"]: r for r in rows if r["kind"] == "train"}
    if t:
        lines += ["## Training steps", "",
                  "8 examples per step, median over steps 3 onwards; peak resident memory of the whole process.", "",
                  "| command | precision | tokens/s | s/step | peak RSS MiB | losses |", "|---|---|---|---|---|---|"]
        for key, r in t.items():
            lines.append(f"| {r['kind']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | "
                         f"{r['peak_rss_mib']:.0f} | {', '.join(f'{x:.3f}' for x in r['losses'])} |")
        for kind in ("pretrain", "finetune"):
            if f"{kind}:fp32" in t and f"{kind}:bf16" in t:
                lines.append(f"\n{kind}: bf16 step **{t[f'{kind}:bf16']['tokens_per_s'] / t[f'{kind}:fp32']['tokens_per_s']:.2f}x** "
                             "the fp32 step's tokens/s.")
        lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in t.values()), ""]
    lines += ["Reproduce: `.venv/bin/python benchmarks/precision.py` (stages: encode, quality, step, profile, train, report; each timing stage ran under `benchmarks/freeze.sh`, which stops the machine's other, niced jobs meanwhile).", ""]
    write_text(RESULTS / "precision.md", "\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["all", "encode", "quality", "step", "profile", "train", "report"], default="all")
    p.add_argument("--adapted", default=None, help="an adapted checkpoint to compare too (llara pretrain's final/)")
    p.add_argument("--finetuned", default=None, help="a fine-tuned checkpoint to compare too (llara finetune's final/)")
    p.add_argument("--finetuned-label", default="adapted_ft", help="its row label")
    p.add_argument("--modes", nargs="+", default=list(DTYPES), choices=DTYPES, help="precisions of the quality stage")
    p.add_argument("--datasets", nargs="+", default=list(DEV))
    p.add_argument("--templates", nargs="+", default=["llara", "mean"], help="templates of the untrained model")
    p.add_argument("--max-docs", type=int, default=800, help="as benchmarks/adaptation.py")
    p.add_argument("--max-passage-length", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--profile-top", type=int, default=15, help="operators kept per precision by --stage profile")
    p.add_argument("--force", action="store_true", help="measure again rows that exist")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = {"encode": encode_speed, "quality": quality, "step": step_split, "profile": step_profile,
              "train": train_speed, "report": report}
    for name, run in stages.items():
        if args.stage in ("all", name):
            run(args)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
