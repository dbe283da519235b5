"""Quiet by default: `llara recipe --no-progress` prints llara's own lines only, not transformers' load
reports or weight-loading / shard-writing progress bars; `-v` shows them.

The command runs in a fresh process, as a user runs it: whether a library is quiet depends on what it
had imported and configured before llara set it up, which in-process tests (sharing one interpreter
with every other test) cannot reproduce."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer

from llara.modeling.encoder import Encoder

SRC = Path(__file__).resolve().parents[1] / "src"
# what the libraries below llara print when left alone (seen on `llara recipe` before the fix)
THIRD_PARTY = ["LOAD REPORT", "UNEXPECTED", "Loading weights", "Writing model shards"]
TQDM_BAR = re.compile(r"\d+%\|")


def _recipe(tmp_path: Path, adi_dir: Path, out: str, *flags: str) -> subprocess.CompletedProcess:
    model = tmp_path / "base"
    if not model.is_dir():
        Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False).save(model)
        pairs = tmp_path / "pairs"
        shutil.copytree(adi_dir, pairs)
        (pairs / "qrels" / "train.tsv").write_text((pairs / "qrels" / "test.tsv").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LLARA_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "llara.cli", *flags, "recipe", "--corpus", str(adi_dir / "corpus.jsonl"),
           "--model", str(model), "--pairs", str(tmp_path / "pairs"), "--output", str(tmp_path / out),
           "--adapt-steps", "2", "--adapt-batch-size", "2", "--chunk-tokens", "16", "--finetune-steps", "2",
           "--batch-size", "2", "--negatives", "3", "--window", "2", "20", "--max-passage-length", "48",
           "--device", "cpu", "--dtype", "float32", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_recipe_no_progress_prints_only_llaras_lines_and_verbose_shows_the_rest(tmp_path, adi_dir):
    quiet = _recipe(tmp_path, adi_dir, "quiet")
    text = quiet.stdout + quiet.stderr
    assert [s for s in THIRD_PARTY if s in text] == [] and not TQDM_BAR.search(text), quiet.stderr
    assert "4/4 index:" in quiet.stdout and "done in" in quiet.stdout  # llara's own lines are there
    # the same command with -v: the libraries' reports and bars are back (so the capture above sees them)
    loud = _recipe(tmp_path, adi_dir, "loud", "-v")
    assert all(s in loud.stderr for s in THIRD_PARTY) and TQDM_BAR.search(loud.stderr), loud.stderr
