"""Released-model parity: a directory laid out like BAAI/LLARA-passage (LLaMA SentencePiece tokenizer
that already holds <s1>..<s16>, no llara.json) gets the authors' exact ids from `llara evaluate` and,
after `llara export`, from sentence-transformers.

No PyPI package ships LLaMA-2's tokenizer.model, so the SentencePiece model is trained here with
LLaMA-2's settings (BPE, byte fallback, digits split, identity normalisation, dummy prefix,
whitespace kept, unk/bos/eos = 0/1/2). The reference ids come from the sentencepiece library itself,
the engine of the slow ``LlamaTokenizer`` (``use_fast=False``) the authors' code ran on: the prefix
with BOS, the text without, the suffix split at the added slot tokens, its BOS dropped.
transformers 5 no longer has slow tokenizers (``use_fast`` is ignored), so llara reads the same
directory through the converted fast tokenizer, and this test is what shows the ids agree.
"""
import io
import json

import numpy as np
import pytest
from tiny import WORDS, make_model

from llara.cli import main
from llara.modeling.embed import base_model
from llara.modeling.encoder import Encoder
from llara.prompts import get_template

spm = pytest.importorskip("sentencepiece")

SLOTS = [f"<s{i}>" for i in range(1, 17)]
QUERY = "What is llama?"
PASSAGE = ("The llama is a domesticated South American camelid, widely used as a meat and pack animal by "
           "Andean cultures since the pre-Columbian era.")
TEXTS = [QUERY, PASSAGE, "the capital of france is paris , 1984 .", "  spaces  and  tabs\there", "ünïcödé ☃ text"]


def train_sentencepiece() -> bytes:
    lines = [PASSAGE, QUERY] + [" ".join(WORDS[i: i + 9]) for i in range(0, len(WORDS), 3)]
    lines += ['", summarize the above passage within eight words:', '", predict the following passage within eight words:']
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """config.json + model.safetensors (LlamaForCausalLM) + tokenizer.model + tokenizer_config.json with
    the 16 slot tokens as added tokens after the SentencePiece vocabulary; left padding, no pad token."""
    d = tmp_path_factory.mktemp("released") / "LLARA-passage"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(train_sentencepiece())
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    n = sp.get_piece_size()
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": i < 3}
             for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>")] + [(n + j, t) for j, t in enumerate(SLOTS)]}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "padding_side": "left", "added_tokens_decoder": added}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    make_model("llama", vocab_size=n + len(SLOTS), seed=7).save_pretrained(d)
    return d, sp


def reference_ids(sp, side, text, max_length):
    """The authors' construction on the SentencePiece engine (slow LlamaTokenizer, legacy)."""
    slot_id = {t: sp.get_piece_size() + i for i, t in enumerate(SLOTS)}
    prefix = [sp.bos_id()] + (sp.encode(side.prefix) if side.prefix else [])
    suffix, rest = [], side.suffix
    while rest:  # the slow tokenizer splits at added tokens and encodes each piece on its own
        cut = min((rest.find(t), t) for t in SLOTS if t in rest) if any(t in rest for t in SLOTS) else (len(rest), None)
        if cut[0]:
            suffix += sp.encode(rest[: cut[0]])
        if cut[1] is None:
            break
        suffix.append(slot_id[cut[1]])
        rest = rest[cut[0] + len(cut[1]):]
    eos = [sp.eos_id()] if side.append_eos else []
    body = sp.encode(text)[: max_length - len(prefix) - len(suffix) - len(eos)]
    return prefix + body + suffix + eos


def captured_ids(enc, texts, side):
    """The rows the model really receives (unpadded), in input order."""
    seen = []

    def hook(_module, _args, kwargs):
        for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            seen.append(row[: int(mask.sum())].tolist())

    handle = base_model(enc.model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for t in texts:
            enc.encode([t], side, batch_size=1)
    finally:
        handle.remove()
    return seen


def test_released_layout_gets_the_authors_ids(released):
    d, sp = released
    enc = Encoder.from_pretrained(str(d), device="cpu", dtype="float32", show_progress=False)
    assert len(enc.tokenizer) == sp.get_piece_size() + 16  # the slots are reused, none added
    template = get_template("llara")
    for side, limit in (("query", 64), ("passage", 256)):
        expected = [reference_ids(sp, template.side(side), t, limit) for t in TEXTS]
        assert captured_ids(enc, TEXTS, side) == expected
    # truncation cuts the text only: the slots survive
    short = Encoder.from_pretrained(str(d), device="cpu", dtype="float32", show_progress=False, max_passage_length=40)
    assert captured_ids(short, [PASSAGE], "passage") == [reference_ids(sp, template.passage, PASSAGE, 40)]


def test_llara_evaluate_and_export_on_the_released_layout(released, tmp_path, adi_dir):
    st = pytest.importorskip("sentence_transformers", reason="needs the [st] extra: pip install 'llara[st]'")
    d, sp = released
    assert main(["evaluate", "--model", str(d), "--dataset", str(adi_dir), "--output", str(tmp_path / "eval"),
                 "--device", "cpu", "--dtype", "float32", "--no-cache"]) == 0
    row = json.loads((tmp_path / "eval" / "summary.json").read_text())[0]
    assert row["template"] == "llara" and 0 <= row["metrics"]["ndcg@10"] <= 1

    out = tmp_path / "exported"
    assert main(["export", str(d), str(out)]) == 0
    assert json.loads((out / "llara.json").read_text())["template"]["name"] == "llara"
    model = st.SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert len(model.tokenizer) == sp.get_piece_size() + 16
    template = get_template("llara")
    for prompt, side, limit in (("query", "query", 64), ("document", "passage", 256)):
        feats = model[0].preprocess(TEXTS, prompt=model.prompts[prompt])
        rows = [r[: int(m.sum())].tolist() for r, m in zip(feats["input_ids"], feats["attention_mask"])]
        assert rows == [reference_ids(sp, template.side(side), t, limit) for t in TEXTS]
    enc = Encoder.from_pretrained(str(d), device="cpu", dtype="float32", show_progress=False)
    for mine, ref in ((model.encode_query(TEXTS), enc.encode_queries(TEXTS)),
                      (model.encode_document(TEXTS), enc.encode(TEXTS, "passage"))):
        assert np.einsum("ij,ij->i", mine, ref).min() >= 0.99999
    # the source directory is read, never written
    assert not (d / "llara.json").exists() and not (d / "modules.json").exists()
