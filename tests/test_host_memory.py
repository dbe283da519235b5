"""llara.modeling.host_memory: glibc keeps the memory freed tensors give back, so the next step's tensors
do not page-fault it in again; and it stays out of the way where the user chose otherwise."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from llara.modeling import host_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Minor page faults of allocating, filling and freeing a 64 MiB tensor (the size of an LM head's logits
# over a few hundred positions), four times, after eight warm-up rounds (glibc settles on the blocks it
# reuses within a few); before and after keep_freed_memory().
PROBE = textwrap.dedent("""
    import json, resource, torch
    from llara.modeling.host_memory import keep_freed_memory

    def faults():
        for _ in range(8):  # warm-up rounds: the heap grows to what the pattern needs
            torch.ones(16 * 2**20).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            torch.ones(16 * 2**20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    plain = faults()
    applied = keep_freed_memory()
    print(json.dumps({"plain": plain, "applied": applied, "kept": faults()}))
""")


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("LLARA_MALLOC", "MALLOC_MMAP_MAX_",
                                                              "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    out = _probe()
    if out["plain"] < 1_000:
        pytest.skip(f"fresh blocks are backed by huge pages here (transparent huge pages 'always'): {out}")
    # 4 x 64 MiB of 4 KiB pages: 65,536 faults when every block is a fresh mmap.
    assert out["plain"] > 60_000, out
    assert out["applied"] is True
    assert out["kept"] < out["plain"] / 20, out


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_user_can_keep_the_system_allocator():
    out = _probe(LLARA_MALLOC="system")
    assert out["applied"] is False
    if out["plain"] >= 1_000:  # else huge pages hide the faults (see above)
        assert out["kept"] > 60_000, out


@pytest.mark.parametrize("env, why", [
    ({"LLARA_MALLOC": "system"}, "LLARA_MALLOC=system"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "another allocator is preloaded"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "set by the user (MALLOC_TRIM_THRESHOLD_)"),
])
def test_left_alone_where_the_user_chose(monkeypatch, env, why):
    for k in ("LLARA_MALLOC", "LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if not GLIBC:
        assert host_memory._why_not() == "not glibc" or why.split()[0] in host_memory._why_not()
        return
    assert why in host_memory._why_not()


def test_training_on_a_cpu_keeps_freed_memory(tmp_path, monkeypatch, caplog):
    """The training loop applies it on a CPU (one tiny step; the log says what was done)."""
    import logging

    from train_helpers import lm_loss, make_loader, tiny_setup

    from llara.training.config import TrainConfig
    from llara.training.loop import train

    calls = []
    real = host_memory.keep_freed_memory
    monkeypatch.setattr("llara.training.loop.keep_freed_memory", lambda: calls.append(1) or real())
    monkeypatch.setattr(host_memory, "_state", {})
    model, tok, slots = tiny_setup()
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, save_every=0, progress=False, seed=0)
    with caplog.at_level(logging.INFO, logger="llara.modeling.host_memory"):
        train(model, tok, make_loader(tok), lm_loss, cfg, trainable_token_ids=slots)
    assert calls == [1]
    assert any("host memory:" in r.getMessage() for r in caplog.records)
