"""CPU training at the hardware's limit: training steps against the matmul limit, in one run, and
the peak resident memory of ``llara finetune`` with its defaults.

1. ``matmul``: GFLOP/s of a 2048-cube matmul in bf16 and fp32 (best of 5), measured before and after
   the training runs; the better of the two in the precision llara trains in on this CPU (bf16 where
   it is faster, else fp32: ``limit_precision``) is the limit (bf16 is not timed on a CPU without bf16
   kernels); ratios against the mean of the two are kept beside.
   Then ``model_shapes``: the same in that precision at this model's own product shapes (its projections, and the
   LM head for pretraining, forward and activation gradient, at a micro-batch's rows): the ceiling its
   matmuls can reach here, which the step's ratio is also given against.
2. ``pretrain``: ``llara pretrain`` (full fine-tuning, precision auto) on the embedded model:
   median tokens/s after the first step; ratio = 6 x parameters x tokens/s / the matmul limit.
3. ``finetune``: ``llara finetune`` (LoRA, its defaults but for the batch shape given: by default the
   step of ``llara recipe``, 8 queries x 2 passages of 96 tokens) on BM25-mined groups of the shipped
   demo corpus, as the memory plan runs it (whole, or GradCache chunks where the whole step would not
   fit the memory budget: in fp32 on a CPU it does not), then ``finetune_plain``: the same step whole
   (``--grad-cache-chunk 0 --gradient-checkpointing false``), ``finetune_plain_no_dropout``: that step without the adapters'
   dropout (``--lora-dropout 0``: what the masks cost), and ``finetune_plain_unpacked``: that step with one
   right-padded row per text (``--no-packing``: what packing gains; the default packs texts into shared rows). Ratio = 4 x parameters x tokens/s / the limit (frozen base: forward and
   activation gradients; GradCache's extra forward counts as overhead, so it caps that run at 2/3). Beside it,
   ``ratio_with_adapters_to_matmul_limit`` adds the adapters' own products (6 x their parameters: r 64 on
   every projection is 19.5M parameters, 117M FLOPs per token for the embedded model), which the issue's
   count leaves out.
   ``products`` (in ``pretrain`` and ``finetune_plain``; ``--no-products`` skips it): the step's own matrix
   products, recorded in a second process over the second step of the same command (forward, backward and
   optimizer; aten mm, addmm, bmm with their shapes, strides and dtypes) and replayed alone, back to back:
   their seconds, their share of the step, and ``ceiling``: the ratio the step would reach if everything
   but its products (casts, elementwise work, attention, Python) took no time, against the run's limit
   (``ceiling_paired``: against a 2048-cube matmul timed right after the replay, in its process). The replay
   gives each distinct operand one warm tensor; on the AMX Xeon it took what the profiler gave the same
   products inside the step (0.95 against 0.94 s for the recipe's LoRA step).
4. ``memory``: ``llara finetune --model default --max-steps 1 --batch-size B`` with every other option
   at its default (group 16, 160-token passages, GradCache chunk and checkpointing from the memory
   plan) for each B of ``--memory-batches``: the peak RSS the training log records and the plan chosen.

    python benchmarks/cpu_train.py --out benchmarks/results/cpu_train.json

Each section is written as soon as it ends; every command runs in its own process (so peak RSS is that
command's own).

**Paired limit.** This VM's matmul rate moves by up to a tenth between minutes (two runs of one step a
minute apart differed by 10%), so the training runs of sections 2 and 3 also time the matmul beside
each step: their process times a 2048-cube product (best of 3) right after every optimizer step
(``_paired``; the products' 32 MB stay allocated, in the peak RSS), and each step's own time runs from the
end of one such probe to the start of the next. ``paired``: per step (after the first), its tokens / its
own time, and its FLOP rate over the better of the two probes around it; the medians over the steps.
``tokens_per_s`` and the run-level ratios use the steps' own times too (the log's tokens/s would count
the probes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from llara.modeling.precision import cpu_name
from llara.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "llara" / "data" / "demo" / "med"
PARAMS_135M = 134_515_008  # SmolLM2-135M (tied embeddings counted once), the convention of issue 20


def bf16_usable() -> bool:
    """Whether this CPU has bf16 matmul kernels at all (without them a bf16 2048-cube takes minutes)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def limit_dtype() -> torch.dtype:
    """The precision llara trains in on this CPU, whose matmul rate is the limit: bf16 where it is measured
    faster (AVX512-BF16, AMX), else fp32 (``llara.modeling.precision``)."""
    from llara.modeling.precision import cpu_prefers_bf16

    return torch.bfloat16 if cpu_prefers_bf16() else torch.float32


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    return _mm_rate(a, b, repeats)


