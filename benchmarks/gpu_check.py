"""GPU benchmark: llara's GPU paths at the hardware's limit, in one JSON file (~5 minutes on an H100/H200).

1. ``joint_pass``: one joint SELF + NEXT forward pass (sdpa) gives the slot states of two separate
   prompted passes, in fp32 and in bf16, on the small model and real (chunk, next chunk) pairs.
2. ``pretrain`` / ``finetune``: 20 steps each of ``llara pretrain`` and ``llara finetune`` (BM25-mined
   negatives) on the small model, bf16: first/last loss, median tokens/s, peak memory.
3. ``adapt``: LLaRA adaptation (``llara.training.pretrain``) of a randomly initialised model of
   ``--shape`` (no weights needed: throughput and memory do not depend on them), LoRA, bf16, with and
   without gradient checkpointing: tokens/s, MFU, peak memory; then a torch.profiler table of one step
   (top CUDA ops), its dtype casts and its host synchronisations (``torch.cuda.set_sync_debug_mode``).
4. ``contrastive``: contrastive fine-tuning (``llara.training.finetune``) of the same shape with
   GradCache (the chunk chosen by the memory plan unless ``--gc-chunk``): tokens/s, MFU, peak memory.
5. ``attention``: the cost of LLaRA's custom mask: SDPA forward + backward with the joint pass's 4D
   additive mask against the causal flash kernel without a mask, at the adaptation's shapes, and the same
   mask as a compiled FlexAttention block mask (``flex``: compile seconds, ms per layer, difference).
6. ``encoder``: ``Encoder.encode`` against the raw base-model forward over the same padded batches
   (benchmarks/encode_ratio.py) on the shape, and the small model's tokens/s.

MFU = model FLOPs / (seconds x the GPU's dense bf16 peak). Model FLOPs per token of a LoRA step (frozen
base): forward 2 x matmul parameters + causal attention, backward the same again (activation
gradients only); hardware FLOPs add the recomputed forward of checkpointing and GradCache's first,
graph-free forward.

On a machine with a package index, from the repository root (sets up a venv with PyPI's torch, unless
the system python already has a CUDA torch)::

    bash benchmarks/gpu_check.sh --out benchmarks/results/gpu_check.json

On a GPU machine without a package index (what travels, the random-weight small model):
``benchmarks/gpu_device.sh``. With llara importable: ``python benchmarks/gpu_check.py``.
``--tiny --cpu --model DIR`` runs every section with small shapes on CPU (the plumbing test in
tests/test_gpu_check.py). Each section is written to the JSON as soon as it ends (a failed section
records its error, the others still run); the exit status is 1 when a section failed or a check did
not pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "llara" / "data" / "demo" / "med"
# Dense bf16 peak TFLOP/s (no sparsity) by device-name fragment, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0,
                    "L4": 121.0, "B200": 2250.0}
# Decoder shapes for --shape (LLaMA layout; random weights). 135m: SmolLM2-135M (the embedded model);
# 1.5b: Qwen2-1.5B's sizes; 7b: LLaMA-2-7B.
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _pairs(tokenizer, n: int, chunk_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(chunk, next chunk) token-id pairs: consecutive chunks of the demo corpus's passages."""
    from llara.io import iter_jsonl

    pairs = []
    for _, doc in iter_jsonl(DEMO / "corpus.jsonl"):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        half = min(chunk_tokens, len(ids) // 2)
        if half >= 8:
            pairs.append((ids[:half], ids[half : 2 * half]))
        if len(pairs) == n:
            break
    return pairs


# --------------------------------------------------------------------------- 1. joint pass
@torch.no_grad()
def check_joint_pass(args, device: torch.device) -> dict:
    from llara.data.collator import PretrainCollator, joint_batch
    from llara.modeling.arch import joint_forward_kwargs, single_forward_kwargs
    from llara.modeling.embed import base_model, gather_positions
    from llara.modeling.loading import ensure_slot_tokens, load_model
    from llara.modeling.masks import build_single_batch
    from llara.prompts import get_template

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tok, _ = load_model(args.model, device=device, dtype=dtype, attn_implementation="sdpa")
        ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
        coll = PretrainCollator(tok, "llara", vocab_size=model.get_input_embeddings().num_embeddings, dtype=dtype)
        pairs = _pairs(tok, args.joint_batch, args.chunk_tokens)
        batch = coll(pairs)
        texts = [coll.prefix_ids + coll.truncate(text) for text, _ in pairs]
        jb = joint_batch(batch).to(device)
        body = base_model(model)
        joint = body(**joint_forward_kwargs(model, jb)).last_hidden_state
        row = {"batch": len(pairs), "padded_length": int(jb.input_ids.shape[1]),
               "attn_implementation": model.config._attn_implementation}
        for side, suffix, index, slots in (("self", coll.self_suffix, coll.self_slot_index, jb.self_slots),
                                           ("next", coll.next_suffix, coll.next_slot_index, jb.next_slots)):
            sb = build_single_batch(texts, suffix, coll.pad_id, slot_index=index).to(device)
            alone = gather_positions(body(**single_forward_kwargs(model, sb)).last_hidden_state, sb.slots).float()
            together = gather_positions(joint, slots).float()
            diff = (together - alone).abs().max().item()
            cos = torch.nn.functional.cosine_similarity(together.flatten(0, 1), alone.flatten(0, 1), dim=-1)
            row[side] = {"max_abs_diff": diff, "max_abs_value": alone.abs().max().item(),
                         "min_cosine": cos.min().item()}
        out[name] = row
        del model
        _reset_peak(device)
    # fp32 must agree to rounding; bf16 (different padded shapes -> other kernels) to bf16 precision.
    fp32_ok = all(out["fp32"][s]["max_abs_diff"] <= 1e-4 * max(1.0, out["fp32"][s]["max_abs_value"])
                  for s in ("self", "next"))
    bf16_ok = all(out["bf16"][s]["min_cosine"] >= 0.999 for s in ("self", "next"))
    out["criteria"] = "fp32: max|joint - separate| <= 1e-4 x max(1, max|state|); bf16: min cosine >= 0.999"
    out["ok"] = fp32_ok and bf16_ok
    return out


# --------------------------------------------------------------------------- 2. pretrain / finetune
def _log_rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _log_summary(run_dir: Path) -> dict:
    rows = _log_rows(run_dir / "train_log.jsonl")
    tps = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]  # step 1 includes warm-up
    return {"steps": len(rows), "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
            "median_tokens_per_s": round(statistics.median(tps), 1) if tps else None,
            "first_step_tokens_per_s": rows[0].get("tokens_per_s")}


