"""The int8 runtime (ONNX Runtime): same vectors as torch within a stated tolerance, same pooled
positions, cached by fingerprint, and wired through index, search and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import make_model, make_tokenizer
from tiny_index import save_model, write_corpus

pytest.importorskip("onnxruntime", reason="the int8 extra: pip install -e '.[int8]'")

from llara.cli import main  # noqa: E402
from llara.modeling import runtime as rt  # noqa: E402
from llara.modeling.embed import base_model  # noqa: E402
from llara.modeling.encoder import Encoder  # noqa: E402
from llara.retrieval.searcher import Searcher  # noqa: E402

TEXTS = [
    "the capital of france is paris",
    "fish",
    "a large language model is trained on text and it can predict the following sentence in a paper",
    "dense retrieval",
    "the river in the city",
]
# int8 weights (per channel) and activations (per batch) on a random 2-layer model: vectors stay
# within these of the fp32 torch ones (measured ~0.003 max abs, cosine > 0.9999).
ATOL = 0.02
MIN_COSINE = 0.999


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """One cache for the module: encoders given the same fingerprint share one export (~10 s each)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLARA_CACHE", str(tmp_path_factory.mktemp("llara-cache")))
        yield


def _pair(arch="llama", template="llara", **kw):
    kw.setdefault("fingerprint", f"tiny-{arch}")  # make_model(arch) is seeded: same weights every time
    torch_enc = Encoder(make_model(arch), make_tokenizer(), template, show_progress=False, **kw)
    int8_enc = Encoder(make_model(arch), make_tokenizer(), template, show_progress=False, runtime="onnx-int8", **kw)
    return torch_enc, int8_enc


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("template", ["llara", "eos", "mean"])
def test_int8_vectors_match_torch_within_tolerance(arch, template):
    a, b = _pair(arch, template)
    for side in ("query", "passage"):
        x, y = a.encode(TEXTS, side, batch_size=2), b.encode(TEXTS, side, batch_size=2)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(y, x, atol=ATOL)
        assert (x * y).sum(1).min() > MIN_COSINE


