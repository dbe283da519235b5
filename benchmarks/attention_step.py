"""bf16 training's attention on a CPU: a training step with the attention ``training_kernels`` picks
against the math kernel in bf16 (what it picked before the fp32 option), alternating in one process.

* ``finetune``: one packed batch of ``llara recipe``'s step (8 queries x 2 passages of 96 tokens from
  the groups ``benchmarks/cpu_train.py`` writes to /tmp/llara-cpu-train/train.jsonl), forward +
  backward of ``embed`` with LoRA r 64 and dropout 0.1 on the embedded model;
* ``pretrain``: one adaptation step of ``llara pretrain``'s shape (8 pairs of 128-token chunks of the
  demo corpus, the joint SELF + NEXT pass with LLaRA's 4D mask, EBAE + EBAR + LM loss, full
  fine-tuning), forward + backward.

Both under bf16 autocast over fp32 weights, as the training loop runs them; seconds per step, the
first pair dropped. Also prints the probe's ratio (``_fp32_attention_probe``: faster bf16 kernel /
fused kernel in fp32) and which attention ``training_kernels`` chose on this CPU.

    .venv/bin/python benchmarks/attention_step.py finetune 9
    .venv/bin/python benchmarks/attention_step.py pretrain 7
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llara.modeling import precision
from llara.modeling.host_memory import keep_freed_memory
from llara.modeling.loading import ensure_slot_tokens, load_model
from llara.prompts import get_template

ROOT = Path(__file__).resolve().parents[1]
which = sys.argv[1] if len(sys.argv) > 1 else "finetune"
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 9
keep_freed_memory()
torch.manual_seed(0)


def finetune_step():
    from llara.modeling.embed import embed
    from llara.training.contrastive import ContrastiveCollator, load_groups
    from llara.training.lora import apply_lora

    model, tok, _ = load_model("default", causal_lm=False, dtype=torch.float32)
    ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
    pm = apply_lora(model, r=64, alpha=16, dropout=0.1, trainable_token_ids=list(range(100, 116))).train()
    groups = load_groups("/tmp/llara-cpu-train/train.jsonl", group_size=2)
    batch = ContrastiveCollator(tok, "llara", group_size=2, max_passage_length=96, packing=True)(groups[0:8])["passes"][0]

    def loss():
        e = embed(pm, batch)
        return (e[:8].float() @ e[8:].float().T).sum()
    return pm, loss


def pretrain_step():
    from llara.data.collator import PretrainCollator
    from llara.training.pretrain import PretrainLossConfig, make_loss_fn

    model, tok, _ = load_model("default", causal_lm=True, dtype=torch.float32)
    ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
    model.train()
    corpus = ROOT / "src" / "llara" / "data" / "demo" / "med" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.open()]
    ids = [t for t in (tok(x, add_special_tokens=False).input_ids for x in texts) if len(t) >= 256][:8]
    collate = PretrainCollator(tok, "llara", vocab_size=model.get_output_embeddings().weight.shape[0],
                               dtype=torch.bfloat16)
    batch = collate([(t[:128], t[128:256]) for t in ids])
    loss_fn = make_loss_fn(PretrainLossConfig())
    return model, lambda: loss_fn(model, batch)["loss"]


model, loss_of = {"finetune": finetune_step, "pretrain": pretrain_step}[which]()
print("probe now: faster bf16 kernel / fused fp32 = %.2f; cached: %.2f; training_kernels chose: %s"
      % (precision._fp32_attention_probe(), precision.cpu_fp32_attention_speedup(), precision.cpu_training_attention()))
contexts = {"math bf16": lambda: sdpa_kernel([SDPBackend.MATH]),
            "chosen": lambda: precision.training_kernels("bf16", on_cpu=True)}


def step(name):
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16), contexts[name]():
        loss = loss_of()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


print("loss", {name: round(step(name), 4) for name in contexts})
times = {name: [] for name in contexts}
for i in range(pairs):
    for name in (list(contexts) if i % 2 else list(contexts)[::-1]):
        t = time.perf_counter()
        step(name)
        if i >= 1:
            times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print("%-9s median %.3f s:" % (name, statistics.median(ts)), " ".join("%.2f" % t for t in ts))
print("math / chosen, median of the pairs' ratios: %.3f"
      % statistics.median(a / b for a, b in zip(times["math bf16"], times["chosen"])))
