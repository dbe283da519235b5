"""A small corpus and a saved tiny model, for index, search and service tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import WORDS, make_model, make_tokenizer

from llara.modeling.encoder import Encoder

TEXT_WORDS = [w for w in WORDS if w.isalpha()]


def write_corpus(path: Path, n: int = 23, seed: int = 0) -> Path:
    """``n`` documents with ids d0..d{n-1}, texts of 3-40 words, titles on every other document."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            doc = {"_id": f"d{i}", "text": " ".join(rng.choices(TEXT_WORDS, k=rng.randint(3, 40)))}
            if i % 2 == 0:
                doc["title"] = " ".join(rng.choices(TEXT_WORDS, k=3))
            fh.write(json.dumps(doc) + "\n")
    return path


def make_encoder(**kw) -> Encoder:
    return Encoder(make_model(), make_tokenizer(), "eos", show_progress=False, **kw)


def save_model(out_dir: Path) -> Path:
    """A llara checkpoint directory that ``Encoder.from_pretrained`` loads (template ``eos``)."""
    return make_encoder().save(out_dir)


def index_setup(root: Path, n: int, shard_size: int, **kw) -> dict:
    """A saved tiny model, a corpus of ``n`` documents, the model loaded back and a Flat index of the corpus
    (``kw``: more ``build_index`` arguments)."""
    from llara.retrieval.index import build_index

    model_dir = save_model(root / "model")
    corpus = write_corpus(root / "corpus.jsonl", n=n)
    encoder = Encoder.from_pretrained(str(model_dir), show_progress=False)
    ref = build_index(encoder, corpus, root / "ref", model_spec=str(model_dir), shard_size=shard_size, **kw)
    return {"root": root, "model": model_dir, "corpus": corpus, "encoder": encoder, "ref": ref}
