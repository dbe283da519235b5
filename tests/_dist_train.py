"""Run by test_training_loop.py under ``torchrun --nproc_per_node 2`` (or ``accelerate launch --multi_gpu
--num_processes 2``): trains the tiny model with DDP on gloo (CPU) and writes what each rank saw to
OUT/rank<r>.json. Usage: _dist_train.py OUT [full|lora] [sharded]; ``sharded`` (FSDP / DeepSpeed, launched
with a config from configs/) skips the manual-backward run, which only DDP supports."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from train_helpers import lm_loss, make_loader, make_manual_lm_loss, tiny_setup  # noqa: E402

from llara.training.config import TrainConfig  # noqa: E402
from llara.training.loop import train  # noqa: E402


def run(out: str, mode: str, manual: bool) -> dict:
    model, tok, slot_ids = tiny_setup()
    config = TrainConfig(output_dir=out, max_steps=4, batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=1,
                         save_every=0 if manual else 2, keep_last=1, seed=0, progress=not manual, cpu=True,
                         lora=mode == "lora", lora_r=4, export=not manual)
    loss = make_manual_lm_loss(config.grad_accum) if manual else lm_loss
    result = train(model, tok, make_loader(tok), loss, config, trainable_token_ids=slot_ids)
    from accelerate.state import AcceleratorState

    return {"step": result.step, "last_loss": result.last_loss,
            "distributed_type": str(AcceleratorState().distributed_type),
            "param_types": sorted({type(p).__name__ for p in result.model.parameters()}),
            "launch_env": {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_USE_", "FSDP_"))},
            "weights": {k: float(v.double().sum()) for k, v in result.model.state_dict().items()},
            "checkpoint": str(result.checkpoint) if result.checkpoint else None}


def main(out: str, mode: str, sharded: bool = False) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    info = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), **run(out, mode, manual=False)}
    if not sharded:
        # A loss that runs backward itself (GradCache): the loop averages gradients by hand.
        info["manual"] = run(str(Path(out) / "manual"), mode, manual=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "full", sharded="sharded" in sys.argv[3:])
