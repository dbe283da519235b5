"""The compute precision is chosen at run time from what the CPU does fastest; explicit choices win."""
import json

import pytest
import torch

from llara.modeling import precision
from llara.training.config import TrainConfig
from llara.training.setup import resolve_precision


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """Automatic choice with an empty cache; the probe's answer is set by the test."""
    monkeypatch.setenv("LLARA_CPU_DTYPE", "auto")
    monkeypatch.setenv("LLARA_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_speedups", {})
    monkeypatch.setattr(precision, "_bf16_supported", lambda: True)
    calls = []

    def set_probe(speedup):
        def probe():
            calls.append(speedup)
            return speedup
        monkeypatch.setattr(precision, "_probe", probe)
        return calls

    return set_probe


@pytest.mark.parametrize("speedup, expected", [(2.2, torch.bfloat16), (1.1, torch.float32), (0.3, torch.float32)])
def test_cpu_choice_follows_the_measured_speedup(auto, speedup, expected):
    auto(speedup)
    assert precision.resolve_dtype("cpu") == expected
    assert precision.resolve_dtype("cpu", "auto") == expected
    assert resolve_precision(TrainConfig(max_steps=1, cpu=True)) == ("bf16" if expected == torch.bfloat16 else "fp32")


def test_explicit_choices_win(auto):
    auto(5.0)
    assert precision.resolve_dtype("cpu", "float32") == torch.float32
    assert precision.resolve_dtype("cpu", torch.float16) == torch.float16
    assert resolve_precision(TrainConfig(max_steps=1, cpu=True, precision="fp32")) == "fp32"
    auto(0.5)
    assert precision.resolve_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        precision.resolve_dtype("cpu", "int4")


def test_probe_runs_once_per_cpu_and_is_cached_on_disk(auto, tmp_path, monkeypatch):
    calls = auto(2.0)
    assert precision.cpu_prefers_bf16() and precision.cpu_prefers_bf16()
    assert calls == [2.0]  # once per process
    cached = json.loads((tmp_path / precision.CACHE_FILE).read_text())
    assert list(cached.values()) == [2.0] and "torch" in next(iter(cached))
    monkeypatch.setattr(precision, "_speedups", {})  # a new process reads the file, no probe
    assert precision.cpu_prefers_bf16() and calls == [2.0]


def test_no_bf16_support_means_fp32_without_probing(auto, monkeypatch):
    calls = auto(9.0)
    monkeypatch.setattr(precision, "_bf16_supported", lambda: False)
    assert precision.resolve_dtype("cpu") == torch.float32 and calls == []


def test_environment_pins_the_cpu_choice(auto, monkeypatch):
    calls = auto(9.0)
    monkeypatch.setenv("LLARA_CPU_DTYPE", "float32")
    assert precision.resolve_dtype("cpu") == torch.float32
    monkeypatch.setenv("LLARA_CPU_DTYPE", "bf16")
    assert precision.resolve_dtype("cpu") == torch.bfloat16 and calls == []
    monkeypatch.setenv("LLARA_CPU_DTYPE", "float16")
    with pytest.raises(ValueError, match="LLARA_CPU_DTYPE"):
        precision.resolve_dtype("cpu")


def test_real_probe_is_a_ratio():
    assert precision._probe(n=64, repeats=1) > 0


def test_training_kernels_follow_the_attention_probe(auto, monkeypatch, tmp_path):
    """bf16 training on a CPU uses the math attention only where the probe measured it faster."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    calls = []
    monkeypatch.setattr(precision, "_attention_probe", lambda: calls.append(1) or 2.0)
    monkeypatch.setattr(precision, "_fp32_attention_probe", lambda: 0.9)  # fp32 measured slower: not used

    def backend_used() -> SDPBackend:
        q = torch.randn(1, 2, 8, 16, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        # the fused CPU kernel is one autograd node; the math path is a chain of matmul/softmax nodes
        return SDPBackend.MATH if "Flash" not in type(out.grad_fn).__name__ else SDPBackend.FLASH_ATTENTION

    with precision.training_kernels("bf16", on_cpu=True):
        assert backend_used() == SDPBackend.MATH
    assert backend_used() == SDPBackend.FLASH_ATTENTION  # restored after the context
    with precision.training_kernels("fp32", on_cpu=True):
        assert backend_used() == SDPBackend.FLASH_ATTENTION
    with precision.training_kernels("bf16", on_cpu=False):
        assert backend_used() == SDPBackend.FLASH_ATTENTION
    assert calls == [1]  # probed once, then memoised

    monkeypatch.setattr(precision, "_speedups", {})
    monkeypatch.setattr(precision, "_attention_probe", lambda: 0.8)
    monkeypatch.setenv("LLARA_CACHE", str(tmp_path / "other"))
    with precision.training_kernels("bf16", on_cpu=True):
        assert backend_used() == SDPBackend.FLASH_ATTENTION  # fused kernel measured faster: kept


def test_real_attention_probe_is_a_ratio():
    assert precision._attention_probe(repeats=1) > 0


def _sdpa_dtypes(model, ids, monkeypatch) -> list:
    """The dtype each SDPA call of one forward of ``model`` computes in: autocast's where it is on
    (it casts the inputs), else the inputs' (query, key, value)."""
    import torch.nn.functional as F

    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.append((torch.get_autocast_dtype("cpu"),) * 3 if on else (q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(input_ids=ids)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    return seen


def test_bf16_training_runs_the_attention_in_fp32_where_measured_faster(auto, monkeypatch):
    """Where the probe measured the fused kernel in fp32 faster, bf16 training's attention runs in
    fp32 (the projections stay bf16 under autocast), and only inside the context."""
    from tiny import make_model
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setattr(precision, "_fp32_attention_probe", lambda: 1.5)
    monkeypatch.setattr(precision, "_attention_probe", lambda: pytest.fail("the math probe is not needed"))
    model, ids = make_model("llama", seed=0), torch.tensor([[5, 6, 7, 8, 9, 10]])
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    fp32, bf16 = (torch.float32,) * 3, (torch.bfloat16,) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert set(_sdpa_dtypes(model, ids, monkeypatch)) == {bf16}
        with precision.training_kernels("bf16", on_cpu=True):
            assert set(_sdpa_dtypes(model, ids, monkeypatch)) == {fp32}
            with torch.autocast("cpu", enabled=False):  # no autocast: the attention as it was
                assert set(_sdpa_dtypes(model, ids, monkeypatch)) == {fp32}
            out = model(input_ids=ids).logits
        assert set(_sdpa_dtypes(model, ids, monkeypatch)) == {bf16}  # restored
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    ref = model(input_ids=ids).logits  # fp32 throughout
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    with pytest.raises(RuntimeError, match="boom"), precision.cpu_fp32_attention():
        raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original


def test_fp32_attention_keeps_a_registered_override(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def mine(*args, **kwargs):
        return None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = mine
    try:
        with precision.cpu_fp32_attention():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not mine
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


def test_real_fp32_attention_probe_is_a_ratio():
    assert precision._fp32_attention_probe(repeats=1) > 0
