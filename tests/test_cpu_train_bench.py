"""benchmarks/cpu_train.py's own arithmetic: the adapters' parameter count of the embedded model's shape
and the memory plan's log lines read back whole from wrapped log output."""
from __future__ import annotations

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