def _cli(argv: list[str]) -> None:
    from llara.cli import main

    rc = main(argv)
    if rc:
        raise RuntimeError(f"llara {' '.join(argv)} exited with {rc}")


def _train_flags(args, device: torch.device) -> list[str]:
    return ["--max-steps", str(args.steps), "--precision", "bf16", "--save-every", "0", "--no-export",
            "--no-progress", "--seed", "0", *(["--cpu"] if device.type == "cpu" else [])]


def check_pretrain(args, device: torch.device, work: Path) -> dict:
    run = work / "pretrain"
    argv = ["pretrain", "--model", args.model, "--data", str(DEMO / "corpus.jsonl"), "--output", str(run),
            "--batch-size", str(args.batch_size), "--chunk-tokens", str(args.chunk_tokens), "--lr", "5e-5",
            *_train_flags(args, device)]
    _reset_peak(device)
    t0 = time.perf_counter()
    _cli(argv)
    return {"command": "llara " + " ".join(argv), "seconds": round(time.perf_counter() - t0, 1),
            "peak_memory_gib": _peak_gib(device), **_log_summary(run)}


def check_finetune(args, device: torch.device, work: Path) -> dict:
    train = work / "train.jsonl"
    mine = ["mine", "--method", "bm25", "--corpus", str(DEMO / "corpus.jsonl"), "--queries",
            str(DEMO / "queries.jsonl"), "--qrels", str(DEMO / "qrels" / "test.tsv"), "--window", "5", "100",
            "--negatives", "7", "--output", str(train)]
    _cli(mine)
    run = work / "finetune"
    argv = ["finetune", "--model", args.model, "--data", str(train), "--output", str(run),
            "--batch-size", str(args.batch_size), "--group-size", "4", "--lr", "1e-4",
            *_train_flags(args, device)]
    _reset_peak(device)
    t0 = time.perf_counter()
    _cli(argv)
    return {"commands": ["llara " + " ".join(mine), "llara " + " ".join(argv)],
            "seconds": round(time.perf_counter() - t0, 1), "peak_memory_gib": _peak_gib(device), **_log_summary(run)}


# --------------------------------------------------------------------------- 3-6. the big shape
def _peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    hits = [v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name]
    return hits[0] if hits else None


