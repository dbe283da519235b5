"""The recipe's LoRA step with and without ``llara.modeling.read_rows``, alternating in one process.

What `benchmarks/results/cpu_train_fp32.md` reports as "7.51 against 7.80 s (3.7%)" (argument
``sliced``) and the cost rule's 0.3-1.2% (``cost``) came from this script (two scripts then, one now): one packed batch
of the recipe's step (8 queries x 2 passages of 96 tokens from the groups ``benchmarks/cpu_train.py``
writes to /tmp/llara-cpu-train/train.jsonl), forward + backward of ``embed`` with LoRA r 64, the
first pair dropped. ``sliced``: the batch with and without its ``read`` / ``live`` positions;
``cost``: both sliced, ``read_rows.COPY_COST`` 0 (every module) against the shipped value.

    .venv/bin/python benchmarks/read_rows_step.py 9 0.1 sliced
    .venv/bin/python benchmarks/read_rows_step.py 9 0.1 cost
"""
import statistics
import sys
import time

import torch

import llara.modeling.read_rows as rr
from llara.modeling.embed import embed
from llara.modeling.host_memory import keep_freed_memory
from llara.modeling.loading import ensure_slot_tokens, load_model
from llara.prompts import get_template
from llara.training.contrastive import ContrastiveCollator, load_groups
from llara.training.lora import apply_lora

pairs, dropout, compare = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "sliced"
shipped_cost = rr.COPY_COST
keep_freed_memory()
model, tok, _ = load_model("default", causal_lm=False)
ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
pm = apply_lora(model, r=64, alpha=16, dropout=dropout, trainable_token_ids=list(range(100, 116))).train()
gs = load_groups("/tmp/llara-cpu-train/train.jsonl", group_size=2)
col = ContrastiveCollator(tok, "llara", group_size=2, max_passage_length=96, packing=True)
full = col(gs[0:8])["passes"][0]
whole = {k: v for k, v in full.items() if k not in ("read", "live")}
print("positions", full["input_ids"].numel(), "live", full["live"].numel(), "read", full["read"].numel())


def step(b, seed=1):
    torch.manual_seed(seed)
    e = embed(pm, b)
    (e[:8] @ e[8:].T).sum().backward()
    g = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad(set_to_none=True)
    return e.detach(), g


def run(v):
    if compare == "cost":
        rr.COPY_COST = 0 if v == "whole" else shipped_cost
        return step(full)
    return step(whole if v == "whole" else full)


if dropout == 0:
    (e1, g1), (e2, g2) = step(whole), step(full)
    print("max emb diff", (e1 - e2).abs().max().item(), "max grad rel diff",
          max(((g1[k] - g2[k]).norm() / g1[k].norm().clamp_min(1e-30)).item() for k in g1))
times = {"whole": [], "sliced": []}
for i in range(pairs):
    for v in (["whole", "sliced"] if i % 2 else ["sliced", "whole"]):
        t = time.perf_counter()
        run(v)
        dt = time.perf_counter() - t
        if i >= 1:
            times[v].append(dt)
for v, ts in times.items():
    print(v, "median %.3f" % statistics.median(ts), " ".join("%.2f" % t for t in ts))
print("whole/sliced %.3f" % statistics.median([a / c for a, c in zip(times["whole"], times["sliced"])]))
