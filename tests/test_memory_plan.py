"""Memory plans (training/memory.py): the estimate against a measured GPU run, the automatic
gradient-checkpointing and GradCache choices, and peak memory in every training log line."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from llara.training.memory import GiB, MemoryPlan, budget_bytes, choose_chunk, peak_memory_gb, plan_for


class _Shape(nn.Module):
    """A model's config and parameter count on the meta device (the plan reads shapes, not weights)."""

    def __init__(self, n_params: int, dtype=torch.bfloat16, **config):
        super().__init__()
        self.config = type("Config", (), config)()
        self.w = nn.Parameter(torch.empty(n_params, dtype=dtype, device="meta"))


LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)


def _plan_7b(budget_gb: float) -> MemoryPlan:
    # memory_gb is given, so nothing asks a GPU; "cuda" selects the GPU policy (bf16 base and activations).
    return plan_for(_Shape(6_738_415_616, **LLAMA2_7B), "cuda", precision="bf16", lora=True, memory_gb=budget_gb)


@pytest.mark.parametrize("batch, measured_gib", [(8, 45.5), (16, 75.7)])
def test_estimate_is_above_and_near_the_measured_h200_peak(batch, measured_gib):
    # LLaMA-2-7B shape, LoRA r64, bf16, 8 and 16 x 510 tokens, no checkpointing: 45.5 / 75.7 GiB peak
    # on an H200 (../shared/docs/GPU.md).
    need = _plan_7b(140).need(batch * 510, 510, checkpointing=False) / GiB
    assert measured_gib <= need <= 1.3 * measured_gib


def test_checkpointing_only_when_the_step_does_not_fit():
    plan = _plan_7b(128)
    assert plan.checkpointing(8 * 510, 510) is False  # an H200 needs none at batch 8
    assert plan.checkpointing(64 * 510, 510) is True
    assert plan.checkpointing(64 * 510, 510, requested=False) is False  # asked for: kept
    with_ckpt = plan.need(64 * 510, 510, checkpointing=True)
    assert with_ckpt < plan.need(64 * 510, 510, checkpointing=False) / 4


def test_plan_for_reads_the_model_shape_and_the_precision():
    model = _Shape(1000, dtype=torch.float32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    cpu_bf16 = plan_for(model, "cpu", precision="bf16", lora=True, memory_gb=1)
    fp32 = plan_for(model, "cpu", precision="fp32", lora=False, memory_gb=1)
    assert (cpu_bf16.layers, cpu_bf16.hidden, cpu_bf16.intermediate, cpu_bf16.heads) == (3, 64, 128, 4)
    # calibrated on this CPU (memory.py's docstring): LoRA 4.7 bytes per element, its GradCache chunks 6.0
    assert cpu_bf16.budget == GiB and cpu_bf16.act_bytes == 4.7 and fp32.act_bytes == 5.5
    assert cpu_bf16.chunk_factor * cpu_bf16.act_bytes == pytest.approx(6.0) and fp32.chunk_factor == 1.0
    assert fp32.fixed == 1000 * 16  # weights, gradients, two AdamW states in fp32


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)


def test_cpu_plan_of_the_recipe_step_follows_the_precision():
    # llara recipe's step, 8 queries of 64 tokens + 16 passages of 96, LoRA on the embedded model: measured
    # 6.19 GiB peak under bf16 autocast, 6.12 GiB in fp32 padded, 6.76 packed (memory.py's docstring). The
    # default budget is 7 GiB.
    model = _Shape(134_515_008, dtype=torch.float32, **SMOLLM2_135M)
    bf16 = plan_for(model, "cpu", precision="bf16", lora=True, memory_gb=7)
    fp32 = plan_for(model, "cpu", precision="fp32", lora=True, memory_gb=7)
    assert bf16.need(2048, 96, checkpointing=False) / GiB == pytest.approx(6.19, rel=0.05) and bf16.fits(2048, 96, False)
    assert fp32.need(2048, 96, checkpointing=False) / GiB == pytest.approx(6.76, rel=0.05)
    assert fp32.need(2048, 96, checkpointing=False) / GiB >= 6.76  # never under the measured peak
    assert fp32.fits(2048, 96, False) and choose_chunk(fp32, 24, 96, 2048) == 0  # the whole step
    small = plan_for(model, "cpu", precision="fp32", lora=True, memory_gb=5)  # a smaller budget: GradCache
    chunk = choose_chunk(small, 24, 96, 2048)
    assert chunk >= 1 and small.fits(chunk * 96, 96, False, chunked=True)


def test_chunk_is_plain_when_it_fits_else_the_largest_power_of_two():
    plan = _plan_7b(80)
    seq = 160
    assert choose_chunk(plan, 8, seq, 8 * seq) == 0  # 8 sequences fit: a plain step
    whole = 16 * 64 + 16 * 16 * seq  # the README's batch 16 x group 16
    chunk = choose_chunk(plan, 16 + 256, seq, whole)
    assert chunk & (chunk - 1) == 0 and plan.fits(chunk * seq, seq, False)
    assert not plan.fits(2 * chunk * seq, seq, False)
    tiny = MemoryPlan(budget=1, fixed=10, hidden=8, layers=1, heads=1, intermediate=8, act_bytes=2, lora=False,
                      math_attention=False)
    assert choose_chunk(tiny, 4, 16, 64) == 1  # nothing fits: the smallest chunk


def test_budget_defaults():
    assert budget_bytes("cpu", 2.5) == int(2.5 * GiB)
    assert 0 < budget_bytes("cpu") <= 7 * GiB
    assert peak_memory_gb("cpu") > 0


def test_finetune_picks_grad_cache_under_a_small_budget_and_logs_peak_memory(tmp_path, caplog):
    from tiny import make_model, make_tokenizer

    from llara.training.config import TrainConfig
    from llara.training.finetune import FinetuneConfig, finetune

    data = tmp_path / "train.jsonl"
    rows = [{"query": f"query {i} about salt", "pos": [f"passage {i} on blood pressure and salt"],
             "neg": [f"other text {i}", "unrelated words"]} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    # A budget below the weights of even this tiny model: the plain step cannot fit.
    train_cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-3, save_every=0,
                            export=False, progress=False, lora=True, lora_r=4, memory_gb=1e-6, precision="fp32")
    with caplog.at_level(logging.INFO, logger="llara"):
        res = finetune("tiny", str(data), train_cfg, FinetuneConfig(group_size=3), model=model, tokenizer=tok)
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]
    # one line for the whole plan: GradCache's chunk and the checkpointing decision
    assert len(plans) == 1 and "GradCache, chunks of 1 sequences, gradient checkpointing" in plans[0], plans
    rows = [json.loads(line) for line in res.log_path.read_text().splitlines()]
    assert all(r["peak_memory_gb"] > 0 for r in rows)