def _shape(args) -> dict:
    return SHAPES["tiny" if args.tiny else args.shape]


def _big_model(args, device: torch.device, tok):
    """A randomly initialised causal LM of ``--shape`` in bf16 on ``device`` (untied LM head, as LLaMA)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = _shape(args)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")


def _matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: decoder layers and LM head (not the lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def _forward_flops(args, matmul_params: int, seq: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight + causal attention scores and values (half of 4*L*s*d)."""
    shape = _shape(args)
    return 2 * matmul_params + 2 * shape["num_hidden_layers"] * seq * shape["hidden_size"]


def _rates(args, device, tps: float, fwd: float, extra_forwards: float) -> dict:
    """MFU (model FLOPs: forward + activation-gradient backward = 2 x forward) and HFU (plus the
    forwards that are recomputed: checkpointing, GradCache's first pass)."""
    peak = _peak_tflops(args, device)
    model_tflops, hw_tflops = 2 * fwd * tps / 1e12, (2 + extra_forwards) * fwd * tps / 1e12
    return {"model_tflops": round(model_tflops, 2), "hardware_tflops": round(hw_tflops, 2), "peak_bf16_tflops": peak,
            "mfu": round(model_tflops / peak, 4) if peak else None, "hfu": round(hw_tflops / peak, 4) if peak else None}




def _train_cfg(args, device, out: Path, steps: int, **kw):
    from llara.training.config import TrainConfig

    return TrainConfig(output_dir=str(out), max_steps=steps, lr=1e-4, warmup_steps=1, precision="bf16", lora=True,
                       lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, save_every=0, export=False,
                       progress=False, seed=0, cpu=device.type == "cpu", **kw)


def _adapt_run(args, device, work: Path, tok, checkpointing: bool) -> dict:
    from llara.data.pretrain import PretrainDataConfig
    from llara.training.pretrain import PretrainLossConfig, pretrain

    _reset_peak(device)
    t0 = time.perf_counter()
    model = _big_model(args, device, tok)
    init_s = time.perf_counter() - t0
    params, matmul = sum(p.numel() for p in model.parameters()), _matmul_params(model)
    out = work / f"adapt_ckpt{int(checkpointing)}"
    cfg = _train_cfg(args, device, out, args.big_steps, batch_size=args.big_batch,
                     gradient_checkpointing=checkpointing)
    result = pretrain("random-shape", [str(DEMO / "corpus.jsonl")], cfg, PretrainDataConfig(chunk_tokens=args.big_chunk_tokens),
                      PretrainLossConfig(), model=model, tokenizer=tok)
    _sync(device)
    rows = _log_rows(out / "train_log.jsonl")
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:])  # step 1: kernels, allocator warm-up
    seq = args.big_chunk_tokens + 30  # the joint input: chunk + LLaRA's two prompts (about 30 tokens)
    row = {"gradient_checkpointing": checkpointing, "batch_size": args.big_batch, "chunk_tokens": args.big_chunk_tokens,
           "parameters": params, "trainable_parameters": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
           "trainable_dtypes": sorted({str(p.dtype) for p in result.model.parameters() if p.requires_grad}),
           "steps": len(rows), "init_seconds": round(init_s, 1), "losses": [r["loss"] for r in rows],
           "tokens_per_s": round(tps, 1), "tokens_per_s_by_step": [r.get("tokens_per_s") for r in rows],
           "peak_memory_gib": _peak_gib(device), "logged_peak_memory_gb": rows[-1].get("peak_memory_gb"),
           **_rates(args, device, tps, _forward_flops(args, matmul, seq), 1.0 if checkpointing else 0.0)}
    return row, result.model


