"""Choose the compute precision at run time, from what the hardware does fastest.

* GPU: bf16 where the device supports it, else fp16.
* CPU: bf16 where the CPU's matrix units run bf16 faster than fp32 (Intel AMX, AVX512-BF16 on recent
  Xeons and EPYCs), fp32 otherwise. Whether they do is *measured*, not guessed from a CPU name: a
  micro-benchmark of a few milliseconds (one 1024-cube matmul in each precision, best of a few,
  interleaved so both see the same load) runs once per CPU model and torch version, and its result
  is cached in ``$LLARA_CACHE/precision.json``. A CPU without bf16 support in oneDNN is fp32 without
  measuring anything.

Training on a CPU in bf16 also picks the attention kernel by measurement: PyTorch's fused CPU
flash-attention backward is slower in bf16 than in fp32 on some CPUs (2x on a Zen 4 EPYC), where the
plain "math" attention (matmuls + softmax, which autograd differentiates) is faster. A second
probe of the same kind (one bf16 attention forward + backward with each kernel) decides, cached
beside the first; ``training_kernels`` applies the choice.

Explicit choices always win (``--dtype``, ``--precision``); ``LLARA_CPU_DTYPE=float32|bfloat16``
pins the CPU choice for a whole process tree (the test suite pins fp32 so that its equivalence
checks stay exact). The choice is logged once per process.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from ..io import cache_root, write_json

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "cpu_bf16_speedup", "cpu_prefers_bf16", "cpu_math_attention_speedup", "parse_dtype",
           "resolve_dtype", "resolve_precision", "training_kernels"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ENV = "LLARA_CPU_DTYPE"
CACHE_FILE = "precision.json"
# bf16 must beat fp32 by this factor on the probe: below it, rounding is not worth a marginal gain.
MIN_SPEEDUP = 1.3
# The math attention must beat the fused kernel's bf16 forward + backward by this factor to be used.
MIN_ATTENTION_SPEEDUP = 1.1
_logged: set[str] = set()
_speedups: dict[str, float] = {}


def parse_dtype(dtype: "torch.dtype | str | None") -> torch.dtype | None:
    """A torch dtype from a name ('bf16', 'float32', ...); None and 'auto' give None (choose later)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto or one of {sorted(DTYPES)}") from None


def cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo`` (e.g. "model name", "flags"); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, or the platform's processor / machine name where it is not known."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_key() -> str:
    return f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _probe(n: int = 1024, repeats: int = 4) -> float:
    """fp32 time / bf16 time of an n-cube matmul (best of ``repeats``, interleaved)."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    with torch.inference_mode():
        torch.mm(a32, b32), torch.mm(a16, b16)  # warm-up: thread pool, oneDNN kernels
        for _ in range(repeats):
            for a, b in ((a32, b32), (a16, b16)):
                t = time.perf_counter()
                torch.mm(a, b)
                best[a.dtype] = min(best[a.dtype], time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]


def _bf16_supported() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cached_probe(key: str, probe) -> float:
    """``probe()`` once per key: memoised in the process and cached in ``$LLARA_CACHE/precision.json``."""
    if key in _speedups:
        return _speedups[key]
    path = cache_root() / CACHE_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    value = cached.get(key)
    if not isinstance(value, (int, float)):
        value = round(probe(), 3)
        cached[key] = value
        try:
            write_json(path, cached)
        except OSError as e:  # a read-only cache only costs the probe again next time
            log.debug("cannot cache the precision probe in %s: %s", path, e)
    _speedups[key] = float(value)
    return float(value)


def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (0.0: no bf16 support).

    Measured once per CPU model, torch version and thread count, then read from the cache."""
    if not _bf16_supported():
        return 0.0
    return _cached_probe(_cpu_key(), _probe)


