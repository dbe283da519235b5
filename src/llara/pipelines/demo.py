"""``llara demo``, the README's main job: evaluate the embedded model, adapt it with LLaRA on the demo
collection's own corpus (unsupervised: no queries, no judgments), evaluate again, compare.

Writes ``<output>/before/`` (BM25 and the untrained model), ``<output>/adapt/`` (the adaptation
run), ``<output>/after/`` (the adapted slots, and their hybrid with the BM25 run of step 1) and
``<output>/summary.md`` / ``summary.json``. What is shown on the way goes through a :class:`Report`
(the CLI prints it with rich).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ..data.beir import load_beir
from ..data.pretrain import PretrainDataConfig
from ..evaluation.runner import Result, evaluate_datasets, evaluate_hybrid, markdown_table, save_result, write_summary
from ..retrieval.fusion import FusionConfig
from ..training.config import TrainConfig
from ..training.pretrain import pretrain

METRICS = ("ndcg@10", "recall@100", "mrr@10")


class Report(Protocol):
    def line(self, *parts: "str | tuple[str, str]") -> None:
        """A line of plain strings and ``(text, style)`` pairs (``style``: a rich style name)."""

    def table(self, results: Sequence[Result], title: str) -> None:
        """A table of results."""


@dataclass
class DemoConfig:
    dataset: str  # a BEIR-format directory (the CLI's default: the shipped med collection)
    output: str = "runs/demo"
    model: str = "default"
    templates: Sequence[str] = ("mean", "eos", "llara")  # mean and eos share one forward pass
    adapt_steps: int = 32  # 0: zero-shot only
    adapt_batch_size: int = 8
    adapt_lr: float = 5e-5
    adapt_chunk_tokens: int = 96
    split: str = "test"
    k: int = 100
    fusion: FusionConfig = field(default_factory=FusionConfig)
    cpu: bool = False  # train on the CPU even where a GPU is available
    max_query_length: int = 64  # shown in the first line; the encoder factory applies them
    max_passage_length: int = 112

    def __post_init__(self):
        for name in ("adapt_batch_size", "adapt_chunk_tokens", "k", "max_query_length", "max_passage_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adapt_steps < 0:
            raise ValueError(f"adapt_steps must be >= 0 (0: zero-shot only), got {self.adapt_steps}")
        if not self.adapt_lr > 0:
            raise ValueError(f"adapt_lr must be > 0, got {self.adapt_lr}")
        if not self.templates:
            raise ValueError("templates is empty: give at least one")


@dataclass
class DemoResult:
    rows: list[Result]  # before (untrained) and after (adapted) results, as in summary.md
    ndcg: dict[str, float]  # nDCG@10 by column: llara, adapted, mean, bm25, hybrid (those run)
    loss_plot: Path | None = None
    adapted_model: Path | None = None


def run_demo(cfg: DemoConfig, make_encoder: Callable[[str, Sequence[str]], Any], report: Report) -> DemoResult:
    """Run the demo; ``make_encoder(model, templates)`` builds the encoder for a model spec."""
    out = Path(cfg.output)
    corpus = Path(cfg.dataset) / "corpus.jsonl"
    report.line(("llara demo", "bold"), f": model={cfg.model}, collection={cfg.dataset}. Passages are truncated to "
                f"{cfg.max_passage_length} tokens and queries to {cfg.max_query_length} (prompts included), to "
                "finish in minutes on a laptop CPU.")
    report.line(("1/3", "bold"), " zero-shot: BM25 and the untrained model's embeddings")
    before_pairs = evaluate_datasets([cfg.dataset], ["bm25", "dense"], out / "before", templates=cfg.templates,
                                     encoder=lambda: make_encoder(cfg.model, cfg.templates), split=cfg.split,
                                     k=cfg.k, fusion=cfg.fusion)
    before = [r for r, _ in before_pairs]
    report.table(before, "before adaptation (zero-shot)")
    if cfg.adapt_steps <= 0:
        return DemoResult(before, {})

    report.line(("2/3", "bold"), f" LLaRA adaptation (EBAE + EBAR + LM loss) on {corpus} for {cfg.adapt_steps} "
                f"steps of {cfg.adapt_batch_size} (chunk, next chunk) pairs: unlabelled text only")
    train_cfg = TrainConfig(output_dir=str(out / "adapt"), max_steps=cfg.adapt_steps, batch_size=cfg.adapt_batch_size,
                            lr=cfg.adapt_lr, save_every=max(cfg.adapt_steps // 2, 1), seed=0, resume=True,
                            cpu=cfg.cpu, progress=sys.stderr.isatty())
    result = pretrain(cfg.model, [str(corpus)], train_cfg, PretrainDataConfig(chunk_tokens=cfg.adapt_chunk_tokens))

    report.line(("3/3", "bold"), " the adapted model's slot embeddings")
    adapted = str(result.export_dir)
    after_pairs = evaluate_datasets([cfg.dataset], ["dense"], out / "after", templates=["llara"],
                                    encoder=lambda: make_encoder(adapted, ["llara"]), split=cfg.split, k=cfg.k,
                                    fusion=cfg.fusion)
    # hybrid: the BM25 run of step 1 fused with the adapted run of step 3 (no new retrieval, no encoding)
    bm25_pair = next(p for p in before_pairs if p[0].retrieval == "bm25")
    hybrid = evaluate_hybrid(load_beir(cfg.dataset, split=cfg.split), bm25_pair, after_pairs[0], cfg.fusion, k=cfg.k)
    save_result(*hybrid, out / "after")
    after = [r for r, _ in after_pairs] + [hybrid[0]]
    for r in after:
        r.model = "adapted"
    rows = [r for r in before if r.template != "eos"] + after
    report.table(rows, f"before and after {cfg.adapt_steps} adaptation steps")
    get = {("hybrid" if r.retrieval == "hybrid" else "adapted") if r.model == "adapted" else r.template: r.metrics
           for r in rows}
    names = {"llara": "untrained slots", "adapted": "adapted slots", "mean": "untrained mean pooling", "bm25": "BM25",
             "hybrid": f"hybrid: BM25 + adapted slots ({cfg.fusion.describe()})"}
    cols = [c for c in names if c in get]  # the templates may leave out mean (or the untrained slots)
    header = markdown_table(["metric", *(names[c] for c in cols)],
                            ([k, *(f"{get[c][k]:.4f}" for c in cols)] for k in METRICS))
    write_summary(rows, out, header=header)
    return DemoResult(rows, {c: get[c]["ndcg@10"] for c in cols}, result.plot_path, result.export_dir)
