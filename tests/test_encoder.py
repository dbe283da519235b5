"""Encoder invariances, template id construction, pooling, save/load and caching."""
import dataclasses

import numpy as np
import pytest
import torch
from tiny import SLOTS, make_model, make_tokenizer

from llara.modeling.encoder import Encoder
from llara.modeling.loading import ensure_slot_tokens
from llara.prompts import BUILTIN_TEMPLATES, TemplateError, encode_side, get_template

TEXTS = [
    "the capital of france is paris",
    "fish breathe water",
    "a large language model is trained on text and it can predict the following sentence in a paper",
    "dense retrieval",
    "the river in the city",
]


def make_encoder(arch="llama", template="llara", attn="sdpa", **kw):
    return Encoder(make_model(arch, attn=attn), make_tokenizer(), template, show_progress=False, **kw)


def test_authors_form_ids_follow_the_released_recipe():
    tok = make_tokenizer()
    enc = make_encoder()  # adds the slot tokens to tok's copy inside the encoder
    tok = enc.tokenizer
    side = encode_side(tok, get_template("llara").passage)
    text = "the capital of france is paris"
    ids, start, end = side.build(tok(text, add_special_tokens=False)["input_ids"], 64)
    prefix = tok('"', add_special_tokens=True)["input_ids"]
    suffix = tok('", summarize the above passage within eight words: ' + "".join(SLOTS[:8]))["input_ids"][1:]
    expected = prefix + tok(text, add_special_tokens=False)["input_ids"] + suffix
    assert ids == expected
    assert prefix[0] == tok.bos_token_id
    assert [ids[p] for p in side.pool_positions(len(ids), start, end)] == tok.convert_tokens_to_ids(SLOTS[:8])


