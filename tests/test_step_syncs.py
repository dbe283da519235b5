"""A training step must not wait for the device: no host synchronisation per micro-batch (losses,
token counts and the gradient norm stay on the device and are read once per step, for the log line),
and on a GPU under bf16 no weight is cast to another dtype in a step.

Counted on the CPU with a ``TorchDispatchMode`` that sees every aten op: the ops that make a CUDA
host wait (``_local_scalar_dense`` behind ``.item()``/``bool()``/``int()``, ``nonzero`` behind boolean
indexing, ...) outside data loading, and the ``_to_copy``/``copy_`` ops that read a parameter into
another dtype. Runs of 2 and 4 steps are compared, so set-up and the final checkpoint cancel out.
"""
from __future__ import annotations

import json
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tiny import make_model, make_tokenizer

from llara.training import loop as loop_mod
from llara.training.config import TrainConfig
from llara.training.stream import BatchStream

DEMO = Path(__file__).resolve().parents[1] / "src" / "llara" / "data" / "demo" / "med" / "corpus.jsonl"
# aten ops after which a CUDA host must wait for the device (their result size or value is read).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::is_nonzero", "aten::equal", "aten::allclose",
            "aten::repeat_interleave"}


def _in_transformers_mask_shortcut() -> bool:
    """transformers reads a 2D padding mask back to decide whether SDPA may run with ``is_causal``
    (``masking_utils._ignore_causal_mask_sdpa``): one read per ordinary padded forward pass, inside
    the stock model, which llara does not fork. The joint pass hands it a 4D mask and skips it."""
    return any(f.filename.endswith("masking_utils.py") for f in traceback.extract_stack(limit=12))


class OpCounter(TorchDispatchMode):
    """Counts sync ops (outside ``paused``) and casts of the tensors in ``watched`` (by storage)."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self.casts = 0
        self.paused = 0
        self.watched: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not self.paused:
            if name in SYNC_OPS and not _in_transformers_mask_shortcut():
                self.syncs[name] += 1
            if name in ("aten::_to_copy", "aten::copy_") and self.watched:
                src = args[1] if name == "aten::copy_" else args[0]
                dst_dtype = args[0].dtype if name == "aten::copy_" else kwargs.get("dtype", src.dtype)
                if isinstance(src, torch.Tensor) and dst_dtype != src.dtype and \
                        src.untyped_storage().data_ptr() in self.watched:
                    self.casts += 1
        return func(*args, **kwargs)


def _count(monkeypatch, run) -> OpCounter:
    counter = OpCounter()
    original = BatchStream.next

    def next_batch(self, *a, **kw):  # data loading and collation run on the host: not a device sync
        counter.paused += 1
        try:
            return original(self, *a, **kw)
        finally:
            counter.paused -= 1

    monkeypatch.setattr(BatchStream, "next", next_batch)
    with counter:
        run()
    return counter


def _train_config(out: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_steps=steps, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1,
                       save_every=0, export=False, progress=False, seed=0, precision="fp32", **kw)


def _pretrain(out: Path, steps: int, **kw):
    from llara.data.pretrain import PretrainDataConfig
    from llara.training.pretrain import PretrainLossConfig, pretrain

    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    return pretrain("tiny", [str(DEMO)], _train_config(out, steps, **kw), PretrainDataConfig(chunk_tokens=24),
                    PretrainLossConfig(), model=model, tokenizer=tok)


def _finetune(out: Path, steps: int, chunk: int, **kw):
    from llara.training.finetune import FinetuneConfig, finetune

    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    data = out.parent / "train.jsonl"
    if not data.exists():
        words = "the pressure of the blood in the heart rises with age and salt".split()
        rows = [{"query": " ".join(words[i : i + 3]), "pos": [" ".join(words[i:] + words[:i])],
                 "neg": [" ".join(words[::-1][i:]), " ".join(words[i::2])]} for i in range(8)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(group_size=3, max_query_length=32, max_passage_length=40, grad_cache_chunk=chunk)
    return finetune("tiny", str(data), _train_config(out, steps, **kw), cfg, model=model, tokenizer=tok)


RUNS = {
    "pretrain (EBAE + EBAR + LM)": lambda out, steps: _pretrain(out, steps),
    "pretrain, LoRA": lambda out, steps: _pretrain(out, steps, lora=True, lora_r=4),
    "finetune, plain step": lambda out, steps: _finetune(out, steps, 0, lora=True, lora_r=4),
    "finetune, GradCache": lambda out, steps: _finetune(out, steps, 2, lora=True, lora_r=4),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_one_device_read_per_step_whatever_the_micro_batches(tmp_path, monkeypatch, name):
    counts = {}
    for steps in (2, 4):
        counts[steps] = _count(monkeypatch, lambda: RUNS[name](tmp_path / f"s{steps}", steps)).syncs
    per_step = {op: (counts[4][op] - counts[2][op]) / 2 for op in set(counts[4]) | set(counts[2])}
    per_step = {op: n for op, n in per_step.items() if n}
    # 2 micro-batches per step; the one read is the log line's (`.tolist()` of the reduced metrics,
    # which does not go through _local_scalar_dense): nothing is left per step.
    assert per_step == {}, per_step


def _frozen_weight_casts(device_type: str, **cfg) -> int:
    """Casts of frozen parameters in one bf16 LoRA forward + backward, with the model prepared for
    ``device_type`` (the policy; the step itself runs on this CPU under bf16 autocast)."""
    from llara.data.collator import PretrainCollator
    from llara.training.pretrain import PretrainLossConfig, make_loss_fn
    from llara.training.setup import prepare_model

    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    config = _train_config(Path("unused"), 1, lora=True, lora_r=4, **cfg)
    model = prepare_model(model, config, tok.convert_tokens_to_ids(["<s1>", "<s9>"]), "bf16", device_type)
    coll = PretrainCollator(tok, "llara", vocab_size=model.get_output_embeddings().weight.shape[0],
                            dtype=torch.bfloat16)
    ids = tok("the pressure of the blood in the heart", add_special_tokens=False).input_ids
    batch = coll([(ids, ids[::-1]), (ids[:4], ids[2:])])
    counter = OpCounter()
    counter.watched = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        make_loss_fn(PretrainLossConfig())(model, batch)["loss"].backward()
    return counter.casts


def test_no_weight_is_cast_in_a_gpu_bf16_lora_step():
    assert _frozen_weight_casts("cuda") == 0


def test_the_cast_counter_sees_casts():
    # The CPU policy keeps the base fp32 under bf16 autocast: every product casts its weight.
    assert _frozen_weight_casts("cpu") > 0
