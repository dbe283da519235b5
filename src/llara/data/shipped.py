"""Training pairs shipped inside the package (redistributable, attribution in each directory's README)."""
from __future__ import annotations

from pathlib import Path

PAIRS_DIR = Path(__file__).parent / "pairs"
SHIPPED_PAIRS = ("squad",)  # squad: 10,570 SQuAD v1.1 questions and their paragraphs (CC BY-SA 4.0)


def shipped_pairs(name: str) -> dict[str, Path]:
    """The BEIR files of a shipped pair set: ``{"corpus", "queries", "qrels"}`` (the ``train`` split)."""
    if name not in SHIPPED_PAIRS:
        raise ValueError(f"no shipped pairs named {name!r}; shipped: {', '.join(SHIPPED_PAIRS)}")
    d = PAIRS_DIR / name
    return {"corpus": d / "corpus.jsonl.gz", "queries": d / "queries.jsonl.gz", "qrels": d / "qrels" / "train.tsv.gz"}