def test_released_tokenizer_slots_are_reused_not_duplicated():
    tok = make_tokenizer(with_slots=True)
    model = make_model(vocab_size=len(tok))
    before = (len(tok), model.get_input_embeddings().weight.shape[0])
    added = ensure_slot_tokens(tok, model, get_template("llara").slot_tokens)
    assert added == []
    assert (len(tok), model.get_input_embeddings().weight.shape[0]) == before


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("template", ["llara", "eos", "mean", "prompteol", "paper"])
def test_embedding_does_not_depend_on_batch_neighbours_or_padding(arch, template):
    enc = make_encoder(arch, template)
    together = enc.encode(TEXTS, "passage", batch_size=5)
    alone = np.stack([enc.encode([t], "passage")[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    swapped = enc.encode(TEXTS[::-1], "query", batch_size=2)[::-1]
    np.testing.assert_allclose(swapped, enc.encode(TEXTS, "query", batch_size=3), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_eager_and_sdpa_agree(arch):
    a = make_encoder(arch, attn="eager").encode(TEXTS, "passage")
    b = make_encoder(arch, attn="sdpa").encode(TEXTS, "passage")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_slots_survive_truncation():
    enc = make_encoder(max_passage_length=32)
    side = enc.encoded_side("passage")
    long_text = " ".join(["water"] * 200)
    ids, start, end = side.build(enc.tokenizer(long_text, add_special_tokens=False)["input_ids"], 32)
    assert len(ids) == 32
    assert ids[-len(side.suffix_ids):] == side.suffix_ids
    emb = enc.encode([long_text, "water"], "passage")
    assert np.isfinite(emb).all()
    assert enc.last_stats.truncated == 1
    # truncating the text (not the prompt) means a longer text with the same first 32 tokens is equal
    longer = enc.encode([" ".join(["water"] * 400)], "passage")
    np.testing.assert_allclose(emb[0], longer[0], atol=1e-6)
    with pytest.raises(TemplateError, match="no room for text"):
        side.build([5, 6], 10)


def test_pooling_reads_the_right_states():
    tok = make_tokenizer()
    model = make_model()
    enc = Encoder(model, tok, "mean", show_progress=False)
    text = "fish breathe water"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id] + ids + [tok.eos_token_id]
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([full])).last_hidden_state[0]
    mean = h[1 : 1 + len(ids)].mean(0).numpy()
    eos = h[-1].numpy()
    out = enc.encode_multi([text], "passage", ["mean", "eos"])
    np.testing.assert_allclose(out["mean"][0], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(out["eos"][0], eos / np.linalg.norm(eos), atol=1e-5)


def test_templates_sharing_inputs_share_one_forward_pass(monkeypatch):
    enc = make_encoder(template="eos")
    calls = []
    inner = enc.model.model
    orig = inner.forward
    monkeypatch.setattr(inner, "forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    out = enc.encode_multi(TEXTS, "passage", ["eos", "mean"], batch_size=8)
    assert len(calls) == 1
    np.testing.assert_allclose(out["mean"], make_encoder(template="mean").encode(TEXTS, "passage"), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    enc = make_encoder(template="llara", max_query_length=40, max_passage_length=48)
    before = enc.encode(TEXTS, "passage"), enc.encode(TEXTS, "query")
    enc.save(tmp_path / "ckpt")
    back = Encoder.from_pretrained(str(tmp_path / "ckpt"), device="cpu", show_progress=False)
    assert back.template == enc.template
    assert back.max_length == {"query": 40, "passage": 48}
    np.testing.assert_allclose(back.encode(TEXTS, "passage"), before[0], atol=1e-6)
    np.testing.assert_allclose(back.encode(TEXTS, "query"), before[1], atol=1e-6)


def test_embedding_cache_is_keyed_by_weights_template_and_text(tmp_path, monkeypatch):
    enc = make_encoder(template="eos", cache_dir=tmp_path, fingerprint="w1")
    first = enc.encode(TEXTS, "passage")
    monkeypatch.setattr(enc.model.model, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(enc.encode(TEXTS, "passage"), first)
    with pytest.raises(AssertionError, match="recomputed"):
        enc.encode(TEXTS[:2], "passage")  # other texts: not cached
    enc.fingerprint = "w2"
    with pytest.raises(AssertionError, match="recomputed"):
        enc.encode(TEXTS, "passage")  # other weights: not cached
    enc.fingerprint = "w1"
    enc.model.to(torch.bfloat16)
    with pytest.raises(AssertionError, match="recomputed"):
        enc.encode(TEXTS, "passage")  # same weights in another precision: not cached


def test_custom_template_file(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text(
        "name: qa\n"
        "query: {prefix: 'query : ', pooling: last, append_eos: true}\n"
        "passage: {prefix: 'passage : ', pooling: mean}\n"
    )
    t = get_template(str(path))
    assert t.name == "qa" and t.passage.pooling == "mean"
    emb = make_encoder(template=str(path)).encode(TEXTS, "query")
    assert emb.shape == (len(TEXTS), 32)
    bad = tmp_path / "bad.yaml"
    bad.write_text("query: {pooling: max}\npassage: {}\n")
    with pytest.raises(TemplateError, match="bad.yaml.*pooling"):
        get_template(str(bad))
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("nope")


def test_builtin_templates_are_complete():
    assert {"llara", "paper", "eos", "mean", "prompteol"} <= set(BUILTIN_TEMPLATES)
    t = get_template(None)
    assert t.name == "llara" and t.passage.slots == tuple(SLOTS[:8]) and t.query.slots == tuple(SLOTS[8:])


def test_casing_rule():
    from llara.prompts import apply_casing

    assert apply_casing("FISH BREATHE WATER.", "lower_all_caps") == "fish breathe water."
    assert apply_casing("ÉTÉ À PARIS", "lower_all_caps") == "été à paris"
    for kept in ("DNA in the cell", "Fish breathe water", "1984 - 2001 ?", ""):  # a lower-case letter, or none cased
        assert apply_casing(kept, "lower_all_caps") == kept
    assert apply_casing("DNA in the Cell", "lower") == "dna in the cell"
    assert apply_casing("FISH", "keep") == "FISH"


def test_casing_is_a_template_option(tmp_path):
    assert all(t.casing == "lower_all_caps" for t in BUILTIN_TEMPLATES.values())  # measured: robustness_case.md
    t = get_template({"name": "k", "query": {}, "passage": {}, "casing": "lower_all_caps"})
    assert t.casing == "lower_all_caps" and get_template(t.to_dict()) == t
    assert t.prepare(["FISH", "Fish"]) == ["fish", "Fish"] and get_template("eos").prepare(["FISH"]) == ["fish"]
    kept = get_template({"name": "k2", "query": {}, "passage": {}, "casing": "keep"})
    assert kept.prepare(["FISH"]) == ["FISH"] and get_template(kept.to_dict()).casing == "keep"
    bad = tmp_path / "bad.yaml"
    bad.write_text("query: {}\npassage: {}\ncasing: upper\n")
    with pytest.raises(TemplateError, match="bad.yaml.*casing"):
        get_template(str(bad))


@pytest.mark.parametrize("template", ["llara", "mean"])
def test_text_in_capitals_encodes_like_lower_case(template, tmp_path):
    """Queries and passages go through the same normalisation; the cache is keyed by the prepared text."""
    lowering = dataclasses.replace(get_template(template), casing="lower_all_caps")
    enc = make_encoder(template=lowering, cache_dir=tmp_path, fingerprint="w")
    caps = [t.upper() for t in TEXTS]
    for side in ("query", "passage"):
        np.testing.assert_allclose(enc.encode(caps, side), enc.encode(TEXTS, side), atol=1e-6)
    keep = dataclasses.replace(get_template(template), name="kept", casing="keep")
    out = enc.encode_multi(caps, "passage", [lowering, keep])  # two casings, one call
    np.testing.assert_allclose(out[template], enc.encode(TEXTS, "passage"), atol=1e-6)
    assert not np.allclose(out["kept"], out[template], atol=1e-3)  # capitals are other tokens
