"""benchmarks/cpu_train.py's own arithmetic: the adapters' parameter count of the embedded model's shape,
the memory plan's log lines read back whole from wrapped log output, and each step timed between its matmul probes."""
from __future__ import annotations

import pytest
from bench_scripts import load_benchmark


def _module():
    return load_benchmark("cpu_train")


def test_plan_lines_are_read_whole_across_the_log_wrap():
    log = """[12/05/26 05:26:54] INFO     memory: ~5.3 GiB of a 7.0 GiB budget (weights and optimizer 0.6 GiB,
                             activations of 1280 tokens x 160) -> GradCache, chunks of 8
                             sequences
[12/05/26 05:26:55] INFO     memory: ~6.2 GiB of a 7.0 GiB budget -> plain step, gradient
                             checkpointing off
                    INFO     host memory: malloc keeps freed memory for reuse
"""
    assert _module().plan_lines(log) == [
        "~5.3 GiB of a 7.0 GiB budget (weights and optimizer 0.6 GiB, activations of 1280 tokens x 160) "
        "-> GradCache, chunks of 8 sequences",
        "~6.2 GiB of a 7.0 GiB budget -> plain step, gradient checkpointing off"]


def test_adapter_parameters_of_a_llama_shape(monkeypatch, tmp_path):
    from transformers import LlamaConfig

    # SmolLM2-135M's shape: r 64 on q, k, v, o, gate, up, down of 30 layers is 19.5M parameters
    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3).save_pretrained(tmp_path)
    module = _module()

    class _Resolved:
        path = tmp_path

    monkeypatch.setattr("llara.modeling.loading.resolve_model", lambda model: _Resolved)
    assert module.adapter_params("default", 64) == 64 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert module.adapter_params("default", 64) == 19_537_920


def test_paired_steps_time_each_step_between_the_probes_and_use_the_better_probe():
    module = _module()
    rows = [{"tokens": 1000}, {"tokens": 3000}, {"tokens": 4000}]
    # probe k: [start, end, GFLOP/s]; step 2 runs from 11.0 to 21.0 (10 s), step 3 from 22.0 to 27.0 (5 s)
    marks = [[10.0, 11.0, 100.0], [21.0, 22.0, 200.0], [27.0, 28.0, 150.0]]
    out = module.paired_steps(rows, marks, flops_per_token=1e9)
    assert out["tokens_per_s_by_step"] == [200.0, 200.0]
    assert out["matmul_gflops_by_step"] == [200.0, 200.0]  # the better of the probes before and after
    assert out["ratio_by_step"] == [1.0, 1.0]
    assert out["tokens_per_s"] == 200.0 and out["ratio"] == 1.0
    with pytest.raises(ValueError, match="2 matmul probes for 3 logged steps"):
        module.paired_steps(rows, marks[:2], flops_per_token=1e9)


def test_summary_counts_the_steps_own_time_not_the_logs(tmp_path):
    import json

    module = _module()
    log = [{"step": 1, "tokens": 100, "tokens_per_s": 50.0, "peak_memory_gb": 1.0},
           {"step": 2, "tokens": 300, "tokens_per_s": 80.0, "peak_memory_gb": 1.5}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    marks = [[0.0, 0.5, 10.0], [2.5, 3.0, 10.0]]  # step 2: 200 tokens in 2.0 s of its own
    out = module.summary(tmp_path, 1e9, 20.0, marks)
    assert out["tokens_per_s"] == 100.0 and out["tokens_per_s_by_step"] == [100.0]
    assert out["ratio_to_matmul_limit"] == 5.0 and out["paired"]["ratio"] == 10.0
    assert module.summary(tmp_path, 1e9, 20.0)["tokens_per_s"] == 80.0  # without probes: the log's


def test_the_recorder_sees_a_steps_products_and_the_replay_counts_their_flops():
    import torch

    module = _module()
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(5, 7, 32, requires_grad=True)
    with module.product_recorder() as recorder:
        layer(x).square().sum().backward()
    names = sorted(name for name, _, _ in recorder.calls)
    # forward x @ W^T; backward: the input's gradient and the weight's
    assert names == ["mm", "mm", "mm"], recorder.calls
    shapes = sorted(tuple(a[0] for a in args) for _, args, _ in recorder.calls)
    assert shapes == sorted([((35, 32), (32, 16)), ((35, 16), (16, 32)), ((16, 35), (35, 32))])
    out = module.replay_products(recorder.calls, repeats=2)
    assert out["products"] == 3 and out["seconds"] > 0
    assert out["gflop"] == round(3 * 2 * 35 * 32 * 16 / 1e9, 1)
    assert sum(g["calls"] for g in out["slowest"]) == 3
    # a batched product counts its batch, an addmm its two factors only
    assert module._product_flops("bmm", [(4, 3, 5), (4, 5, 2)]) == 2 * 4 * 3 * 5 * 2
    assert module._product_flops("addmm_", [(3, 2), (3, 5), (5, 2)]) == 2 * 3 * 5 * 2
    assert module._product_flops("baddbmm", [(4, 3, 2), (4, 3, 5), (4, 5, 2)]) == 2 * 4 * 3 * 5 * 2


def test_the_ceiling_is_the_counted_flops_over_the_limit_and_the_products_time():
    module = _module()
    # 1,000 counted GFLOP against a 2,000 GFLOP/s limit is 0.5 s of products at the limit; 1.0 s taken
    assert module.ceiling({"counted_gflop": 1000.0, "seconds": 1.0}, 2000.0) == 0.5
