"""Encoder.encode's pipeline: token-budget batches, windows, the background worker, the input order."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from tiny import WORDS, make_model, make_tokenizer

import llara.modeling.encoder as encoder_module
from llara.modeling.embed import plan_batches, tokenize
from llara.modeling.encoder import Encoder


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _encoder(**kw) -> Encoder:
    return Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False, **kw)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llara-encode-prefetch"]


@pytest.mark.parametrize("batch_size, budget, multiple", [(None, 64, 1), (4, 64, 8), (3, None, 1), (None, 37, 1),
                                                          (100, 1000, 8)])
def test_planned_batches_hold_every_row_once_within_both_limits(batch_size, budget, multiple):
    lengths = np.random.default_rng(1).integers(1, 30, size=101)
    batches = plan_batches(lengths, batch_size, budget, multiple)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[rows]) <= 0)  # longest first, across and inside batches
    for b in batches:
        width = -(-int(lengths[b].max()) // multiple) * multiple
        assert batch_size is None or len(b) <= batch_size
        assert budget is None or len(b) * width <= budget
        if budget is not None and batch_size is None and b is not batches[-1]:
            assert (len(b) + 1) * width > budget  # filled: one more row would not fit


def test_planning_refuses_a_text_wider_than_the_budget_and_no_limit():
    with pytest.raises(ValueError, match="exceeds max_batch_tokens=8"):
        plan_batches([5, 9], None, 8)
    with pytest.raises(ValueError, match="exceeds max_batch_tokens=8"):
        plan_batches([5, 7], None, 8, multiple=8 * 2)  # 7 pads to 16
    with pytest.raises(ValueError, match="batch_size, max_batch_tokens or both"):
        plan_batches([5], None, None)


def test_token_budget_batches_never_exceed_the_budget_and_restore_the_order(monkeypatch):
    monkeypatch.setattr(encoder_module, "WINDOW_TEXTS", 8)  # several windows
    texts = _texts(40)
    enc = _encoder(batch_size=None, max_batch_tokens=96, max_passage_length=48, pad_to_multiple_of=4)
    batches = list(enc.batches(texts, "passage"))
    assert all(b.input_ids.numel() <= 96 for _, b in batches)
    assert max(b.input_ids.size(0) for _, b in batches) > 2  # the short texts share batches
    assert sorted(np.concatenate([r for r, _ in batches]).tolist()) == list(range(40))
    together = enc.encode(texts, "passage")
    assert enc.last_stats.padded_tokens == sum(b.input_ids.numel() for _, b in batches)
    assert enc.last_stats.tokens == sum(int(b.attention_mask.sum()) for _, b in batches)
    alone = np.stack([enc.encode([t], "passage")[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # row i is text i's vector, whatever its batch


def test_background_worker_equals_the_plain_path(monkeypatch):
    monkeypatch.setattr(encoder_module, "WINDOW_TEXTS", 16)
    texts = _texts(50, seed=2)
    enc = _encoder(batch_size=6, max_batch_tokens=160, max_passage_length=40)
    threaded = enc.encode_multi(texts, "passage", ["llara", "mean"])
    threaded_stats = enc.last_stats
    enc.prefetch = 0  # the same plan, built inline
    plain = enc.encode_multi(texts, "passage", ["llara", "mean"])
    for name in ("llara", "mean"):
        np.testing.assert_array_equal(threaded[name], plain[name])
    assert (threaded_stats.tokens, threaded_stats.padded_tokens) == (enc.last_stats.tokens,
                                                                     enc.last_stats.padded_tokens)
    # and the same vectors as a fixed batch size without a budget (other batches, same rows)
    fixed = _encoder(batch_size=5, max_passage_length=40)
    fixed.model.load_state_dict(enc.model.state_dict())
    np.testing.assert_allclose(fixed.encode(texts, "passage"), threaded["llara"], atol=1e-5)


def test_per_call_budget_and_the_truncation_count(monkeypatch):
    monkeypatch.setattr(encoder_module, "WINDOW_TEXTS", 4)
    texts = _texts(13, seed=3) + [" ".join(["text"] * 80)] * 2
    enc = _encoder(max_passage_length=32)
    cut = tokenize(enc.tokenizer, enc.encoded_side("passage"), texts, 32)[1]  # all texts in one call
    assert cut >= 2
    default = enc.encode(texts, "passage")
    assert enc.last_stats.truncated == cut  # counted per window, summed over the windows
    budgeted = enc.encode(texts, "passage", max_batch_tokens=64)
    assert enc.last_stats.truncated == cut
    assert all(b.input_ids.numel() <= 64 for _, b in enc.batches(texts, "passage", max_batch_tokens=64))
    np.testing.assert_allclose(budgeted, default, atol=1e-5)


def test_a_tokenizer_error_in_the_worker_raises_in_encode(monkeypatch):
    monkeypatch.setattr(encoder_module, "WINDOW_TEXTS", 4)
    real = encoder_module.tokenize
    calls = []

    def failing(*a, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("tokenizer broke on window 3")
        return real(*a, **kw)

    monkeypatch.setattr(encoder_module, "tokenize", failing)
    enc = _encoder(batch_size=2)
    result = {}

    def run():  # in a thread, so that a hang fails the test instead of stalling the suite
        try:
            enc.encode(_texts(20), "passage")
        except RuntimeError as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "encode hung after the worker failed"
    assert "tokenizer broke on window 3" in str(result.get("error"))
    assert set(calls) == {"llara-encode-prefetch"}  # tokenised in the background
    assert not _prefetch_threads()


def test_an_error_in_the_forward_pass_stops_the_worker(monkeypatch):
    monkeypatch.setattr(encoder_module, "WINDOW_TEXTS", 4)
    enc = _encoder(batch_size=2, prefetch=1)
    seen = []

    def broken(batch):
        seen.append(batch.input_ids.size(0))
        raise MemoryError("out of memory in the forward pass")

    monkeypatch.setattr(enc, "forward", broken)
    with pytest.raises(MemoryError, match="out of memory"):
        enc.encode(_texts(30), "passage")
    assert seen == [2] and not _prefetch_threads()  # the worker stopped instead of blocking on its queue


def test_a_budget_below_one_max_length_text_is_refused():
    enc = _encoder(max_passage_length=48, max_query_length=32, pad_to_multiple_of=8, batch_size=None,
                   max_batch_tokens=40)
    assert enc.encode(["dense retrieval"], "query").shape == (1, enc.model.config.hidden_size)
    with pytest.raises(ValueError, match=r"max_batch_tokens=40 is below one passage of max length 48"):
        enc.encode(_texts(3), "passage")
    with pytest.raises(ValueError, match="give batch_size, max_batch_tokens or both"):
        _encoder(batch_size=None)