def _profile_step(args, device, model, tok) -> dict:
    """torch.profiler over two adaptation steps of ``model`` (after one warm-up): the top CUDA ops, the
    dtype casts and the host synchronisations per step."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from llara.data.collator import PretrainCollator
    from llara.training.pretrain import PretrainLossConfig, make_loss_fn
    from llara.training.setup import build_optimizer
    from llara.training.config import TrainConfig

    loss_fn = make_loss_fn(PretrainLossConfig())
    coll = PretrainCollator(tok, "llara", vocab_size=model.get_output_embeddings().weight.shape[0],
                            max_length=args.big_chunk_tokens + 40, dtype=torch.bfloat16)
    pairs = _pairs(tok, args.big_batch, args.big_chunk_tokens)
    while len(pairs) < args.big_batch:
        pairs = pairs + pairs
    batch = coll(pairs[: args.big_batch])
    opt = build_optimizer(model, TrainConfig(output_dir="unused", max_steps=1, lr=1e-4))
    model.train()

    def step():
        from accelerate.utils import send_to_device

        b = send_to_device(batch, device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = loss_fn(model, b)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    syncs = None
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            _sync(device)
        torch.cuda.set_sync_debug_mode(0)
        seen: dict[str, int] = {}
        for w in caught:
            key = str(w.message).splitlines()[0][:120]
            seen[key] = seen.get(key, 0) + 1
        syncs = {"count": sum(seen.values()), "messages": seen}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        _sync(device)
    averages = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    casts = sum(e.count for e in averages if e.key in ("aten::_to_copy",)) / 2
    top = []
    for e in sorted(averages, key=lambda e: getattr(e, "device_time_total", 0) if device.type == "cuda"
                    else e.cpu_time_total, reverse=True)[:20]:
        top.append({"op": e.key, "count": e.count, "device_ms": round(getattr(e, "device_time_total", 0) / 1e3, 2),
                    "cpu_ms": round(e.cpu_time_total / 1e3, 2)})
    return {"steps_profiled": 2, "host_syncs_per_step": syncs, "to_copy_per_step": casts, "top_ops": top,
            "table": averages.table(sort_by=sort, row_limit=20, max_name_column_width=50)}


def check_adapt(args, device: torch.device, work: Path) -> dict:
    from llara.modeling.loading import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(args.model).path)  # any tokenizer: the weights are random
    out = {"shape": {"name": "tiny" if args.tiny else args.shape, **_shape(args), "vocab_size": len(tok)},
           "precision": "bf16", "lora_r": args.lora_r}
    model = None
    for checkpointing in (False, True):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        try:
            out[key], trained = _adapt_run(args, device, work, tok, checkpointing)
            if not checkpointing:
                model = trained
            else:
                del trained
        except torch.OutOfMemoryError as e:
            out[key] = {"error": f"OutOfMemoryError: {str(e)[:300]}"}
        _reset_peak(device)
    if model is not None:
        from llara.training.memory import GiB, plan_for

        # What gradient_checkpointing='auto' (the default) chooses for this run, and the estimate behind it.
        plan = plan_for(model.get_base_model(), device, precision="bf16", lora=True)
        seq = args.big_chunk_tokens + 30
        tokens = args.big_batch * seq
        out["auto_checkpointing"] = {"chosen": plan.checkpointing(tokens, seq),
                                     "estimated_gib_without": round(plan.need(tokens, seq, False) / GiB, 1),
                                     "budget_gib": round(plan.budget / GiB, 1)}
        out["profile"] = _profile_step(args, device, model, tok)
    del model
    _reset_peak(device)
    return out


def check_contrastive(args, device: torch.device, work: Path) -> dict:
    from llara.modeling.loading import load_tokenizer, resolve_model
    from llara.training.finetune import FinetuneConfig, finetune

    train = work / "train_contrastive.jsonl"
    if not train.exists():
        _cli(["mine", "--method", "bm25", "--corpus", str(DEMO / "corpus.jsonl"), "--queries",
              str(DEMO / "queries.jsonl"), "--qrels", str(DEMO / "qrels" / "test.tsv"), "--window", "5", "100",
              "--negatives", "15", "--output", str(train)])
    tok = load_tokenizer(resolve_model(args.model).path)
    _reset_peak(device)
    model = _big_model(args, device, tok)
    matmul = _matmul_params(model)
    out_dir = work / "contrastive"
    cfg = FinetuneConfig(group_size=args.ft_group, max_query_length=64, max_passage_length=160,
                         grad_cache_chunk=args.gc_chunk)
    tcfg = _train_cfg(args, device, out_dir, args.big_steps, batch_size=args.ft_batch)
    result = finetune("random-shape", str(train), tcfg, cfg, model=model, tokenizer=tok)
    _sync(device)
    rows = _log_rows(out_dir / "train_log.jsonl")
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
    del result, model
    # Real tokens per sequence vary; FLOPs of attention use the padded passage length (an upper bound).
    fwd = _forward_flops(args, matmul, 160)
    return {"batch_size": args.ft_batch, "group_size": args.ft_group, "query_tokens": 64, "passage_tokens": 160,
            "grad_cache_chunk": "auto" if args.gc_chunk == -1 else args.gc_chunk, "steps": len(rows),
            "losses": [r["loss"] for r in rows], "tokens_per_s": round(tps, 1),
            "tokens_per_s_by_step": [r.get("tokens_per_s") for r in rows], "peak_memory_gib": _peak_gib(device),
            "logged_peak_memory_gb": rows[-1].get("peak_memory_gb"),
            **_rates(args, device, tps, fwd, 1.0)}


def check_attention(args, device: torch.device) -> dict:
    """SDPA forward + backward at the adaptation's shapes: the joint pass's 4D additive mask (what
    llara runs) against ``is_causal`` without a mask (the flash kernel; not LLaRA's attention)."""
    import torch.nn.functional as F

    from llara.modeling.masks import additive_mask

    shape = _shape(args)
    B, L = args.big_batch, args.big_chunk_tokens + 32
    heads, d = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, heads, L, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    blocked = torch.zeros(B, L, L, dtype=torch.bool, device=device)
    blocked[:, L - 8 :, L - 16 : L - 8] = True  # the NEXT suffix may not see the SELF suffix
    mask = additive_mask(valid, blocked, torch.bfloat16)

    def run(**kw) -> float:
        return _ms_per_call(args, device, lambda: F.scaled_dot_product_attention(q, k, v, **kw).sum().backward())

    masked, causal = run(attn_mask=mask), run(is_causal=True)
    layers = shape["num_hidden_layers"]
    out = {"batch": B, "length": L, "heads": heads, "head_dim": d,
           "masked_ms_per_layer": round(masked, 3), "causal_flash_ms_per_layer": round(causal, 3),
           "masked_over_causal": round(masked / causal, 2),
           "extra_ms_per_step": round((masked - causal) * layers, 1),
           "note": "forward + backward of one layer's attention; extra_ms_per_step = (masked - causal) x layers"}
    out["flex"] = _flex_attention(args, q, k, v, mask, L)
    return out


def _ms_per_call(args, device: torch.device, call) -> float:
    """Milliseconds per ``call()`` over ``args.attn_repeats`` calls, after two warm-up calls."""
    for i in range(args.attn_repeats + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        call()
    _sync(device)
    return (time.perf_counter() - t0) / args.attn_repeats * 1e3


def _flex_attention(args, q, k, v, mask, L: int) -> dict:
    """The same mask as FlexAttention's block mask (causal, the NEXT suffix blind to the SELF suffix),
    compiled, against the masked SDPA: compile seconds, ms per layer of each, and the largest difference
    of their outputs. What it reports decides whether the joint pass should move to it. Forward + backward
    on a GPU; forward only on a CPU (FlexAttention has no CPU backward)."""
    import torch.nn.functional as F

    backward = q.device.type != "cpu"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def llara_mask(b, h, q_idx, kv_idx):
            self_suffix = (kv_idx >= L - 16) & (kv_idx < L - 8)
            return (kv_idx <= q_idx) & ~((q_idx >= L - 8) & self_suffix)

        block_mask = create_block_mask(llara_mask, B=None, H=None, Q_LEN=L, KV_LEN=L, device=q.device)
        flex = torch.compile(flex_attention)
        inputs = (q, k, v) if backward else tuple(x.detach() for x in (q, k, v))

        def step(fn) -> None:
            out = fn(*inputs)
            if backward:
                out.sum().backward()

        def flexed(*x):
            return flex(*x, block_mask=block_mask)

        def sdpa(*x):
            return F.scaled_dot_product_attention(*x, attn_mask=mask)

        t0 = time.perf_counter()
        step(flexed)
        _sync(q.device)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            diff = float((flexed(*inputs).float() - sdpa(*inputs).float()).abs().max())
        flex_ms = _ms_per_call(args, q.device, lambda: step(flexed))
        sdpa_ms = _ms_per_call(args, q.device, lambda: step(sdpa))
        return {"pass": "forward + backward" if backward else "forward (no FlexAttention backward on a CPU)",
                "flex_ms_per_layer": round(flex_ms, 3), "masked_sdpa_ms_per_layer": round(sdpa_ms, 3),
                "masked_sdpa_over_flex": round(sdpa_ms / flex_ms, 2), "compile_seconds": round(compile_s, 1),
                "max_abs_diff_to_masked_sdpa": diff}
    except Exception as e:  # noqa: BLE001 - a torch without FlexAttention, or one that cannot compile it here
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


# --------------------------------------------------------------------------- 6. encoder throughput
def check_encoder(args, device: torch.device) -> dict:
    """``Encoder.encode`` against the raw base-model forward over the same padded batches
    (benchmarks/encode_ratio.py), bf16: the small model, then the big shape (random weights)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from encode_ratio import measure

    from llara.io import iter_jsonl, passage_text
    from llara.modeling.loading import load_model, load_tokenizer, resolve_model

    texts = [passage_text(doc) for _, doc in iter_jsonl(DEMO / "corpus.jsonl")][: args.encode_passages]
    kw = dict(batch_size=args.encode_batch, max_length=args.encode_max_length, repeats=args.encode_repeats)
    out = {}
    model, tok, _ = load_model(args.model, device=device, dtype=torch.bfloat16)
    out["small_model"] = measure(model, tok, texts, device, torch.bfloat16, **kw)
    del model
    tok = load_tokenizer(resolve_model(args.model).path)
    model = _big_model(args, device, tok)
    big = measure(model, tok, texts, device, torch.bfloat16, **kw)
    peak = _peak_tflops(args, device)
    if peak:
        big["raw_mfu"] = round(2 * _matmul_params(model) * big["raw_tokens_per_s"] / 1e12 / peak, 4)
    out["shape"] = big
    del model
    _reset_peak(device)
    out["criteria"] = "the big shape's encode / raw >= 0.95"
    out["ok"] = big["ratio"] >= 0.95 or device.type == "cpu"
    return out


# --------------------------------------------------------------------------- driver
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _write(path: Path, result: dict) -> None:
    from llara.io import write_json

    write_json(path, result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--work", default=None, help="directory for training runs (default: OUT's name + '.runs')")
    p.add_argument("--model", default="default", help="the model of sections 1, 2 and 4 (default: embedded)")
    p.add_argument("--sections", default="joint_pass,pretrain,finetune,adapt,contrastive,attention,encoder")
    p.add_argument("--shape", default="7b", choices=[k for k in SHAPES if k != "tiny"],
                   help="decoder shape of sections 3-6 (random weights)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (plumbing only)")
    p.add_argument("--tiny", action="store_true", help="small shapes and few steps (plumbing on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--joint-batch", type=int, default=16)
    p.add_argument("--big-steps", type=int, default=5, help="steps of each run of the big shape")
    p.add_argument("--big-batch", type=int, default=8)
    p.add_argument("--big-chunk-tokens", type=int, default=480)
    p.add_argument("--ft-batch", type=int, default=16, help="contrastive fine-tuning: queries per step")
    p.add_argument("--ft-group", type=int, default=8, help="contrastive fine-tuning: passages per query")
    p.add_argument("--gc-chunk", type=int, default=-1, help="GradCache chunk (-1: the memory plan chooses)")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--attn-repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--encode-passages", type=int, default=1024)
    p.add_argument("--encode-batch", type=int, default=128)
    p.add_argument("--encode-max-length", type=int, default=256)
    p.add_argument("--encode-repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.chunk_tokens, args.joint_batch = min(args.steps, 3), 2, 16, 3
        args.big_steps, args.big_batch, args.big_chunk_tokens, args.lora_r = 3, 2, 16, 4
        args.ft_batch, args.ft_group, args.attn_repeats = 2, 3, 1
        args.encode_passages, args.encode_batch, args.encode_max_length, args.encode_repeats = 8, 4, 32, 1
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or str(out) + ".runs")
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine(device), "tiny": args.tiny, "model": args.model, "sections": {}}
    if device.type == "cpu" and not args.tiny:
        result["warning"] = "no GPU: these are CPU numbers"
    ok = True
    t_all = time.perf_counter()
    checks = {"joint_pass": lambda: check_joint_pass(args, device),
              "pretrain": lambda: check_pretrain(args, device, work),
              "finetune": lambda: check_finetune(args, device, work),
              "adapt": lambda: check_adapt(args, device, work),
              "contrastive": lambda: check_contrastive(args, device, work),
              "attention": lambda: check_attention(args, device),
              "encoder": lambda: check_encoder(args, device)}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            section = checks[name]()
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            section = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            ok = False
        section["wall_seconds"] = round(time.perf_counter() - t0, 1)
        ok = ok and section.get("ok", True)
        result["sections"][name] = section
        result["total_seconds"] = round(time.perf_counter() - t_all, 1)
        result["ok"] = ok
        _write(out, result)
        print(f"[gpu_check] {name}: {json.dumps(section)[:600]}", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
