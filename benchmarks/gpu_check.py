"""GPU check: what llara's GPU paths do on one GPU, in one JSON file (about 3-5 minutes on an H100/H200).

1. ``joint_pass``: one joint SELF + NEXT forward pass (sdpa) gives the slot states of two separate
   prompted passes, in fp32 and in bf16, on the embedded model and real (chunk, next chunk) pairs.
2. ``pretrain`` / ``finetune``: 20 steps each of ``llara pretrain`` and ``llara finetune`` (BM25-mined
   negatives) on the embedded model, bf16: first/last loss, median tokens/s, peak memory.
3. ``llama7b_lora``: LLaRA adaptation steps (the same ``pretrain`` code) of a randomly initialised
   LLaMA-2-7B-shaped model (no weights needed), LoRA + gradient checkpointing, bf16: tokens/s, MFU
   and peak memory.
4. ``encoder``: ``Encoder.encode`` passage tokens/s of the embedded model, bf16.

On a fresh GPU machine, from the repository root (sets up a venv with PyPI's CUDA build of torch)::

    bash benchmarks/gpu_check.sh --out benchmarks/results/gpu_check.json

With llara already installed: ``python benchmarks/gpu_check.py``. ``--tiny --cpu --model DIR`` runs
every section with small shapes on CPU (the plumbing test in tests/test_gpu_check.py). Each section
is written to the JSON as soon as it ends (a failed section records its error, the others still run);
the exit status is 1 when a section failed or a check did not pass.
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
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)


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
    from llara.data.pretrain import PretrainCollator, joint_batch
    from llara.modeling.arch import joint_forward_kwargs, single_forward_kwargs
    from llara.modeling.encoder import base_model
    from llara.modeling.loading import ensure_slot_tokens, load_model
    from llara.modeling.masks import build_single_batch, gather_positions
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
def _log_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
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


# --------------------------------------------------------------------------- 3. 7B-shaped LoRA step
def _peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    hits = [v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name]
    return hits[0] if hits else None


def check_llama7b_lora(args, device: torch.device, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llara.data.pretrain import PretrainDataConfig
    from llara.modeling.loading import load_tokenizer, resolve_model
    from llara.training.config import TrainConfig
    from llara.training.pretrain import PretrainLossConfig, pretrain

    shape = TINY_LLAMA if args.tiny else LLAMA2_7B
    tok = load_tokenizer(resolve_model(args.model).path)  # any tokenizer: the weights are random
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **shape)
    _reset_peak(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    init_s = time.perf_counter() - t0
    base_params = sum(p.numel() for p in model.parameters())
    # Parameters that take part in a matmul per token: decoder layers and LM head (not the embedding lookup).
    matmul_params = base_params - model.get_input_embeddings().weight.numel()
    steps = 3 if not args.tiny else 2
    train_cfg = TrainConfig(output_dir=str(work / "llama7b"), max_steps=steps, batch_size=args.big_batch,
                            lr=1e-4, warmup_steps=1, precision="bf16", gradient_checkpointing=True, lora=True,
                            lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, save_every=0, export=False,
                            progress=False, seed=0, cpu=device.type == "cpu")
    data_cfg = PretrainDataConfig(chunk_tokens=args.big_chunk_tokens)
    loss_cfg = PretrainLossConfig()
    result = pretrain("llama2-7b-shape", [str(DEMO / "corpus.jsonl")], train_cfg, data_cfg, loss_cfg,
                      model=model, tokenizer=tok)
    _sync(device)
    rows = [json.loads(line) for line in (work / "llama7b" / "train_log.jsonl").read_text().splitlines()]
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    timed = rows[1:]  # step 1: CUDA kernels, allocator warm-up
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    seq = args.big_chunk_tokens + 30  # joint input: chunk + LLaRA's two prompts (about 30 tokens)
    # Forward FLOPs per token: 2 per matmul weight + attention scores and values (causal: half of 4*L*S*d).
    fwd = 2 * matmul_params + 2 * shape["num_hidden_layers"] * seq * shape["hidden_size"]
    # LoRA freezes the base: backward computes activation gradients only (~1x forward); checkpointing
    # recomputes the forward once more (hardware FLOPs, not model FLOPs, as in PaLM's MFU definition).
    model_flops, hw_flops = 2 * fwd * tps, 3 * fwd * tps
    peak = _peak_tflops(args, device)
    return {
        "shape": {**shape, "vocab_size": len(tok)}, "parameters": base_params, "trainable_parameters": trainable,
        "lora_r": args.lora_r, "gradient_checkpointing": True, "precision": "bf16", "batch_size": args.big_batch,
        "chunk_tokens": args.big_chunk_tokens, "steps": len(rows), "init_seconds": round(init_s, 1),
        "losses": [r["loss"] for r in rows], "tokens_per_s": round(tps, 1),
        "tokens_per_s_by_step": [r.get("tokens_per_s") for r in rows],
        "model_tflops": round(model_flops / 1e12, 2), "hardware_tflops": round(hw_flops / 1e12, 2),
        "peak_bf16_tflops": peak, "mfu": round(model_flops / 1e12 / peak, 4) if peak else None,
        "hfu": round(hw_flops / 1e12 / peak, 4) if peak else None, "peak_memory_gib": _peak_gib(device),
        "flops_note": "per token: forward 2 x matmul parameters + 2 x layers x seq x hidden (causal attention); "
                      "model FLOPs = 2 x forward (frozen base: activation gradients only), hardware FLOPs = "
                      "3 x forward (gradient checkpointing recomputes the forward)",
    }


# --------------------------------------------------------------------------- 4. encoder throughput
def check_encoder(args, device: torch.device) -> dict:
    from llara.io import iter_jsonl, passage_text
    from llara.modeling.encoder import Encoder

    texts = [passage_text(doc) for _, doc in iter_jsonl(DEMO / "corpus.jsonl")][: args.encode_passages]
    enc = Encoder.from_pretrained(args.model, device=str(device), dtype="bfloat16", batch_size=args.encode_batch,
                                  max_passage_length=args.encode_max_length, show_progress=False)
    enc.encode(texts[: args.encode_batch], "passage")  # warm-up
    _sync(device)
    enc.encode(texts, "passage")
    st = enc.last_stats
    return {"passages": st.texts, "tokens": st.tokens, "padded_tokens": st.padded_tokens,
            "seconds": round(st.seconds, 3),
            "tokens_per_s": round(st.tokens_per_second, 1), "passages_per_s": round(st.texts / st.seconds, 1),
            "batch_size": args.encode_batch, "max_passage_length": args.encode_max_length, "dtype": "bfloat16"}


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
    p.add_argument("--sections", default="joint_pass,pretrain,finetune,llama7b_lora,encoder")
    p.add_argument("--cpu", action="store_true", help="run on CPU (plumbing only)")
    p.add_argument("--tiny", action="store_true", help="small shapes and few steps (plumbing on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--joint-batch", type=int, default=16)
    p.add_argument("--big-batch", type=int, default=8)
    p.add_argument("--big-chunk-tokens", type=int, default=480)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--encode-passages", type=int, default=1024)
    p.add_argument("--encode-batch", type=int, default=128)
    p.add_argument("--encode-max-length", type=int, default=256)
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.chunk_tokens, args.joint_batch = min(args.steps, 3), 2, 16, 3
        args.big_batch, args.big_chunk_tokens, args.lora_r = 2, 16, 4
        args.encode_passages, args.encode_batch, args.encode_max_length = 8, 4, 32
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
              "llama7b_lora": lambda: check_llama7b_lora(args, device, work),
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
