"""Contrastive fine-tuning: loss vs. brute force, GradCache == plain gradients, no duplicate
positives in a batch, 2 processes (gloo) with cross-device negatives == 1 process, doubled batch."""
import dataclasses
import math

import pytest
import torch
import torch.multiprocessing as mp
from tiny import make_model, make_tokenizer

from llara.modeling.loading import ensure_slot_tokens
from llara.prompts import get_template
from llara.modeling.embed import embed
from llara.training.contrastive import (
    ContrastiveCollator,
    Group,
    UniquePositiveBatches,
    contrastive_loss,
    grad_cache_step,
    load_groups,
)

WORDS = "the capital of france is paris fish breathe water river city plant cell blood heart brain".split()


def make_groups(n=8, negs=5, seed=0):
    import random

    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [Group(sent(4), [sent(rng.randint(5, 12))], [sent(rng.randint(3, 14)) for _ in range(negs)]) for _ in range(n)]


def setup_model(seed=0, lora=False):
    tok = make_tokenizer()
    model = make_model("llama", seed=seed)
    ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj", "gate_proj"]))
    model.train()
    return model, tok


def test_loss_matches_brute_force():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    t = 0.05
    total = 0.0
    for i in range(3):
        s = [float(q[i] @ p[j]) / t for j in range(12)]
        total += -(s[i * 4] - math.log(sum(math.exp(x) for x in s)))
    assert contrastive_loss(q, p, t) == pytest.approx(total / 3, rel=1e-5)


def test_no_positive_twice_in_a_batch():
    groups = make_groups(40)
    groups += [Group("dup query", groups[0].pos, ["x"]), Group("dup 2", groups[0].pos, ["y"])]
    sampler = UniquePositiveBatches(groups, batch_size=8, seed=1)
    seen = []
    for batch in sampler:
        pos = [p for i in batch for p in groups[i].pos]
        assert len(pos) == len(set(pos)), batch
        seen += batch
    assert len(seen) == len(set(seen))
    sampler.set_epoch(1)
    assert [b for b in sampler] != [b for b in UniquePositiveBatches(groups, 8, seed=1)]


def test_collator_layout_and_prompts():
    model, tok = setup_model()
    col = ContrastiveCollator(tok, "llara", group_size=4, max_query_length=24, max_passage_length=32)
    groups = make_groups(3)
    b = col(groups)
    assert b["query"]["input_ids"].shape[0] == 3 and b["passage"]["input_ids"].shape[0] == 12
    slots_q = set(tok.convert_tokens_to_ids([f"<s{i}>" for i in range(9, 17)]))
    slots_p = set(tok.convert_tokens_to_ids([f"<s{i}>" for i in range(1, 9)]))
    for side, slots in (("query", slots_q), ("passage", slots_p)):
        ids, w = b[side]["input_ids"], b[side]["pool"]
        assert set(ids[w > 0].tolist()) == slots
        torch.testing.assert_close(w.sum(1), torch.ones(ids.size(0)))
    # positive first in each query's block
    assert col.sample_passages(groups[1], groups[1].query)[0] == groups[1].pos[0]


def test_collator_applies_the_template_casing():
    _, tok = setup_model()
    groups = make_groups(3)
    caps = [Group(g.query.upper(), [p.upper() for p in g.pos], [n.upper() for n in g.neg]) for g in groups]
    # group_size 1: negatives are sampled with the query text as seed, which the capitals change
    lowering = dataclasses.replace(get_template("llara"), casing="lower_all_caps")
    col = ContrastiveCollator(tok, lowering, group_size=1, max_query_length=24, max_passage_length=32)
    a, b = col(groups), col(caps)
    for side in ("query", "passage"):
        assert torch.equal(a[side]["input_ids"], b[side]["input_ids"])
    keep = dataclasses.replace(get_template("llara"), casing="keep")
    c = ContrastiveCollator(tok, keep, group_size=1, max_query_length=24, max_passage_length=32)(caps)
    assert not torch.equal(a["query"]["input_ids"], c["query"]["input_ids"])


@pytest.mark.parametrize("lora", [False, True])
def test_grad_cache_equals_plain_gradients(lora):
    groups = make_groups(4)
    model, tok = setup_model(lora=lora)
    batch = ContrastiveCollator(tok, "llara", group_size=4, max_passage_length=32)(groups)

    def chunked(side, size=3):  # same chunks as GradCache, so that dropout draws the same masks
        b = batch[side]
        return torch.cat([embed(model, {k: v[i : i + size] for k, v in b.items()})
                          for i in range(0, b["input_ids"].size(0), size)])

    torch.manual_seed(123)
    model.zero_grad()
    plain = contrastive_loss(chunked("query"), chunked("passage"), 0.05)
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(123)
    model.zero_grad()
    cached = grad_cache_step(model, batch, 0.05, chunk_size=3)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=2e-6, rtol=1e-4, msg=n)


def _worker(rank, world, init_file, out_file, grad_cache):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    groups = make_groups(4)
    model, tok = setup_model()
    batch = ContrastiveCollator(tok, "llara", group_size=3, max_passage_length=32)(groups[rank * 2 : rank * 2 + 2])
    if grad_cache:
        loss = grad_cache_step(model, batch, 0.05, chunk_size=2)
    else:
        loss = contrastive_loss(embed(model, batch["query"]), embed(model, batch["passage"]), 0.05)
        loss.backward()
    # what DDP does: average gradients and (for logging) losses over ranks
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": {n: p.grad for n, p in model.named_parameters()
                                                    if p.grad is not None}}, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("grad_cache", [False, True])
def test_two_processes_equal_one_process_with_doubled_batch(tmp_path, grad_cache):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt"), grad_cache), nprocs=2)
    dist_res = torch.load(tmp_path / "out.pt")
    model, tok = setup_model()
    batch = ContrastiveCollator(tok, "llara", group_size=3, max_passage_length=32)(make_groups(4))
    loss = contrastive_loss(embed(model, batch["query"]), embed(model, batch["passage"]), 0.05)
    loss.backward()
    assert dist_res["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dist_res["grads"][n], p.grad, atol=2e-6, rtol=1e-4, msg=n)


def test_load_groups_errors(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"query": "a", "pos": ["x"], "neg": ["y"]}\n{"query": "b", "pos": []}\n')
    from llara.io import DataError

    with pytest.raises(DataError, match="train.jsonl:2"):
        load_groups(p)
