import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # any download is a bug
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Exact equivalence checks need fp32; the automatic choice is tested on its own (test_precision.py).
os.environ["LLARA_CPU_DTYPE"] = "float32"
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LLARA_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: loads the embedded model; set LLARA_SLOW=1 or use -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Tiny models run many times faster on one thread than with OpenMP threads fighting over 2 shared
# cores; the slow tests with the real model set their own.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def adi_dir():
    d = SHARED_DATA / "adi"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d
