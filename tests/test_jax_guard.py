"""bm25s imports JAX (when installed) and runs ``jax.lax.top_k`` at import time; JAX then preallocates
75% of every visible GPU. llara must have JAX kept on the CPU without preallocation before that
happens, whichever llara module brings bm25s in. A stand-in ``jax`` package records the environment
it was imported with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llara

STAND_IN = '''
import json, os
_record = os.environ["JAX_STAND_IN_RECORD"]
with open(_record, "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")}) + "\\n")
'''
LAX = '''
import numpy as np

def top_k(x, k):
    x = np.asarray(x)
    idx = np.argsort(-x, axis=-1)[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx
'''

CASES = {
    "stopwords of the adaptation targets": "from llara.data.targets import load_stopwords; load_stopwords('bm25s')",
    "BM25 retrieval": "import llara.retrieval.bm25",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bm25s_never_lets_jax_preallocate_the_gpu(tmp_path: Path, case: str):
    pkg = tmp_path / "site" / "jax"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN + "from . import lax\n")
    (pkg / "lax.py").write_text(LAX)
    record = tmp_path / "record.jsonl"
    src = Path(llara.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(src)]), JAX_STAND_IN_RECORD=str(record))
    code = CASES[case] + "\nimport sys; sys.exit(0 if 'jax' in sys.modules else 3)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # 3: bm25s no longer imports jax: the test must change
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert seen, "the stand-in jax was not imported"
    assert seen[0] == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}


def test_a_users_own_jax_settings_win(tmp_path: Path):
    src = Path(llara.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(src), XLA_PYTHON_CLIENT_PREALLOCATE="true", JAX_PLATFORMS="cuda")
    code = "import os, llara; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], os.environ['JAX_PLATFORMS'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["true", "cuda"], done.stderr[-2000:]
