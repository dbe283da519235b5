"""Opt-in (LLARA_SLOW=1): the real embedded SmolLM2-135M-Instruct, converted from its GGUF file."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_embedded_model_is_a_real_llm():
    from llara.modeling.loading import load_model

    model, tok, resolved = load_model("default", causal_lm=True, device="cpu")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_embedded_model_encodes_and_ranks_sensibly():
    from llara.modeling.encoder import Encoder

    enc = Encoder.from_pretrained("default", template="mean", device="cpu", show_progress=False)
    q = enc.encode_queries(["How do fish breathe under water?"])
    d = enc.encode_corpus([
        {"title": "Gills", "text": "Fish breathe by taking oxygen from water through their gills."},
        {"title": "Tax law", "text": "The income tax rate was changed by the finance act of 1998."},
    ])
    assert q.shape == (1, 576) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    scores = (q @ d.T)[0]
    assert scores[0] > scores[1]