def test_hidden_states_match_at_every_shape():
    """The exported graph has dynamic batch and length: no shape is baked in by the trace."""
    model = base_model(make_model())
    forward = rt.load_runtime("onnx-int8", model, fingerprint="tiny-llama")  # shares _pair()'s export
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (1, 5), (3, 8), (4, 37)]:
        ids = torch.randint(4, 100, shape, generator=g)
        mask = torch.ones_like(ids)
        mask[-1, shape[1] // 2 + 1 :] = 0  # right padding in the last row
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = forward(ids, mask)
        assert got.shape == want.shape and got.dtype == torch.float32
        keep = mask.bool()
        scale = want[keep].abs().max()
        assert (got[keep] - want[keep]).abs().max() < 0.05 * scale, shape


def test_pooling_positions_are_the_encoders_own():
    """The runtime only replaces the forward: with a runtime that *is* the torch forward, the
    vectors are the torch encoder's for every template (to float rounding: the torch encoder runs
    its last layer's position-wise modules at the pooled rows only, ``llara.modeling.read_rows``, so
    its products round over fewer rows; a wrong pooled position would differ by far more)."""
    for template in ("llara", "eos", "mean", "prompteol"):
        a, b = _pair(template=template)  # one export, then the cache
        model = base_model(b.model)
        b._forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state
        np.testing.assert_allclose(a.encode(TEXTS, "passage", batch_size=3), b.encode(TEXTS, "passage", batch_size=3),
                                   rtol=1e-5, atol=1e-6)


def test_export_is_cached_by_fingerprint(monkeypatch, tmp_path):
    monkeypatch.setenv("LLARA_CACHE", str(tmp_path / "cache"))
    calls = []
    real = rt.export_onnx_int8
    monkeypatch.setattr(rt, "export_onnx_int8", lambda m, out: calls.append(out) or real(m, out))
    first = Encoder(make_model(), make_tokenizer(), "llara", show_progress=False, runtime="onnx-int8", fingerprint="w1")
    again = Encoder(make_model(), make_tokenizer(), "llara", show_progress=False, runtime="onnx-int8", fingerprint="w1")
    other = Encoder(make_model(seed=1), make_tokenizer(), "llara", show_progress=False, runtime="onnx-int8",
                    fingerprint="w2")
    assert len(calls) == 2 and calls[0] != calls[1]  # "again" read the cache
    assert list((tmp_path / "cache" / "runtimes").glob("*/model.onnx")) and not list(
        (tmp_path / "cache" / "runtimes").glob("*.tmp-*"))
    np.testing.assert_array_equal(first.encode(TEXTS, "query"), again.encode(TEXTS, "query"))
    assert not np.allclose(first.encode(TEXTS, "query"), other.encode(TEXTS, "query"))


def test_embedding_cache_keys_differ_by_runtime(tmp_path):
    a, b = _pair(cache_dir=tmp_path / "emb")
    assert a.cache_key(TEXTS, "query", a.template) != b.cache_key(TEXTS, "query", b.template)


def test_new_slot_tokens_re_export():
    """A template whose slot tokens grow the vocabulary gets a runtime with the new embedding rows."""
    n = len(make_tokenizer())  # no spare embedding rows: the slot tokens must grow the matrix
    a = Encoder(make_model(vocab_size=n), make_tokenizer(), "eos", show_progress=False)
    b = Encoder(make_model(vocab_size=n), make_tokenizer(), "eos", show_progress=False, runtime="onnx-int8")
    before = b._forward
    x, y = a.encode_multi(TEXTS, "passage", ["llara"])["llara"], b.encode_multi(TEXTS, "passage", ["llara"])["llara"]
    assert b._forward is not before and b._forward.vocab_size == len(b.tokenizer)
    np.testing.assert_allclose(y, x, atol=ATOL)


def test_weights_use_7_bits_only_on_x86_without_vnni(monkeypatch):
    # ONNX Runtime's u8 x s8 kernel saturates 16-bit pair sums on x86 without VNNI (an AVX2-only EPYC put
    # 7% of the components off by up to 0.077 with 8-bit weights; the tolerance test above caught it)
    assert rt.int8_reduce_range("x86_64", {"avx2", "fma"}) is True
    assert rt.int8_reduce_range("x86_64", {"avx2", "avx512f", "avx512_vnni"}) is False
    assert rt.int8_reduce_range("x86_64", {"avx2", "avx_vnni"}) is False
    assert rt.int8_reduce_range("aarch64", set()) is False
    keys = set()
    for flags in ({"avx2"}, {"avx512_vnni"}):  # the choice is part of the cached model's key
        monkeypatch.setattr(rt, "int8_reduce_range", lambda flags=flags: "avx512_vnni" not in flags)
        keys.add(rt.runtime_key("fp", 100))
    assert len(keys) == 2


def test_bad_runtime_and_dtype_are_refused():
    with pytest.raises(ValueError, match="unknown runtime 'onnx'"):
        Encoder(make_model(), make_tokenizer(), "eos", runtime="onnx")
    with pytest.raises(ValueError, match="quantises fp32 weights"):
        Encoder.from_pretrained("default", runtime="onnx-int8", dtype="bfloat16")


def test_index_and_search_with_the_int8_runtime(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=30)
    assert main(["index", "--model", str(model), "--corpus", str(corpus), "--output", str(tmp_path / "idx"),
                 "--runtime", "onnx-int8", "--shard-size", "16", "--device", "cpu"]) == 0
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"]["runtime"] == "onnx-int8"
    s = Searcher.from_index(tmp_path / "idx")
    assert s.encoder.runtime == "onnx-int8"  # queries encoded like the passages
    t = Searcher.from_index(tmp_path / "idx", runtime="torch")
    assert t.encoder.runtime == "torch"
    query = "fish in the river"
    assert [h.doc_id for h in s.search(query, k=5)[0]][:3] == [h.doc_id for h in t.search(query, k=5)[0]][:3]
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--json", "-k", "3", query]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3
