"""benchmarks/gpu_check.py's plumbing on CPU with a tiny model: every section runs and writes its numbers."""
from __future__ import annotations

import json
import math

from bench_scripts import load_benchmark
from tiny_index import save_model


def load_script():
    return load_benchmark("gpu_check")


def test_gpu_check_tiny_on_cpu(tmp_path):
    model = save_model(tmp_path / "model")
    out = tmp_path / "gpu_check.json"
    rc = load_script().main(["--tiny", "--cpu", "--model", str(model), "--out", str(out)])
    result = json.loads(out.read_text())
    errors = {k: v.get("error") for k, v in result["sections"].items() if "error" in v}
    assert not errors, errors
    assert rc == 0 and result["ok"] is True
    assert list(result["sections"]) == ["joint_pass", "pretrain", "finetune", "adapt", "contrastive", "attention",
                                        "encoder"]
    s = result["sections"]
    for dtype in ("fp32", "bf16"):
        for side in ("self", "next"):
            assert s["joint_pass"][dtype][side]["min_cosine"] > 0.999
    assert s["joint_pass"]["fp32"]["self"]["max_abs_diff"] < 1e-4
    for name in ("pretrain", "finetune"):
        assert s[name]["steps"] == 3 and math.isfinite(s[name]["last_loss"]) and s[name]["median_tokens_per_s"] > 0
    adapt = s["adapt"]
    assert adapt["shape"]["num_hidden_layers"] == 2
    for key, ckpt in (("no_checkpointing", False), ("checkpointing", True)):
        run = adapt[key]
        assert run["gradient_checkpointing"] is ckpt and run["tokens_per_s"] > 0 and run["logged_peak_memory_gb"] > 0
        assert 0 < run["trainable_parameters"] < run["parameters"] and all(math.isfinite(x) for x in run["losses"])
    prof = adapt["profile"]
    assert prof["top_ops"] and "aten::" in prof["table"] and prof["to_copy_per_step"] >= 0
    assert s["contrastive"]["steps"] == 3 and s["contrastive"]["tokens_per_s"] > 0
    assert s["attention"]["masked_ms_per_layer"] > 0 and s["attention"]["causal_flash_ms_per_layer"] > 0
    flex = s["attention"]["flex"]
    assert "error" not in flex, flex
    assert flex["flex_ms_per_layer"] > 0 and flex["masked_sdpa_ms_per_layer"] > 0 and flex["pass"].startswith("forward")
    # the block mask is LLaRA's mask: its output matches the masked SDPA's to bf16 rounding
    assert flex["max_abs_diff_to_masked_sdpa"] < 0.02
    for model in ("small_model", "shape"):
        enc = s["encoder"][model]
        assert enc["encode_tokens_per_s"] > 0 and enc["raw_tokens_per_s"] > 0 and enc["ratio"] > 0


def test_mfu_peak_table():
    gc = load_script()
    import argparse

    import torch

    args = argparse.Namespace(peak_tflops=None)
    assert gc._peak_tflops(args, torch.device("cpu")) is None
    assert gc._peak_tflops(argparse.Namespace(peak_tflops=100.0), torch.device("cpu")) == 100.0
