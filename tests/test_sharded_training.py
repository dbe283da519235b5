"""configs/accelerate_fsdp.yaml starts 2 processes on CPU, and LLaRA adaptation sharded with PyTorch FSDP2
over gloo equals the unsharded run. DeepSpeed is not tested (not installed: PyPI ships it as a source
package only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_training_loop import _free_port

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "configs"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp2_gloo_equals_one_process(tmp_path):
    """fully_shard per decoder layer + the loop's LossModule as root (accelerate's FSDP2 wrapping):
    the joint SELF + NEXT pass and the LLaRA loss train the same weights as without sharding."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(TESTS / "_fsdp_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = _ranks(tmp_path)
    assert [r["world"] for r in sharded] == [2, 2] and sharded[0]["param_types"] == ["DTensor"]
    sys.path.insert(0, str(TESTS))
    from _fsdp_train import STEPS, run

    alone = run(shard=False)
    for r in sharded:
        assert len(r["losses"]) == STEPS and r["losses"] == pytest.approx(alone["losses"], rel=1e-5)
        assert r["weights"] == pytest.approx(alone["weights"], rel=1e-5, abs=1e-6)
    assert alone["losses"][1] != pytest.approx(alone["losses"][0])  # the steps changed the weights


def test_accelerate_fsdp_config_starts_on_cpu(tmp_path):
    """``accelerate launch --config_file configs/accelerate_fsdp.yaml`` parses the config, passes its FSDP
    settings to 2 processes that train with llara's loop. Without an accelerator, accelerate turns FSDP
    into plain data parallelism over gloo (MULTI_CPU): the sharded step is covered by the test above."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate_fsdp.yaml"),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(TESTS / "_dist_train.py"), str(tmp_path), "full", "sharded"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = _ranks(tmp_path)
    assert [i["world"] for i in infos] == [2, 2] and [i["step"] for i in infos] == [4, 4]
    env = infos[0]["launch_env"]
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert infos[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert infos[0]["weights"] == pytest.approx(infos[1]["weights"], rel=1e-6, abs=1e-7)
    assert (tmp_path / "final" / "model.safetensors").is_file()
