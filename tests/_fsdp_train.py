"""Run by test_training_loop.py under ``torchrun --nproc_per_node 2``: two LLaRA adaptation steps (joint
SELF + NEXT pass, EBAE + EBAR + LM loss) of the tiny model sharded with PyTorch FSDP2 (``fully_shard``
on every decoder layer, then the root, the loop's ``LossModule``: what accelerate does with
configs/accelerate_fsdp.yaml) over gloo on CPU. Writes the losses and the gathered weights to
OUT/rank<r>.json. Usage: _fsdp_train.py OUT"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tiny import SLOTS, make_model, make_tokenizer  # noqa: E402

from llara.data.collator import PretrainCollator  # noqa: E402
from llara.training.loop import LossModule  # noqa: E402
from llara.training.pretrain import PretrainLossConfig, make_loss_fn  # noqa: E402

STEPS = 2


def batch(tok):
    g = torch.Generator().manual_seed(0)
    slot_ids = set(tok.convert_tokens_to_ids(SLOTS))
    words = [i for i in range(4, len(tok)) if i not in slot_ids]
    pairs = [([words[j] for j in torch.randint(len(words), (n,), generator=g).tolist()],
              [words[j] for j in torch.randint(len(words), (n,), generator=g).tolist()]) for n in (9, 14)]
    return PretrainCollator(tok, "llara", vocab_size=len(tok))(pairs)


def run(shard: bool) -> dict:
    """``STEPS`` AdamW steps on one fixed batch; ``shard``: FSDP2 over the initialised process group."""
    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    model.train()
    wrapped = LossModule(model, make_loss_fn(PretrainLossConfig()))
    if shard:
        from torch.distributed.fsdp import fully_shard
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        for module in model.modules():
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module)
        fully_shard(wrapped)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    b = batch(tok)
    losses = []
    for _ in range(STEPS):
        out = wrapped(b)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    return {"losses": losses, "weights": {k: float(v.double().sum()) for k, v in full.items()},
            "param_types": sorted({type(p).__name__ for p in model.parameters()})}


def main(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = {"rank": dist.get_rank(), "world": dist.get_world_size(), **run(shard=True)}
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(info))
    # Both ranks done with every collective before either tears gloo down: a rank that exits while the
    # other still tears down its pairs could abort it ("terminate called without an active exception",
    # seen once in a full test run).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
