"""What sequence packing gains in `llara finetune`: tokens/s and positions computed, packed (the default)
against one right-padded row per text (``--no-packing``), on two kinds of text from ``../shared/data``:

* ``sentences``: Wikipedia sentence -> next sentence (``wiki_vital/passages.jsonl``), short texts of
  very different lengths (the case packing is for);
* ``paragraphs``: SQuAD question -> its paragraph (``squad_pairs/train.jsonl``), passages mostly longer
  than the 160-token default, so nearly every row is full either way.

Each line is one pair plus ``--group-size - 1`` negatives drawn at random from the other pairs' passages
(seeded; the speed does not depend on how hard they are). Every run is its own process (peak RSS is its
own), ``llara finetune --model default`` with its defaults but for the batch shape given and
``--grad-cache-chunk 0`` (one plain step: the comparison of two layouts, not of the memory plan), the
runs of one kind interleaved packed / unpadded. Positions per step are counted from the collator's
batches (the same sampler and seed as the runs).

    python benchmarks/packing.py --out benchmarks/results/packing.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def pairs(kind: str, n: int) -> list[tuple[str, str]]:
    if kind == "sentences":
        rows = [json.loads(x) for x in (DATA / "wiki_vital" / "passages.jsonl").open()]
        out = [(a["text"], b["text"]) for a, b in zip(rows, rows[1:]) if a.get("doc") == b.get("doc")]
    else:
        out = [(r["query"], r["pos"][0]) for r in map(json.loads, (DATA / "squad_pairs" / "train.jsonl").open())]
    return random.Random(0).sample(out, n)


def write_groups(path: Path, kind: str, n: int, group: int) -> None:
    ps = pairs(kind, n)
    rng = random.Random(1)
    pool = [p for _, p in ps]
    lines = [{"query": q, "pos": [p], "neg": rng.sample([x for x in pool if x != p], group - 1)} for q, p in ps]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def positions(path: Path, batch: int, group: int, steps: int, max_passage: int) -> dict:
    """Real tokens and computed positions of the first ``steps`` batches, padded and packed."""
    from llara.modeling.loading import load_tokenizer, resolve_model
    from llara.prompts import get_template
    from llara.training.contrastive import ContrastiveCollator, UniquePositiveBatches, load_groups

    tok = load_tokenizer(resolve_model("default").path)
    tok.add_special_tokens({"additional_special_tokens": list(get_template("llara").slot_tokens)})
    groups = load_groups(path, group)
    kw = dict(group_size=group, max_passage_length=max_passage)
    padded, packed = ContrastiveCollator(tok, "llara", **kw), ContrastiveCollator(tok, "llara", packing=True, **kw)
    out = {"tokens": 0, "padded_positions": 0, "packed_positions": 0}
    for step, idx in enumerate(UniquePositiveBatches(groups, batch, seed=0)):
        if step == steps:
            break
        gs = [groups[i] for i in idx]
        a, b = padded(gs), packed(gs)
        out["padded_positions"] += a["query"]["input_ids"].numel() + a["passage"]["input_ids"].numel()
        out["packed_positions"] += sum(p["input_ids"].numel() for p in b["passes"])
        out["tokens"] += int(b["num_tokens"])
    out["padded_fill"] = round(out["tokens"] / out["padded_positions"], 3)
    out["packed_fill"] = round(out["tokens"] / out["packed_positions"], 3)
    return out


def run(path: Path, work: Path, args, packed: bool) -> dict:
    out = work / ("packed" if packed else "padded")
    subprocess.run(["rm", "-rf", str(out)])
    argv = ["finetune", "--model", "default", "--data", str(path), "--output", str(out), "--batch-size", str(args.batch),
            "--group-size", str(args.group), "--max-passage-length", str(args.max_passage_length),
            "--grad-cache-chunk", "0", "--max-steps", str(args.steps), "--save-every", "0", "--no-export",
            "--no-progress", "--seed", "0", "--packing" if packed else "--no-packing"]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llara.cli", *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {"command": "llara " + " ".join(argv), "seconds": round(time.perf_counter() - t, 1),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows[1:]), 1),
            "tokens_per_s_by_step": [r["tokens_per_s"] for r in rows], "peak_memory_gb": rows[-1]["peak_memory_gb"],
            "loss_by_step": [round(r["loss"], 4) for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing.json"))
    p.add_argument("--work", default="/tmp/llara-packing")
    p.add_argument("--kinds", default="sentences,paragraphs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-passage-length", type=int, default=160)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="interleaved packed / padded pairs of runs per kind")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "kinds": {}}
    for kind in args.kinds.split(","):
        path = work / f"{kind}.jsonl"
        write_groups(path, kind, args.pairs, args.group)
        sec = {"positions": positions(path, args.batch, args.group, args.steps, args.max_passage_length), "runs": []}
        for _ in range(args.repeats):
            sec["runs"].append({"packed": run(path, work / kind, args, True), "padded": run(path, work / kind, args, False)})
            result["kinds"][kind] = sec
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        speed = [r["packed"]["tokens_per_s"] / r["padded"]["tokens_per_s"] for r in sec["runs"]]
        sec["speedup_by_pair"] = [round(x, 3) for x in speed]
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