def projection_shapes(model: str) -> tuple:
    """The model's config and its decoder layer's projections as (out, in) features, LLaMA-style."""
    from transformers import AutoConfig

    from llara.modeling.loading import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(model).path)
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    return cfg, {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                 "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def model_shape_gflops(model: str, tokens: int, lm_head: bool, repeats: int = 5,
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """GFLOP/s (in ``dtype``) of the model's own products at ``tokens`` rows (one micro-batch): each projection of
    a decoder layer (and the LM head when ``lm_head``) forward (x @ W^T) and for the activation
    gradient (g @ W), best of ``repeats``; the FLOP-weighted mean is the ceiling a training step of this
    model on this machine can reach with its matmuls alone (the 2048-cube is a larger, easier product)."""
    cfg, shapes = projection_shapes(model)
    h = cfg.hidden_size
    if lm_head:
        shapes["lm_head"] = (cfg.vocab_size, h)
    rows, flops, seconds = {}, 0.0, 0.0
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, dtype=dtype)
        best = {}
        for kind, a, b in (("forward", torch.randn(tokens, in_f, dtype=dtype), w.t()),
                           ("input_grad", torch.randn(tokens, out_f, dtype=dtype), w)):
            torch.mm(a, b)
            t = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
            best[kind] = t
            n = 2 * tokens * out_f * in_f * (cfg.num_hidden_layers if name != "lm_head" else 1)
            flops += n
            seconds += t * (cfg.num_hidden_layers if name != "lm_head" else 1)
        rows[name] = {k: round(2 * tokens * out_f * in_f / v / 1e9, 1) for k, v in best.items()}
    return {"tokens": tokens, "per_product": rows, "weighted_gflops": round(flops / seconds / 1e9, 1)}


def adapter_params(model: str, r: int) -> int:
    """Parameters of LoRA rank ``r`` on every projection of the decoder layers (llara's targets): their
    products (forward, input and weight gradients: 6 FLOPs per parameter and token) are not in the
    issue's count of 4 x the frozen model's parameters."""
    cfg, shapes = projection_shapes(model)
    return r * sum(out_f + in_f for out_f, in_f in shapes.values()) * cfg.num_hidden_layers


