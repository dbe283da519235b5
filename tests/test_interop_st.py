"""Exported llara models load in sentence-transformers and give llara's ids and vectors."""
import json

import numpy as np
import pytest
from tiny import make_model, make_tokenizer

from llara.modeling.encoder import Encoder
from llara.prompts import get_template
from llara.training.export import export_model

st = pytest.importorskip("sentence_transformers", reason="needs the [st] extra: pip install 'llara[st]'")

QUERIES = ["the capital of france", "fish", "what is a dense retrieval model trained on ?"]
DOCS = [
    "paris is the capital city of france .",
    "fish breathe water",
    # longer than max_passage_length: only the text is cut, the prompt and its slots survive
    " ".join(["a large language model is trained on text data"] * 12),
    "",
]
TEMPLATES = ("llara", "paper", "eos", "mean")


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def authors_ids(tok, side, text, max_length):
    """The released code's construction, written out independently of llara.prompts."""
    prefix = tok(side.prefix, add_special_tokens=True)["input_ids"]
    around = tok("", add_special_tokens=True)["input_ids"]  # BOS here
    suffix = tok(side.suffix, add_special_tokens=True)["input_ids"][len(around):] if side.suffix else []
    eos = [tok.eos_token_id] if side.append_eos else []
    body = tok(text, add_special_tokens=False)["input_ids"]
    body = body[: max_length - len(prefix) - len(suffix) - len(eos)]
    return prefix + body + suffix + eos


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny model exported once per template; the tokenizer pads on the left on purpose."""
    out = {}
    for name in TEMPLATES:
        tok = make_tokenizer(with_slots=True)
        model = make_model("llama", vocab_size=len(tok), seed=3)
        d = tmp_path_factory.mktemp(name) / "final"
        export_model(model, tok, d, template=name, extra={"max_query_length": 24, "max_passage_length": 40})
        cfg = json.loads((d / "tokenizer_config.json").read_text())  # as LLaMA and Qwen tokenizers ship
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
        out[name] = d
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_sentence_transformers_matches_encoder(exported, name):
    d = exported[name]
    cfg = json.loads((d / "config_sentence_transformers.json").read_text())
    assert set(cfg["prompts"]) == {"query", "document"} and cfg["similarity_fn_name"] == "cosine"
    model = st.SentenceTransformer(str(d), device="cpu", trust_remote_code=True)
    enc = Encoder.from_pretrained(str(d), device="cpu", dtype="float32", show_progress=False)
    assert enc.template.name == name and enc.max_length == {"query": 24, "passage": 40}

    q_ref = enc.encode_queries(QUERIES)
    d_ref = enc.encode_corpus([{"title": "", "text": t} for t in DOCS])
    for q in (model.encode_query(QUERIES, batch_size=2), model.encode(QUERIES, prompt_name="query")):
        assert cosines(q, q_ref).min() >= 0.99999
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    for p in (model.encode_document(DOCS, batch_size=3), model.encode(DOCS, prompt_name="document"), model.encode(DOCS)):
        assert cosines(p, d_ref).min() >= 0.99999
    # one at a time (no padding at all) gives the same vectors as the padded batches
    single = np.stack([model.encode_document([t]) [0] for t in DOCS])
    assert cosines(single, d_ref).min() >= 0.99999


@pytest.mark.parametrize("name", TEMPLATES)
def test_sentence_transformers_builds_the_authors_ids(exported, name):
    model = st.SentenceTransformer(str(exported[name]), device="cpu", trust_remote_code=True)
    module, tok, template = model[0], model.tokenizer, get_template(name)
    assert tok.padding_side == "left"  # the module pads on the right whatever the tokenizer says
    for prompt_name, side_name, texts, max_length in (("query", "query", QUERIES, 24),
                                                      ("document", "passage", DOCS, 40)):
        side = template.side(side_name)
        feats = module.preprocess(texts, prompt=model.prompts[prompt_name])
        for row, mask, text in zip(feats["input_ids"], feats["attention_mask"], texts):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert row[:n].tolist() == authors_ids(tok, side, text, max_length)
        if side.pooling == "slots":  # the pooled positions are the slot tokens, in every row
            slot_ids = set(tok.convert_tokens_to_ids(list(side.slots)))
            for row, w in zip(feats["input_ids"], feats["llara_pool_weights"]):
                assert {int(t) for t in row[w > 0]} == slot_ids


def test_unknown_prompt_is_a_clear_error(exported):
    model = st.SentenceTransformer(str(exported["llara"]), device="cpu", trust_remote_code=True)
    with pytest.raises(ValueError, match="prompt_name='query'"):
        model.encode(["fish"], prompt="query: ")


def test_a_saved_sentence_transformer_reloads_the_same(exported, tmp_path):
    model = st.SentenceTransformer(str(exported["paper"]), device="cpu", trust_remote_code=True)
    model.save(str(tmp_path / "resaved"))
    again = st.SentenceTransformer(str(tmp_path / "resaved"), device="cpu", trust_remote_code=True)
    assert again.prompts["query"] == model.prompts["query"]
    assert cosines(again.encode_query(QUERIES), model.encode_query(QUERIES)).min() >= 0.99999
    assert cosines(again.encode_document(DOCS), model.encode_document(DOCS)).min() >= 0.99999
