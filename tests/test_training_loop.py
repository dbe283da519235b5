"""The shared training loop on a tiny model: exact resume, LoRA + trainable slot rows, atomic
checkpoints, exports loadable with AutoModel, the JSONL log and plot, and a 2-process gloo run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from train_helpers import ToyStream, lm_loss, make_loader, make_manual_lm_loss, tiny_setup

from llara.training import checkpoint as ckpt_mod
from llara.training.checkpoint import list_checkpoints, read_trainer_state
from llara.training.config import TrainConfig
from llara.training.logging_utils import read_log
from llara.training.lora import find_projection_names, merged_state_dict
from llara.training.loop import LOG_FILE, PLOT_FILE, train
from llara.training.stream import BatchStream

STEPS = 6


def config(out: Path, mode: str = "full", **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=STEPS, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1,
                save_every=3, keep_last=2, seed=0, progress=False, lora=mode == "lora", lora_r=4)
    base.update(kw)
    return TrainConfig(**base)


class Crash(RuntimeError):
    pass


def crashing(after_calls: int):
    """lm_loss that raises on call number ``after_calls + 1`` (a pre-emption mid-run)."""
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash("simulated pre-emption")
        return lm_loss(model, batch)

    return fn


def hidden(model_or_base, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model_or_base(input_ids=ids).last_hidden_state


def base_of(model):
    """The decoder (LlamaModel) inside a causal LM or its peft wrapper."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.model


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory):
    """One uninterrupted run of 6 steps, and one that crashes in step 5 (checkpoint at 3) and resumes."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"train-{mode}")
    model, tok, slots = tiny_setup()
    straight = train(model, tok, make_loader(tok), lm_loss, config(root / "straight", mode), trainable_token_ids=slots)

    model, tok, slots = tiny_setup()
    cfg = config(root / "resumed", mode)
    # 2 micro-batches per step: calls 1..8 are steps 1..4; step 4 is logged but not checkpointed.
    with pytest.raises(Crash):
        train(model, tok, make_loader(tok), crashing(8), cfg, trainable_token_ids=slots)
    log_before = read_log(root / "resumed" / LOG_FILE)
    model, tok, slots = tiny_setup()
    resumed = train(model, tok, make_loader(tok), lm_loss, config(root / "resumed", mode, resume=True),
                    trainable_token_ids=slots)
    return {"mode": mode, "root": root, "straight": straight, "resumed": resumed, "log_before": log_before,
            "tok": tok, "slots": slots}


def test_resume_gives_the_same_run(runs):
    assert [r["step"] for r in runs["log_before"]] == [1, 2, 3, 4]
    a = read_log(runs["straight"].log_path)
    b = read_log(runs["resumed"].log_path)
    # The resumed run truncated step 4 of the interrupted one and logged 4..6 again.
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    assert a[-1]["epoch"] >= 2  # the run crossed epoch boundaries inside accumulation groups
    sa = runs["straight"].model.state_dict()
    sb = runs["resumed"].model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=k)
    assert runs["resumed"].step == STEPS
    # Losses actually moved (the test is not vacuous).
    assert a[-1]["loss"] < a[0]["loss"]


def test_checkpoints_rotated_and_complete(runs):
    out = runs["root"] / "resumed"
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["checkpoint-000003", "checkpoint-000006"]
    state = read_trainer_state(ckpts[-1])
    assert state["step"] == STEPS and state["epoch"] == 2 and state["examples_in_epoch"] == 4
    assert state["config"]["lora"] == (runs["mode"] == "lora")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt", "train_config.json", "model/tokenizer.json"):
        assert (ckpts[-1] / name).is_file(), name
    model_files = {p.name for p in (ckpts[-1] / "model").iterdir()}
    assert ("adapter_model.safetensors" in model_files) == (runs["mode"] == "lora")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_log_and_plot(runs):
    res = runs["straight"]
    rows = read_log(res.log_path)
    assert len(rows) == STEPS
    for key in ("step", "epoch", "loss", "lm", "aux", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "examples"):
        assert key in rows[0], key
    assert rows[0]["aux"] == pytest.approx(0.5)
    assert rows[-1]["tokens"] == STEPS * 2 * 2 * 11  # steps x micro-batches x batch x tokens per example
    assert rows[-1]["elapsed_s"] >= rows[0]["elapsed_s"]
    png = res.plot_path
    assert png == res.log_path.parent / PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_export_loads_with_automodel(runs):
    from transformers import AutoModel, AutoTokenizer

    res = runs["straight"]
    export = res.export_dir
    assert export == Path(res.log_path.parent / "final")
    info = json.loads((export / "llara.json").read_text())
    assert info["template"]["name"] == "llara" and info["llara_version"]
    assert info["training"]["lora"] == (runs["mode"] == "lora")
    assert info["trainable_token_ids"] == sorted(runs["slots"])
    assert info["export"] == ("merged LoRA" if runs["mode"] == "lora" else "full weights")
    assert len(AutoTokenizer.from_pretrained(export)) == len(runs["tok"])
    loaded = AutoModel.from_pretrained(export).eval()
    ids = torch.tensor([[1, 10, 20, 30, *runs["slots"][:8]], [1, 40, 50, 60, *runs["slots"][8:]]])
    torch.testing.assert_close(hidden(loaded, ids), hidden(base_of(res.model), ids), rtol=1e-5, atol=1e-5)


def test_lora_slot_rows_train_and_nothing_else(tmp_path):
    model, tok, slots = tiny_setup()
    emb0 = model.get_input_embeddings().weight.detach().clone()
    targets = find_projection_names(model)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = config(tmp_path, "lora", max_steps=3, warmup_steps=0, save_every=0, merge_lora=False)  # sees all 10 examples
    res = train(model, tok, make_loader(tok), lm_loss, cfg, trainable_token_ids=slots)
    peft_model = res.model
    # LoRA B starts at zero: it must have moved.
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)
    # The frozen base embedding is untouched; the merged embedding differs exactly on the slot rows.
    base_emb = peft_model.get_input_embeddings().token_adapter.base_layer.weight
    assert torch.equal(base_emb, emb0)
    merged = merged_state_dict(peft_model)["model.embed_tokens.weight"]
    changed = (merged != emb0).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(slots)
    # merge_lora=False exports the adapter (+ token rows): it reloads onto the same base model.
    from peft import PeftModel

    assert (res.export_dir / "adapter_config.json").is_file()
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(tiny_setup()[0], res.export_dir).eval()
    ids = torch.tensor([[1, 10, 20, *slots[:8]]])
    torch.testing.assert_close(hidden(base_of(reloaded), ids), hidden(base_of(res.model), ids), rtol=1e-6, atol=1e-6)


def test_lora_whole_embedding_mode(tmp_path):
    model, tok, slots = tiny_setup()
    emb0 = model.get_input_embeddings().weight.detach().clone()
    cfg = config(tmp_path, "lora", max_steps=3, warmup_steps=0, save_every=0, trainable_tokens="embedding")
    res = train(model, tok, make_loader(tok), lm_loss, cfg, trainable_token_ids=slots)
    from transformers import AutoModel

    merged = AutoModel.from_pretrained(res.export_dir).get_input_embeddings().weight
    changed = set((merged != emb0).any(dim=1).nonzero().flatten().tolist())
    assert set(slots) <= changed
    ids = torch.tensor([[1, 10, 20, *slots[:8]]])
    torch.testing.assert_close(hidden(AutoModel.from_pretrained(res.export_dir), ids), hidden(base_of(res.model), ids),
                               rtol=1e-5, atol=1e-5)


def test_manual_backward_checkpointing_and_bf16(tmp_path):
    """Same losses and weights for: a loss that runs backward itself (GradCache's contract) and
    gradient checkpointing (LoRA, frozen embeddings). bf16 on a CPU keeps the LoRA base in fp32
    (autocast) and every trainable tensor in fp32."""
    variants = {"plain": ({}, lm_loss), "manual": ({}, make_manual_lm_loss(2)),
                "ckpt": ({"gradient_checkpointing": True}, lm_loss), "bf16": ({"precision": "bf16"}, lm_loss)}
    runs = {}
    for name, (kw, fn) in variants.items():
        model, tok, slots = tiny_setup()
        cfg = config(tmp_path / name, "lora", max_steps=2, warmup_steps=0, save_every=0, export=False, **kw)
        res = train(model, tok, make_loader(tok), fn, cfg, trainable_token_ids=slots)
        runs[name] = ([r["loss"] for r in read_log(res.log_path)], res.model.state_dict())
        if name == "ckpt":
            assert res.model.get_base_model().is_activation_checkpointing
        if name == "bf16":
            assert {p.dtype for p in res.model.parameters() if p.requires_grad} == {torch.float32}
            assert res.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    for name in ("manual", "ckpt"):
        assert runs[name][0] == pytest.approx(runs["plain"][0], abs=1e-6), name
        for k, v in runs["plain"][1].items():
            torch.testing.assert_close(runs[name][1][k], v, rtol=0, atol=1e-5, msg=f"{name}: {k}")
    assert runs["bf16"][0] == pytest.approx(runs["plain"][0], abs=0.05)


@pytest.mark.parametrize("lora_dtype", ["auto", "fp32"])
def test_lora_base_is_bf16_only_on_gpus(tmp_path, lora_dtype):
    """Under bf16, LoRA's frozen base is cast to bf16 on a GPU (memory) and kept fp32 on a CPU
    (quality: a bf16 residual stream cost 0.027 nDCG@10 there). The trainable tensors follow the
    base on a GPU (one dtype in the step: no casts) unless fp32 is asked; on a CPU they are fp32."""
    from llara.training.setup import prepare_model

    for device_type, base in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        model, tok, slots = tiny_setup()
        cfg = config(tmp_path / device_type, "lora", precision="bf16", lora_dtype=lora_dtype)
        peft = prepare_model(model, cfg, slots, "bf16", device_type)
        assert peft.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == base
        trained = torch.bfloat16 if (device_type == "cuda" and lora_dtype == "auto") else torch.float32
        assert {p.dtype for p in peft.parameters() if p.requires_grad} == {trained}


def test_stop_by_epochs(tmp_path):
    model, tok, _ = tiny_setup()
    cfg = config(tmp_path, "full", max_steps=None, epochs=2, save_every=0, export=False)
    res = train(model, tok, make_loader(tok), lm_loss, cfg)
    assert res.step == 5  # 2 epochs x 5 batches / 2 micro-batches per step
    assert read_log(res.log_path)[-1]["examples"] == 20
    unsized = [b for b in make_loader(tok)]
    with pytest.raises(ValueError, match="len"):
        train(tiny_setup()[0], tok, iter(unsized), lm_loss, config(tmp_path / "x", max_steps=None, epochs=1))


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, tok, slots = tiny_setup()
    real_save = torch.save
    seen = {"n": 0}

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            seen["n"] += 1
            if seen["n"] == 2:  # the second checkpoint dies half-written
                raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    cfg = config(tmp_path, "full", max_steps=4, grad_accum=1, save_every=2, export=False)
    with pytest.raises(OSError, match="disk full"):
        train(model, tok, make_loader(tok), lm_loss, cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-000002"]
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    # A fresh run refuses to mix with the old checkpoints; resume continues from step 2.
    model, tok, _ = tiny_setup()
    with pytest.raises(FileExistsError):
        train(model, tok, make_loader(tok), lm_loss, cfg)
    cfg.resume = str(tmp_path / "checkpoint-000002")  # resume from a path (the fixture uses resume=True)
    res = train(model, tok, make_loader(tok), lm_loss, cfg)
    assert res.step == 4
    assert [r["step"] for r in read_log(tmp_path / LOG_FILE)] == [1, 2, 3, 4]


def test_stream_positions_and_striding():
    _, tok, _ = tiny_setup()
    full = [b["input_ids"] for b in make_loader(tok)]  # epoch 0, 5 batches of 2
    s0 = BatchStream(make_loader(tok), rank=0, world=2)
    s1 = BatchStream(make_loader(tok), rank=1, world=2)
    got0 = [s0.next() for _ in range(2)]
    got1 = [s1.next() for _ in range(2)]
    assert torch.equal(got0[0]["input_ids"], full[0]) and torch.equal(got1[0]["input_ids"], full[1])
    assert torch.equal(got0[1]["input_ids"], full[2]) and torch.equal(got1[1]["input_ids"], full[3])
    assert s0.position == {"epoch": 0, "examples_in_epoch": 8}
    # 5 batches, 2 processes: the 5th batch is dropped and epoch 1 begins.
    nxt = s0.next()
    assert s0.epoch == 1 and s0.examples == 4
    ds = ToyStream(tok)
    ds.set_epoch(1)
    assert torch.equal(nxt["input_ids"][0], next(iter(ds))["input_ids"])
    # Resuming at (1, 4) gives the same next batch as continuing.
    s2 = BatchStream(make_loader(tok), rank=0, world=2, epoch=1, examples=4)
    assert torch.equal(s2.next()["input_ids"], s0.next()["input_ids"])
    assert s0.next(max_epochs=2) is None  # epoch 1 ends, the epoch limit stops the stream


def test_config_validation():
    with pytest.raises(ValueError, match="max_steps or epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(max_steps=1, precision="fp16")
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"max_steps": 1, "nope": 1})
    c = TrainConfig(epochs=2, resume="true", lora_target_modules="q_proj,v_proj")
    assert c.resume is True and c.lora_target_modules == ["q_proj", "v_proj"]
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_config_arguments():
    import argparse

    from llara.training.config import add_config_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    c = config_from_args(p.parse_args(["--max-steps", "5", "--lora", "--lora-target-modules", "q_proj", "v_proj",
                                       "--resume", "runs/x/checkpoint-000010"]))
    assert c.max_steps == 5 and c.lora and c.lora_target_modules == ["q_proj", "v_proj"]
    assert c.resume == "runs/x/checkpoint-000010"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo(tmp_path):
    """torchrun --nproc_per_node 2 (what ``accelerate launch --multi_gpu`` runs): DDP over gloo on
    CPU; rank 0 alone logs and saves."""
    helper = Path(__file__).with_name("_dist_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(helper), str(tmp_path), "lora"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2] and [i["step"] for i in infos] == [4, 4]
    # Gradients were averaged: both replicas hold the same weights, and the same logged loss.
    assert infos[0]["weights"] == pytest.approx(infos[1]["weights"], rel=1e-6, abs=1e-7)
    assert infos[0]["last_loss"] == pytest.approx(infos[1]["last_loss"])
    assert infos[0]["checkpoint"] and infos[1]["checkpoint"] is None
    # manual_backward losses: gradients averaged by the loop give the same replicas and the same run.
    manual = [i["manual"] for i in infos]
    assert manual[0]["weights"] == pytest.approx(manual[1]["weights"], rel=1e-6, abs=1e-7)
    assert manual[0]["weights"] == pytest.approx(infos[0]["weights"], rel=1e-5, abs=1e-6)
    rows = read_log(tmp_path / LOG_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written by one process only
    assert rows[-1]["examples"] == 4 * 2 * 2  # steps x processes x batch
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["checkpoint-000004"]  # keep_last=1
    assert {p.name for p in ckpts[0].glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert read_trainer_state(ckpts[0])["world_size"] == 2
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_checkpoint_of_a_tied_model_loads_back(tmp_path):
    """A tied LM head gets its own token adapter sharing the embedding's delta; peft saves the
    delta under both names and loads one, which must not stop a resume (the embedded SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safetensors.torch import load_file, save_file

    from llara.training.checkpoint import load_model_weights
    from llara.training.lora import apply_lora

    def tied_peft(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        model.resize_token_embeddings(70, mean_resizing=False)
        return apply_lora(model, r=4, trainable_token_ids=[66, 67]).eval()  # eval: no LoRA dropout

    trained = tied_peft(0)
    assert any(name.endswith("lm_head.token_adapter") for name, _ in trained.named_modules())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    # what peft writes for a resized model loaded from a hub or a directory (SmolLM2): the embedding
    # layers, the tied head's token rows included
    saved = tmp_path / "model"
    trained.save_pretrained(saved, safe_serialization=True, save_embedding_layers=True)
    f = next(saved.glob("*.safetensors"))
    sd = load_file(f)
    key = next(k for k in sd if "lm_head.token_adapter.trainable_tokens_delta" in k)
    fresh = tied_peft(0)
    load_model_weights(fresh, saved)
    ids = torch.tensor([[1, 66, 5, 67]])
    torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)

    # a token delta that does not match what the tied layer loaded is still an error
    sd[key] = sd[key] + 1
    save_file(sd, f)
    with pytest.raises(RuntimeError, match="adapter keys not in the model"):
        load_model_weights(tied_peft(0), saved)
