"""Choose the compute precision at run time, from what the hardware does fastest.

* GPU: bf16 where the device supports it, else fp16.
* CPU: bf16 where the CPU's matrix units run bf16 faster than fp32 (Intel AMX, AVX512-BF16 on recent
  Xeons and EPYCs), fp32 otherwise. Whether they do is *measured*, not guessed from a CPU name: a
  micro-benchmark of a few milliseconds (one 1024-cube matmul in each precision, best of a few,
  interleaved so both see the same load) runs once per CPU model and torch version, and its result
  is cached in ``$LLARA_CACHE/precision.json``. A CPU without bf16 support in oneDNN is fp32 without
  measuring anything.

Training on a CPU in bf16 (autocast) also picks the attention by measurement. PyTorch's fused CPU
flash-attention backward is slower in bf16 than in fp32 on some CPUs (2x on a Zen 4 EPYC; forward +
backward 1.9x on a 2-core Xeon with AMX), where the plain "math" attention (matmuls + softmax, which autograd
differentiates) in bf16 is faster. Faster still where measured so far: the fused kernel in fp32,
the projections staying bf16 (:func:`cpu_fp32_attention`; also the more exact of the three). A
probe times one attention forward + backward of a packed training batch's shape each way and
caches the answer beside the first; ``training_kernels`` applies the choice.

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
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io import cache_root, write_json

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "cpu_bf16_speedup", "cpu_fp32_attention", "cpu_fp32_attention_speedup", "cpu_prefers_bf16",
           "cpu_math_attention_speedup", "cpu_training_attention", "parse_dtype", "resolve_dtype", "resolve_precision", "training_kernels"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ENV = "LLARA_CPU_DTYPE"
CACHE_FILE = "precision.json"
# bf16 must beat fp32 by this factor on the probe: below it, rounding is not worth a marginal gain.
MIN_SPEEDUP = 1.3
# The bf16 math attention must beat the fused bf16 kernel (forward + backward) by this factor to be used.
MIN_ATTENTION_SPEEDUP = 1.1
# The fused kernel in fp32 is used where it is not slower than the faster bf16 kernel: it is also the
# more exact (on the 2-core AMX Xeon the probe read 1.01-1.23, the recipe's step gained 4%).
MIN_FP32_ATTENTION_SPEEDUP = 1.0
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


def _best_times(runs: dict, repeats: int) -> dict:
    """The best time of each of ``runs`` (name -> callable) over ``repeats`` rounds, interleaved so that
    all see the same load, after one warm-up round (thread pool, oneDNN kernels)."""
    best = dict.fromkeys(runs, float("inf"))
    for i in range(repeats + 1):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def _probe(n: int = 1024, repeats: int = 4) -> float:
    """fp32 time / bf16 time of an n-cube matmul (best of ``repeats``, interleaved)."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    with torch.inference_mode():
        best = _best_times({"fp32": lambda: torch.mm(a32, b32), "bf16": lambda: torch.mm(a16, b16)}, repeats)
    return best["fp32"] / best["bf16"]


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

    def run(backend):
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()

    best = _best_times({b: lambda b=b: run(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}, repeats)
    return best[SDPBackend.FLASH_ATTENTION] / best[SDPBackend.MATH]


def cpu_math_attention_speedup() -> float:
    """How many times faster the math attention trains in bf16 than the fused CPU kernel (cached)."""
    if not _bf16_supported():
        return 0.0
    return _cached_probe(_cpu_key() + "|attention bf16 fwd+bwd, fused / math", _attention_probe)


def _fp32_attention_probe(repeats: int = 3) -> float:
    """Time of the faster bf16 attention (fused kernel or math) / time of the fused kernel in fp32
    (inputs cast up, output cast back: what :func:`cpu_fp32_attention` adds), one forward + backward
    of a packed training batch's shape (20 rows x 9 heads x 96 tokens x 64, two texts per row, an
    additive mask), best of ``repeats``, interleaved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .masks import additive_mask

    sdpa = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(20, 9, 96, 64, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    text = torch.arange(96) // 48  # two texts per row, each causal
    blocked = (text[:, None] != text[None, :]).expand(20, 96, 96)
    mask = additive_mask(torch.ones(20, 96, dtype=torch.bool), blocked, torch.bfloat16)

    def bf16(backend):
        with sdpa_kernel([backend]):
            sdpa(*leaves, attn_mask=mask).sum().backward()

    def fp32():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            sdpa(*(x.float() for x in leaves), attn_mask=mask.float()).bfloat16().sum().backward()

    best = _best_times({"fused bf16": lambda: bf16(SDPBackend.FLASH_ATTENTION),
                        "math bf16": lambda: bf16(SDPBackend.MATH), "fused fp32": fp32}, repeats)
    return min(best["fused bf16"], best["math bf16"]) / best["fused fp32"]


def cpu_fp32_attention_speedup() -> float:
    """How many times faster bf16 training's attention runs as the fused kernel in fp32 than the
    faster bf16 kernel on this CPU (cached; 0.0 without bf16 support)."""
    if not _bf16_supported():
        return 0.0
    return _cached_probe(_cpu_key() + "|attention bf16 training fwd+bwd, best bf16 / fused fp32",
                         _fp32_attention_probe)


@contextmanager
def cpu_fp32_attention():
    """Within: transformers' SDPA attention, called on a CPU under autocast, runs in fp32 (autocast
    off for it, query, key, value and a float mask cast to fp32): the fused kernel, which is faster
    in fp32 than in bf16 on a CPU, while the projections around it keep running in bf16. Elsewhere
    (another device, no autocast, fp32 already) it calls the attention as it was.

    The model code is stock: the context swaps the ``"sdpa"`` entry of transformers' attention
    registry (``ALL_ATTENTION_FUNCTIONS``, its documented extension point) for a wrapper of the one
    it finds, and puts that back on exit. Models that run another attention (eager) are unaffected."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            return inner(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
        if ALL_ATTENTION_FUNCTIONS.get("sdpa") is not inner:  # it was an entry of its own
            ALL_ATTENTION_FUNCTIONS["sdpa"] = inner


def cpu_training_attention() -> str:
    """The attention bf16 training runs on this CPU, by the cached probes (see the module docstring):
    "fused fp32" (:func:`cpu_fp32_attention`), else "math bf16" where it beats the fused kernel, else
    "fused bf16"."""
    if cpu_fp32_attention_speedup() >= MIN_FP32_ATTENTION_SPEEDUP:
        return "fused fp32"
    return "math bf16" if cpu_math_attention_speedup() >= MIN_ATTENTION_SPEEDUP else "fused bf16"


def training_kernels(precision: str, on_cpu: bool):
    """A context for the training loop: on a CPU in bf16, the attention :func:`cpu_training_attention`
    chose; otherwise nothing changes."""
    from contextlib import nullcontext

    if not on_cpu or precision != "bf16":
        return nullcontext()
    chosen = cpu_training_attention()
    if chosen != "fused bf16" and "attention" not in _logged:
        _logged.add("attention")
        speedup = cpu_fp32_attention_speedup() if chosen == "fused fp32" else cpu_math_attention_speedup()
        log.info("attention: %s for bf16 training on this CPU (forward + backward %.1fx the kernel it replaces)",
                 chosen, speedup)
    if chosen == "fused fp32":
        return cpu_fp32_attention()
    if chosen == "math bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


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
