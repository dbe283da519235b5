"""Train 2 LoRA steps on a tiny model, then use the result from sentence-transformers, MTEB and PEFT."""
import hashlib
import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from tiny import make_corpus_tokenizer, make_model

from llara.cli import main
from llara.data.beir import load_beir
from llara.io import passage_text
from llara.modeling.encoder import Encoder

ADI = SHARED_DATA / "adi"
pytestmark = pytest.mark.skipif(not ADI.is_dir(), reason=f"{ADI} not found")


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def tree_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base (vocabulary from adi, no slot tokens yet), hard negatives mined with BM25, then the
    same 2-step LoRA fine-tuning exported merged and as the adapter alone, with the slot rows trained
    as peft trainable tokens (indices) or as a modules_to_save copy of the embedding."""
    tmp = tmp_path_factory.mktemp("interop")
    ds = load_beir(ADI)
    tok = make_corpus_tokenizer([passage_text(d) for d in ds.corpus.values()] + list(ds.queries.values()))
    base = Encoder(make_model("llama", vocab_size=len(tok), seed=5), tok, "eos", show_progress=False).save(tmp / "base")
    train = tmp / "train.jsonl"
    assert main(["mine", "--method", "bm25", "--corpus", str(ADI / "corpus.jsonl"), "--queries",
                 str(ADI / "queries.jsonl"), "--qrels", str(ADI / "qrels" / "test.tsv"), "--window", "2", "20",
                 "--negatives", "3", "--output", str(train)]) == 0
    before = tree_digest(base)
    out = {"base": base, "base_digest": before}
    for mode in ("indices", "embedding"):
        for kind, flag in (("merged", "--merge-lora"), ("adapter", "--no-merge-lora")):
            name = "merged" if (mode, kind) == ("indices", "merged") else f"{kind}-{mode}"
            run = tmp / name
            assert main(["finetune", "--model", str(base), "--data", str(train), "--output", str(run),
                         "--template", "llara", "--batch-size", "4", "--group-size", "3",
                         "--max-passage-length", "64", "--max-query-length", "32", "--max-steps", "2", "--lora",
                         "--lora-r", "4", "--lr", "1e-2", "--trainable-tokens", mode, "--seed", "0",
                         "--no-progress", flag]) == 0
            out[name] = run / "final"
    return out


def test_trained_export_is_a_sentence_transformers_model(runs):
    st = pytest.importorskip("sentence_transformers", reason="needs the [st] extra: pip install 'llara[st]'")
    ds = load_beir(ADI)
    queries, docs = list(ds.queries.values()), [passage_text(d) for d in ds.corpus.values()]
    model = st.SentenceTransformer(str(runs["merged"]), device="cpu", trust_remote_code=True)
    enc = Encoder.from_pretrained(str(runs["merged"]), device="cpu", dtype="float32", show_progress=False)
    assert enc.template.name == "llara" and enc.max_length == {"query": 32, "passage": 64}
    assert cosines(model.encode_query(queries), enc.encode_queries(queries)).min() >= 0.99999
    assert cosines(model.encode_document(docs), enc.encode(docs, "passage")).min() >= 0.99999


def test_mteb_on_a_local_beir_task_matches_llara_evaluate(runs, tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="needs the [st] extra: pip install 'llara[st]'")
    mteb = pytest.importorskip("mteb", reason="needs the [mteb] extra: pip install 'llara[mteb]'")
    from llara.interop.mteb_task import beir_task

    assert main(["evaluate", "--model", str(runs["merged"]), "--dataset", str(ADI), "--output", str(tmp_path),
                 "--dtype", "float32", "--device", "cpu", "--no-cache"]) == 0
    ours = json.loads((tmp_path / "summary.json").read_text())[0]["metrics"]["ndcg@10"]
    model = st.SentenceTransformer(str(runs["merged"]), device="cpu", trust_remote_code=True)
    result = mteb.evaluate(model, beir_task(ADI), cache=None, show_progress_bar=False)
    theirs = result.task_results[0].get_score()
    assert result.task_results[0].scores["test"][0]["main_score"] == theirs
    assert ours > 0.05  # a real ranking, not ties everywhere
    assert abs(ours - theirs) <= 0.002, (ours, theirs)


@pytest.mark.parametrize("mode", ["indices", "embedding"])
def test_adapter_export_stays_an_adapter(runs, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = runs[f"adapter-{mode}"]
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "llara.json", "tokenizer.json"} <= files
    assert not any(f.startswith("model") for f in files)  # no full weights
    assert all(p.stat().st_mode & 0o044 for p in adapter.iterdir())  # shared like the directory
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(runs["base"])
    assert tree_digest(runs["base"]) == runs["base_digest"]  # the base on disk stays untouched

    ds = load_beir(ADI)
    queries, docs = list(ds.queries.values())[:12], [passage_text(d) for d in ds.corpus.values()][:12]
    merged_dir = runs["merged" if mode == "indices" else f"merged-{mode}"]
    merged = Encoder.from_pretrained(str(merged_dir), device="cpu", dtype="float32", show_progress=False)
    ref_q, ref_d = merged.encode_queries(queries), merged.encode(docs, "passage")

    # llara loads the adapter directory itself (base + slot rows + adapter, merged in memory)
    enc = Encoder.from_pretrained(str(adapter), device="cpu", dtype="float32", show_progress=False)
    assert enc.template.name == "llara" and enc.max_length == merged.max_length
    assert cosines(enc.encode_queries(queries), ref_q).min() >= 0.99999
    assert cosines(enc.encode(docs, "passage"), ref_d).min() >= 0.99999

    # plain PEFT: the base grown to the adapter's tokenizer (its slot rows come from the adapter)
    tok = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(runs["base"])
    base.resize_token_embeddings(len(tok))
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    enc = Encoder(peft_model, tok, "llara", max_query_length=32, max_passage_length=64, show_progress=False)
    assert cosines(enc.encode_queries(queries), ref_q).min() >= 0.99999
    assert cosines(enc.encode(docs, "passage"), ref_d).min() >= 0.99999