def combined(parts: list[dict]) -> dict:
    """One ceiling for a step of several passes (e.g. queries, then passages): FLOP-weighted, i.e. the
    total FLOPs over the total time, with each pass's FLOPs proportional to its rows."""
    seconds = sum(p["tokens"] / p["weighted_gflops"] for p in parts)
    return {"passes": parts, "tokens": sum(p["tokens"] for p in parts),
            "weighted_gflops": round(sum(p["tokens"] for p in parts) / seconds, 1)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def llara(argv: list[str], env: dict | None = None, probes: tuple[Path, torch.dtype] | None = None,
          head: list[str] | None = None) -> tuple[float, str]:
    """``llara argv`` in its own process: (seconds, its output). ``probes`` (record, dtype): with the
    matmul probe after each step (:func:`paired_child`); ``head``: another command in front of ``argv``."""
    if head is None:
        head = [sys.executable, "-m", "llara.cli"] if probes is None else [
            sys.executable, str(Path(__file__).resolve()), "_paired", str(probes[0]), str(probes[1]).split(".")[-1]]
    t = time.perf_counter()
    done = subprocess.run([*head, *argv], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, done.stderr + done.stdout


def _mm_rate(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9


def paired_child(argv: list[str]) -> int:
    """``_paired RECORD DTYPE ARGS...``: runs ``llara ARGS`` in this process and times a 2048-cube matmul in
    DTYPE (best of 3) after every optimizer step; writes ``[[probe start, probe end, GFLOP/s], ...]`` (one
    per step, perf_counter seconds) to RECORD."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from llara.cli import main as llara_main
    from llara.io import write_json

    record, dtype, args = Path(argv[0]), getattr(torch, argv[1]), argv[2:]
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)
    marks: list[list[float]] = []

    def probe(*_):
        start = time.perf_counter()
        rate = _mm_rate(a, b, 3)
        marks.append([start, time.perf_counter(), rate])

    handle = register_optimizer_step_post_hook(probe)
    try:
        code = llara_main(args)
    finally:
        handle.remove()
        write_json(record, marks)
    return code or 0


_PRODUCT_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")


class Operand(NamedTuple):
    """A recorded tensor argument of a product: what the replay needs to make one like it."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _product_flops(name: str, shapes: list) -> int:
    """FLOPs of one recorded matrix product: 2 x m x k x n (x batch)."""
    a, b = shapes[-2:] if name.startswith(("addmm", "baddbmm")) else shapes[:2]
    batch = a[0] if "bmm" in name else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def product_recorder():
    """A dispatch mode (enter it, forward and backward run under it) that appends each matrix product
    (aten mm, addmm, bmm, baddbmm and their in-place forms) to its ``calls``: (name, [(shape, strides,
    dtype) of each tensor argument as an :class:`Operand`, or the argument], kwargs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    wanted = {getattr(torch.ops.aten, name).default: name for name in _PRODUCT_OPS}

    class ProductRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = wanted.get(func)
            if name:
                self.calls.append((name, [Operand(tuple(a.shape), tuple(a.stride()), a.dtype)
                                          if isinstance(a, torch.Tensor) else a for a in args], dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    return ProductRecorder()


def replay_products(calls: list, repeats: int = 3) -> dict:
    """Times the recorded matrix products of one step alone, back to back (best of ``repeats``): each
    distinct operand (shape, strides, dtype) gets one random tensor, so the replay is the products' best
    case (operands warm in cache, no other work between them)."""
    operands: dict = {}

    def make(arg):
        if not isinstance(arg, Operand):
            return arg
        if arg not in operands:
            need = 1 + sum((n - 1) * st for n, st in zip(arg.shape, arg.stride))
            operands[arg] = torch.randn(need).to(arg.dtype).as_strided(arg.shape, arg.stride)
        return operands[arg]

    ops = [(getattr(torch.ops.aten, name).default, [make(a) for a in args], kwargs) for name, args, kwargs in calls]
    tensors = [[a for a in args if isinstance(a, Operand)] for _, args, _ in calls]
    flops = [_product_flops(name, [a.shape for a in t]) for (name, _, _), t in zip(calls, tensors)]
    best, per_call = float("inf"), []
    for _ in range(repeats):
        times = []
        for op, args, kwargs in ops:
            t = time.perf_counter()
            op(*args, **kwargs)
            times.append(time.perf_counter() - t)
        if sum(times) < best:
            best, per_call = sum(times), times
    groups: dict = {}
    for (name, _, _), ts, f, t in zip(calls, tensors, flops, per_call):
        key = name + " " + " x ".join("%s%s" % (str(a.dtype).split(".")[-1], list(a.shape)) for a in ts)
        g = groups.setdefault(key, [0, 0.0, 0])
        g[0], g[1], g[2] = g[0] + 1, g[1] + t, g[2] + f
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]
    return {"products": len(calls), "gflop": round(sum(flops) / 1e9, 1), "seconds": round(best, 6),
            "gflops": round(sum(flops) / best / 1e9, 1),
            "slowest": [{"product": k, "calls": n, "seconds": round(t, 6), "gflops": round(f / t / 1e9, 1)}
                        for k, (n, t, f) in top]}


def products_child(argv: list[str]) -> int:
    """``_products RECORD ARGS...``: runs ``llara ARGS`` (its ``--max-steps`` should be 2) in this process,
    records every matrix product (aten mm, addmm, bmm and their in-place forms) of the second step, forward,
    backward and optimizer, with a dispatch mode (shapes, strides, dtypes), then replays them alone
    (:func:`replay_products`); writes that to RECORD beside a 2048-cube matmul's rate timed right after."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from llara.cli import main as llara_main
    from llara.io import write_json

    record, args = Path(argv[0]), argv[1:]
    recorder, steps = product_recorder(), []

    def hook(*_):
        steps.append(1)
        if len(steps) == 1:
            recorder.__enter__()
        elif len(steps) == 2:
            recorder.__exit__(None, None, None)

    handle = register_optimizer_step_post_hook(hook)
    try:
        code = llara_main(args)
    finally:
        handle.remove()
        if len(steps) == 1:
            recorder.__exit__(None, None, None)
    if len(steps) < 2:
        raise RuntimeError(f"llara {' '.join(args)} ran {len(steps)} step(s); the products of the second are replayed")
    result = replay_products(recorder.calls)
    result["matmul_gflops_after"] = round(matmul_gflops(limit_dtype()), 1)
    write_json(record, result)
    return code or 0


def paired_steps(rows: list[dict], marks: list[list[float]], flops_per_token: float) -> dict:
    """Per step after the first: tokens / the step's own time (end of the probe before it to the start of
    the probe after it) and that FLOP rate over the better of those two probes' matmul rates."""
    if len(marks) != len(rows):
        raise ValueError(f"{len(marks)} matmul probes for {len(rows)} logged steps")
    tps, ratios, limits = [], [], []
    for k in range(1, len(rows)):
        seconds = marks[k][0] - marks[k - 1][1]
        rate = (rows[k]["tokens"] - rows[k - 1]["tokens"]) / seconds
        limit = max(marks[k - 1][2], marks[k][2])
        tps.append(round(rate, 1))
        limits.append(round(limit, 1))
        ratios.append(round(flops_per_token * rate / 1e9 / limit, 3))
    return {"tokens_per_s_by_step": tps, "matmul_gflops_by_step": limits, "ratio_by_step": ratios,
            "tokens_per_s": round(statistics.median(tps), 1), "matmul_gflops": round(statistics.median(limits), 1),
            "ratio": round(statistics.median(ratios), 3)}


def plan_lines(text: str) -> list[str]:
    """The memory plan's log messages ("memory: ... -> ..."), whole: the log wraps long messages onto
    indented lines; each message ends where the next log level begins."""
    flat = " ".join(text.split())
    return [m.strip() for m in re.findall(r"(?<!host )memory: (.*?)(?= (?:\[[^\]]*\] )?(?:INFO|WARNING|ERROR|DEBUG) |$)", flat)]


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def summary(run: Path, flops_per_token: float, limit_gflops: float | None, marks: list | None = None) -> dict:
    """Median tokens/s after the first step (the steps' own times where ``marks`` of :func:`paired_child`
    are given, else the log's), its GFLOP/s and ratio to ``limit_gflops``, and ``paired`` from the marks."""
    rows = log_rows(run)
    paired = paired_steps(rows, marks, flops_per_token) if marks and len(rows) > 1 else None
    if paired:
        tps = paired["tokens_per_s"]
    else:
        tps = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["tokens_per_s"]
    out = {"steps": len(rows), "tokens_per_s": round(tps, 1), "tokens_per_s_by_step": [r["tokens_per_s"] for r in rows],
           "peak_memory_gb": rows[-1].get("peak_memory_gb"), "gflops": round(flops_per_token * tps / 1e9, 1)}
    if paired:
        out["tokens_per_s_by_step"] = paired.pop("tokens_per_s_by_step")  # the log's would count the probes
        out["paired"] = paired
    if limit_gflops:
        out["ratio_to_matmul_limit"] = round(flops_per_token * tps / 1e9 / limit_gflops, 3)
    return out


def _marks(path: Path) -> list:
    return json.loads(path.read_text())


def products_section(argv_: list[str], work: Path, name: str, flops_per_token: float, step_tps: float) -> dict:
    """The step's own matrix products replayed alone (:func:`products_child`, its own process, 2 steps of
    ``argv_``): their seconds, and ``ceiling``: the ratio the step would reach if everything but its
    products took no time (the counted FLOPs of the recorded step / the limit / the products' seconds)."""
    run, record = work / f"{name}_products", work / f"{name}_products.json"
    argv_ = [*argv_, "--max-steps", "2", "--output", str(run)]
    subprocess.run(["rm", "-rf", str(run)])
    llara(argv_, head=[sys.executable, str(Path(__file__).resolve()), "_products", str(record)])
    rows, out = log_rows(run), json.loads(record.read_text())
    tokens = rows[1]["tokens"] - rows[0]["tokens"]
    out.update({"step_tokens": tokens, "counted_gflop": round(flops_per_token * tokens / 1e9, 1),
                "share_of_step": round(out["seconds"] / (tokens / step_tps), 3)})
    return out


def ceiling(products: dict, limit_gflops: float) -> float:
    """The ratio to ``limit_gflops`` a step would reach if everything but its own matrix products took no
    time: its counted FLOPs / the limit / the seconds its products take alone."""
    return round(products["counted_gflop"] / limit_gflops / products["seconds"], 3)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_paired"]:
        return paired_child(argv[1:])
    if argv[:1] == ["_products"]:
        return products_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_train.json"))
    p.add_argument("--work", default="/tmp/llara-cpu-train")
    p.add_argument("--model", default="default")
    p.add_argument("--sections", default="pretrain,finetune,memory")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pretrain-batch", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--finetune-batch", type=int, default=8)
    p.add_argument("--finetune-group", type=int, default=2, help="passages per query (2: `llara recipe`'s step)")
    p.add_argument("--finetune-passage-length", type=int, default=96, help="tokens per passage (96: the recipe's)")
    p.add_argument("--memory-batches", default="2,8,32")
    p.add_argument("--no-products", action="store_true",
                   help="skip replaying the step's own matrix products alone (the step's ceiling)")
    p.add_argument("--finetune-rows", default="1984",
                   help="rows of each forward pass of a fine-tuning step, for the model-shape ceiling (the "
                        "recipe's plain step packed: one pass of 1,920-2,016 rows; unpacked it was two, "
                        "512,1536: 8 queries x 64 tokens, then 16 passages x 96)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/cpu_train.py " + " ".join(argv),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__},
              "sections": {}}

    def write():
        from llara.io import write_json

        write_json(out, result)

    # The limit is the matmul rate of the precision llara trains in here; bf16 is not timed where the
    # CPU has no bf16 kernels (AVX2 only: minutes per product, and llara trains in fp32 there).
    dtype = limit_dtype()
    key = "bf16" if dtype == torch.bfloat16 else "fp32"
    result["limit_precision"] = key

    def matmuls() -> dict:
        rates = {"fp32": matmul_gflops(torch.float32)}
        if bf16_usable():
            rates["bf16"] = matmul_gflops(torch.bfloat16)
        return rates

    before = matmuls()
    result["sections"]["matmul_before"] = {k: round(v, 1) for k, v in before.items()}
    write()
    limit = before[key]
    # The same products at the shapes of this model's micro-batches (pretrain: batch x chunk rows;
    # LoRA fine-tuning: one GradCache chunk or the whole plain step of passages).
    result["sections"]["model_shapes"] = {
        "pretrain": model_shape_gflops(args.model, args.pretrain_batch * args.chunk_tokens, lm_head=True, dtype=dtype),
        "finetune": combined([model_shape_gflops(args.model, int(n), lm_head=False, dtype=dtype)
                              for n in args.finetune_rows.split(",")])}
    write()
    common = ["--save-every", "0", "--no-export", "--no-progress", "--seed", "0"]
    sections = args.sections.split(",")
    if "pretrain" in sections:
        run = work / "pretrain"
        argv_base = ["pretrain", "--model", args.model, "--data", str(DEMO / "corpus.jsonl"),
                     "--batch-size", str(args.pretrain_batch), "--chunk-tokens", str(args.chunk_tokens), "--lr", "5e-5",
                     *common]
        argv_ = [*argv_base, "--output", str(run), "--max-steps", str(args.steps)]
        subprocess.run(["rm", "-rf", str(run)])
        seconds, _ = llara(argv_, probes=(work / "pretrain_probes.json", dtype))
        result["sections"]["pretrain"] = {"command": "llara " + " ".join(argv_), "seconds": round(seconds, 1),
                                          "flops_per_token": f"6 x {PARAMS_135M}",
                                          **summary(run, 6 * PARAMS_135M, limit, _marks(work / "pretrain_probes.json"))}
        write()
        if not args.no_products:
            sec = result["sections"]["pretrain"]
            sec["products"] = products_section(argv_base, work, "pretrain", 6 * PARAMS_135M, sec["tokens_per_s"])
            write()
    train = work / "train.jsonl"
    if ("finetune" in sections or "memory" in sections) and not train.exists():
        llara(["mine", "--method", "bm25", "--corpus", str(DEMO / "corpus.jsonl"), "--queries",
               str(DEMO / "queries.jsonl"), "--qrels", str(DEMO / "qrels" / "test.tsv"), "--window", "5", "100",
               "--negatives", "15", "--output", str(train)])
    # The step as the memory plan runs it (GradCache where the whole step would not fit the budget: one
    # more forward than counted), and the same step plain (--grad-cache-chunk 0): the step's own efficiency.
    plain = ["--grad-cache-chunk", "0", "--gradient-checkpointing", "false"]
    variants = (("finetune", []), ("finetune_plain", plain),
                ("finetune_plain_no_dropout", [*plain, "--lora-dropout", "0"]),
                ("finetune_plain_unpacked", [*plain, "--no-packing"]))
    for name, extra in variants:
        if "finetune" not in sections and name not in sections:
            continue
        run = work / name
        argv_base = ["finetune", "--model", args.model, "--data", str(train),
                     "--batch-size", str(args.finetune_batch), "--group-size", str(args.finetune_group),
                     "--max-passage-length", str(args.finetune_passage_length), *extra, *common]
        argv_ = [*argv_base, "--output", str(run), "--max-steps", str(args.steps)]
        subprocess.run(["rm", "-rf", str(run)])
        seconds, text = llara(argv_, probes=(work / f"{name}_probes.json", dtype))
        plan = [m.split(" -> ", 1)[-1] for m in plan_lines(text)] or ["plain step, no checkpointing (as asked)"]
        sec = {"command": "llara " + " ".join(argv_), "seconds": round(seconds, 1),
               "memory_plan": [x.strip() for x in plan[:1]], "flops_per_token": f"4 x {PARAMS_135M}",
               **summary(run, 4 * PARAMS_135M, limit, _marks(work / f"{name}_probes.json"))}
        # Beside the issue's count: the adapters' own products (LoRA on all seven projections).
        adapters = adapter_params(args.model, TrainConfig.__dataclass_fields__["lora_r"].default)  # the default rank
        sec["flops_per_token_with_adapters"] = f"4 x {PARAMS_135M} + 6 x {adapters}"
        sec["gflops_with_adapters"] = round(sec["gflops"] * (4 * PARAMS_135M + 6 * adapters) / (4 * PARAMS_135M), 1)
        result["sections"][name] = sec
        write()
        if name == "finetune_plain" and not args.no_products:
            sec["products"] = products_section(argv_base, work, name, 4 * PARAMS_135M, sec["tokens_per_s"])
            write()
    if "memory" in sections:
        rows = {}
        # The demo has 30 queries: one line per (query, positive) gives batches of 32 distinct positives
        # (memory depends on the shape of the step only).
        per_positive = work / "train_per_positive.jsonl"
        if not per_positive.exists():
            lines = [json.loads(x) for x in train.read_text().splitlines() if x.strip()]
            per_positive.write_text("".join(json.dumps({**r, "pos": [p]}) + "\n" for r in lines for p in r["pos"]))
        for b in [int(x) for x in args.memory_batches.split(",") if x]:
            run = work / f"memory_b{b}"
            subprocess.run(["rm", "-rf", str(run)])
            argv_ = ["finetune", "--model", args.model, "--data", str(per_positive), "--output", str(run),
                     "--batch-size", str(b), "--max-steps", "1", "--save-every", "0", "--no-export", "--no-progress"]
            seconds, text = llara(argv_)
            rows[str(b)] = {"command": "llara " + " ".join(argv_), "seconds": round(seconds, 1),
                            "memory_plan": plan_lines(text)[:2],
                            "peak_rss_gb": log_rows(run)[-1]["peak_memory_gb"]}
            result["sections"]["memory"] = rows
            write()
    after = matmuls()
    result["sections"]["matmul_after"] = {k: round(v, 1) for k, v in after.items()}
    # The limit is the best the machine showed in this run (a shared VM's rate moves by a third between
    # minutes): the conservative ratio. The mean of the two is kept beside it.
    result["matmul_limit_gflops"] = round(max(before[key], after[key]), 1)
    result["matmul_mean_gflops"] = round((before[key] + after[key]) / 2, 1)
    for name in ("pretrain", *(v for v, _ in variants)):
        sec = result["sections"].get(name)
        if sec:
            # (replaces the ratio to the first measurement alone, written while the runs went on)
            sec["ratio_to_matmul_limit"] = round(sec["gflops"] / result["matmul_limit_gflops"], 3)
            sec["ratio_to_mean_matmul_limit"] = round(sec["gflops"] / result["matmul_mean_gflops"], 3)
            shaped = result["sections"]["model_shapes"][name.split("_")[0]]["weighted_gflops"]
            sec["ratio_to_model_shape_matmul"] = round(sec["gflops"] / shaped, 3)
            if "products" in sec:
                # against the run's limit, and against the matmul timed right after the replay in its process
                sec["products"]["ceiling"] = ceiling(sec["products"], result["matmul_limit_gflops"])
                sec["products"]["ceiling_paired"] = ceiling(sec["products"], sec["products"]["matmul_gflops_after"])
            if "gflops_with_adapters" in sec:
                sec["ratio_with_adapters_to_matmul_limit"] = round(sec["gflops_with_adapters"] / result["matmul_limit_gflops"], 3)
    write()
    print(json.dumps(result, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
