"""Keep the memory that tensors free on the host for the next ones (glibc's malloc on Linux).

A CPU training step allocates and frees the same large tensors every step (activations, the LM
head's logits over the vocabulary: 200 MB for 1,000 positions of a 49k vocabulary). glibc's malloc
serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so each step the kernel zero-fills those pages again, one page fault
per 4 KiB, and trims the heap's top as soon as it is free. On a 2-core EPYC that was a quarter of
an adaptation step of the embedded model (10.5 -> 7.9 s per step, 3.5 M -> 1.4 M minor page faults
over five steps, peak RSS +2.5%; ``benchmarks/results/cpu_train_fp32.md``).

``keep_freed_memory()`` tells glibc (``mallopt``) to serve large blocks from its heap
(``M_MMAP_MAX = 0``) and never to trim it (``M_TRIM_THRESHOLD``), so freed memory is reused
without page faults. The cost: the process keeps its high-water mark of heap memory until it
exits, which is what a training or indexing job reaches anyway. It is applied once per process, by
the CPU paths that allocate per step (``llara.training.loop.train`` on a CPU, ``Encoder.encode`` on a
CPU), and only where it is safe to: Linux with glibc, no other allocator preloaded (jemalloc,
tcmalloc, mimalloc), and no ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_MMAP_THRESHOLD_`` set by the user. ``LLARA_MALLOC=system`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

__all__ = ["ENV", "keep_freed_memory"]

ENV = "LLARA_MALLOC"
# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_USER_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_state: dict[str, object] = {}


def _why_not() -> str | None:
    """Why malloc is left alone in this process, or None when it may be tuned."""
    if os.environ.get(ENV, "").lower() in ("system", "default", "off", "0"):
        return f"{ENV}={os.environ[ENV]}"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return f"another allocator is preloaded ({preload})"
    user = [v for v in _USER_VARS if v in os.environ]
    if user:
        return f"set by the user ({', '.join(user)})"
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed tensor memory for reuse (see the module's docstring); True when it does.

    Idempotent and cheap after the first call; logs once what it did or why not."""
    if "applied" in _state:
        return bool(_state["applied"])
    why = _why_not()
    applied = False
    if why is None:
        try:
            libc = ctypes.CDLL(None)
            # mallopt takes an int: -1 is SIZE_MAX once glibc converts it, i.e. never trim.
            applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
        except (OSError, AttributeError) as exc:  # no mallopt in this libc
            why = f"mallopt unavailable ({exc})"
    _state["applied"] = applied
    if applied:
        log.info("host memory: malloc keeps freed memory for reuse (no mmap per large tensor; %s=system to "
                 "turn off)", ENV)
    else:
        log.info("host memory: malloc left as it is (%s)", why or "mallopt refused")
    return applied