def _attention_probe(repeats: int = 3) -> float:
    """Fused-kernel time / math time of one causal bf16 attention forward + backward (a training
    batch's shape: 8 x 9 heads x 128 tokens x 64), best of ``repeats``, interleaved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(8, 9, 128, 64, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    best = {SDPBackend.FLASH_ATTENTION: float("inf"), SDPBackend.MATH: float("inf")}
    for i in range(repeats + 1):  # the first round warms up
        for backend in best:
            with sdpa_kernel([backend]):
                t = time.perf_counter()
                torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
                if i:
                    best[backend] = min(best[backend], time.perf_counter() - t)
    return best[SDPBackend.FLASH_ATTENTION] / best[SDPBackend.MATH]


def cpu_math_attention_speedup() -> float:
    """How many times faster the math attention trains in bf16 than the fused CPU kernel (cached)."""
    if not _bf16_supported():
        return 0.0
    return _cached_probe(_cpu_key() + "|attention bf16 fwd+bwd, fused / math", _attention_probe)


def training_kernels(precision: str, on_cpu: bool):
    """A context for the training loop: on a CPU in bf16, the math attention where it was measured
    faster than the fused kernel (see the module docstring); otherwise nothing changes."""
    from contextlib import nullcontext

    if not on_cpu or precision != "bf16":
        return nullcontext()
    speedup = cpu_math_attention_speedup()
    if speedup < MIN_ATTENTION_SPEEDUP:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "attention" not in _logged:
        _logged.add("attention")
        log.info("attention: math kernel for bf16 training on this CPU (forward + backward %.1fx the fused one)",
                 speedup)
    return sdpa_kernel([SDPBackend.MATH])


def cpu_prefers_bf16() -> bool:
    """True where bf16 is the faster CPU precision (``LLARA_CPU_DTYPE`` overrides the measurement)."""
    forced = os.environ.get(ENV, "auto").strip().lower()
    if forced not in ("", "auto"):
        dtype = parse_dtype(forced)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{ENV}={forced!r}: use auto, float32 or bfloat16")
        return dtype == torch.bfloat16
    return cpu_bf16_speedup() >= MIN_SPEEDUP


def _log_once(device: torch.device, dtype: torch.dtype, why: str) -> None:
    key = f"{device.type}:{dtype}"
    if key not in _logged:
        _logged.add(key)
        log.info("precision: %s on %s (%s)", str(dtype).replace("torch.", ""), device.type, why)


def _cpu_reason() -> str:
    forced = os.environ.get(ENV, "auto").strip().lower()
    if forced not in ("", "auto"):
        return f"{ENV}={forced}"
    speedup = cpu_bf16_speedup()
    if speedup == 0.0:
        return "no bf16 support in oneDNN on this CPU"
    return f"bf16 matmul {speedup:.1f}x fp32 on this CPU; bf16 needs >= {MIN_SPEEDUP}x; --dtype overrides"


def resolve_dtype(device: "torch.device | str", dtype: "torch.dtype | str | None" = None) -> torch.dtype:
    """The dtype to load weights in for inference: the one given, else the fastest for ``device``."""
    device = torch.device(device)
    chosen = parse_dtype(dtype)
    if chosen is not None:
        return chosen
    if device.type == "cuda":
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        _log_once(device, chosen, "GPU")
    elif device.type == "cpu":
        chosen = torch.bfloat16 if cpu_prefers_bf16() else torch.float32
        _log_once(device, chosen, _cpu_reason())
    else:
        chosen = torch.float32
    return chosen


def resolve_precision(precision: str, on_cpu: bool) -> str:
    """Training precision 'bf16' or 'fp32' (bf16 = autocast over fp32 master weights)."""
    if precision != "auto":
        return precision
    if not on_cpu:
        ok = torch.cuda.is_bf16_supported()
        _log_once(torch.device("cuda"), torch.bfloat16 if ok else torch.float32, "GPU training")
        return "bf16" if ok else "fp32"
    bf16 = cpu_prefers_bf16()
    _log_once(torch.device("cpu"), torch.bfloat16 if bf16 else torch.float32, _cpu_reason() + " (training: autocast)")
    return "bf16" if bf16 else "fp32"
