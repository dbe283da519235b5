"""``Encoder.encode`` with and without ``llara.modeling.read_rows``, alternating in one process.

What `docs/gpu.md` reports as "71.6 s against 75.5 s" came from this script: 256 demo passages,
batch 32, fp32 on the CPU, the Encoder's batches with their ``read`` / ``live`` positions against
the same batches computed at every position (the first pair of calls also checks the vectors).

    .venv/bin/python benchmarks/read_rows_encode.py 4
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import llara.modeling.encoder as encmod
from llara.io import iter_jsonl, passage_text
from llara.modeling.encoder import Encoder
from llara.modeling.loading import load_model

DEMO = Path(__file__).resolve().parents[1] / "src" / "llara" / "data" / "demo" / "med" / "corpus.jsonl"
model, tok, _ = load_model("default", causal_lm=False)
texts = [passage_text(doc) for _, doc in iter_jsonl(DEMO)][:256]
enc = Encoder(model, tok, "llara", batch_size=32, max_passage_length=256, show_progress=False)
orig = encmod.hidden_states


def whole(model, ids, mask=None, position_ids=None, read=None, live=None):
    return orig(model, ids, mask, position_ids)


def use(v):
    encmod.hidden_states = orig if v == "sliced" else whole


use("whole")
a = enc.encode(texts, "passage")
use("sliced")
b = enc.encode(texts, "passage")
print("max |diff|", float(np.abs(np.asarray(a) - np.asarray(b)).max()), "padded tokens", enc.last_stats.padded_tokens)
times = {"whole": [], "sliced": []}
for i in range(int(sys.argv[1])):
    for v in (["whole", "sliced"] if i % 2 else ["sliced", "whole"]):
        use(v)
        t = time.perf_counter()
        enc.encode(texts, "passage")
        times[v].append(time.perf_counter() - t)
for v, ts in times.items():
    print(v, "median %.2f" % statistics.median(ts), " ".join("%.2f" % t for t in ts))
print("whole/sliced %.3f" % statistics.median([a / c for a, c in zip(times["whole"], times["sliced"])]))
