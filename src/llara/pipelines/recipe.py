"""``llara recipe``: the whole path on a corpus of yours, in one resumable command.

1. **adapt**: LLaRA adaptation (EBAE + EBAR + LM) on the corpus's own text (no labels);
2. **mine**: BM25 hard negatives for the training pairs (by default the SQuAD pairs shipped with
   llara, CC BY-SA 4.0; or a BEIR directory with ``qrels/train.tsv``; or ready ``{query, pos, neg}``
   lines);
3. **finetune**: contrastive fine-tuning of the adapted model (``llara finetune``'s defaults);
4. **index**: the corpus encoded by the fine-tuned model into a FAISS + BM25 index directory
   (``llara search`` / ``llara serve`` read it; hybrid search works out of the box).

Every stage writes into ``<output>/`` and is skipped when its output is complete; a stage cut off
half-way resumes from its checkpoint (training) or its last shard (index). ``<output>/recipe.json``
records each stage's settings, output and wall time.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.pretrain import PretrainDataConfig
from ..data.shipped import SHIPPED_PAIRS, shipped_pairs
from ..io import write_json
from ..retrieval.index import build_index
from ..retrieval.mining import MiningConfig, mine
from ..training.finetune import FINETUNE_TRAIN_DEFAULTS, FinetuneConfig, finetune, finetune_train_config
from ..training.config import TrainConfig
from ..training.pretrain import pretrain

STAGES = ("adapt", "mine", "finetune", "index")


def _f(default: Any, help: str) -> Any:
    """A field with the ``help`` that :func:`~llara.training.config.add_config_arguments` turns into a flag."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RecipeConfig:
    """The settings of ``llara recipe`` (every field but ``corpus`` and ``cpu`` is a flag of the command)."""

    corpus: str = field(metadata={"help": "BEIR corpus.jsonl ({_id, title, text}): adapted on, then indexed"})
    output: str = _f("runs/recipe", "run directory: adapt/, pairs.jsonl, finetune/, index/, recipe.json")
    model: str = _f("default", "model to start from (same forms as for evaluate)")
    pairs: str = _f("squad", f"training pairs: shipped ({', '.join(SHIPPED_PAIRS)}: 10,570 SQuAD v1.1 questions, "
                             "CC BY-SA 4.0), a BEIR directory with qrels/train.tsv, or {query, pos, neg} lines")
    adapt_steps: int = _f(50, "adaptation steps; 0: fine-tune the model as given")
    adapt_lr: float = _f(5e-5, "adaptation learning rate")
    adapt_batch_size: int = _f(8, "(chunk, next chunk) pairs per adaptation step")
    chunk_tokens: int = _f(96, "adaptation chunk length")
    finetune_steps: int = _f(32, "fine-tuning steps; 0: none")
    batch_size: int = _f(8, "queries per fine-tuning step")
    group_size: int = _f(2, "passages per query: 1 positive + group_size - 1 hard negatives (+ in-batch negatives)")
    negatives: int = _f(7, "BM25 hard negatives mined per query (fine-tuning samples group_size - 1 of them)")
    window: list[int] = _f([5, 100], "BM25 ranks LO HI the negatives are drawn from")
    max_passage_length: int = _f(96, "tokens per passage in training and index, prompt included")
    max_query_length: int = _f(64, "tokens per query, prompt included")
    seed: int = _f(0, "seed of adaptation, mining and fine-tuning")
    cpu: bool = _f(False, "train on the CPU even where a GPU is available")
    progress: bool = _f(True, "progress bars")

    def __post_init__(self):
        for name in ("adapt_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.finetune_steps == 0 and self.adapt_steps == 0:
            raise ValueError("adapt_steps and finetune_steps are both 0: nothing to train")
        if len(self.window) != 2:
            raise ValueError(f"window takes two ranks LO HI, got {self.window}")
        if not Path(self.corpus).is_file():
            raise ValueError(f"{self.corpus}: no such corpus file (a BEIR corpus.jsonl)")
        self.window = list(self.window)


def _pairs_source(pairs: str) -> dict[str, Any]:
    """mine()'s inputs for ``pairs``, or ``{"train": path}`` when it is already mined."""
    if pairs in SHIPPED_PAIRS:
        return {k: str(v) for k, v in shipped_pairs(pairs).items()}
    p = Path(pairs)
    if p.is_dir() and (p / "qrels" / "train.tsv").is_file():
        return {"corpus": str(p / "corpus.jsonl"), "queries": str(p / "queries.jsonl"),
                "qrels": str(p / "qrels" / "train.tsv")}
    if p.is_file():
        return {"train": str(p)}
    raise ValueError(f"--pairs {pairs!r}: not a shipped pair set ({', '.join(SHIPPED_PAIRS)}), a BEIR directory "
                     "with qrels/train.tsv, or a training .jsonl file")


def _index_complete(index_dir: Path) -> bool:
    manifest = index_dir / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def run_recipe(cfg: RecipeConfig, make_encoder: Callable[[str], Any], say: Callable[[str], None] = print) -> dict:
    """Run the stages not yet done; returns (and writes to ``<output>/recipe.json``) what each did.
    ``make_encoder(model_dir)`` builds the index's encoder (the CLI passes its device/dtype flags).

    A stage is done when its output is there and ``recipe.json`` records it made with the same settings
    (its own and those of every stage before it). A training stage asked for more steps continues from
    its last checkpoint; one whose other settings changed is an error (its run directory is kept). Mining
    and the index are rebuilt when their settings or their model changed.

    Examples:
        The shipped MED abstracts as "your corpus", a tiny random ``model_dir`` and a few
        steps (``pairs``: ``{query, pos, neg}`` lines; by default the shipped SQuAD pairs are mined):

        >>> from llara import Encoder, Searcher, run_recipe
        >>> from llara.pipelines.recipe import RecipeConfig
        >>> cfg = RecipeConfig(corpus=str(med / "corpus.jsonl"), output=str(tmp / "recipe"), model=model_dir,
        ...                    pairs=str(pairs), adapt_steps=2, adapt_batch_size=2, chunk_tokens=32,
        ...                    finetune_steps=2, batch_size=2, cpu=True, progress=False)
        >>> record = run_recipe(cfg, lambda m: Encoder.from_pretrained(m, show_progress=False), say=lambda line: None)
        >>> list(record["stages"])
        ['adapt', 'finetune', 'index']
        >>> len(Searcher.from_index(record["index"]).search("lung cancer", k=5)[0])
        5
    """
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "recipe.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["config"] = asdict(cfg)
    stages = record.setdefault("stages", {})
    source = _pairs_source(cfg.pairs)

    def stage(name: str, what: str, fn: Callable[[], Any], output_ok: bool, settings: dict, *,
              steps: int | None = None, run_dir: Path | None = None, **info) -> dict:
        """Run ``fn`` unless done; returns the settings that describe the stage's output (for the next)."""
        i, prev = STAGES.index(name) + 1, stages.get(name)
        made = {"settings": settings, "steps": steps}
        if prev and output_ok and {k: prev.get(k) for k in made} == made:
            say(f"{i}/4 {name}: already done ({what})")
            return made
        if prev and run_dir is not None and run_dir.exists():
            changed = sorted(k for k in set(prev["settings"]) | set(settings)
                             if prev["settings"].get(k) != settings.get(k))
            if changed or steps < prev["steps"]:
                why = f"other settings ({', '.join(changed)})" if changed else f"{prev['steps']} steps, not {steps}"
                raise ValueError(f"{run_dir} was trained with {why}: delete it, or choose another --output")
            what += f" (continuing from step {prev['steps']})"
        elif prev and run_dir is None:
            what += " (rebuilt: its settings or its model changed)"
        say(f"{i}/4 {name}: {what}")
        t0 = time.perf_counter()
        fn()
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), **made, **info}
        write_json(record_path, record)
        return made

    model, shaped = cfg.model, {"model": cfg.model}  # the model so far, and what shaped it
    corpus = str(Path(cfg.corpus).resolve())
    if cfg.adapt_steps:
        adapt_dir = out / "adapt"
        train_cfg = TrainConfig(output_dir=str(adapt_dir), max_steps=cfg.adapt_steps, batch_size=cfg.adapt_batch_size,
                                lr=cfg.adapt_lr, save_every=max(cfg.adapt_steps // 4, 1), seed=cfg.seed, resume=True,
                                cpu=cfg.cpu, progress=cfg.progress)
        shaped = stage("adapt", f"{cfg.adapt_steps} steps of EBAE + EBAR + LM on {cfg.corpus} (chunks of "
                       f"{cfg.chunk_tokens} tokens)",
                       lambda: pretrain(cfg.model, [cfg.corpus], train_cfg,
                                        PretrainDataConfig(chunk_tokens=cfg.chunk_tokens)),
                       (adapt_dir / "final" / "llara.json").is_file(),
                       {**shaped, "corpus": corpus, "lr": cfg.adapt_lr, "batch_size": cfg.adapt_batch_size,
                        "chunk_tokens": cfg.chunk_tokens, "seed": cfg.seed},
                       steps=cfg.adapt_steps, run_dir=adapt_dir, model=str(adapt_dir / "final"))
        model = str(adapt_dir / "final")

    if "train" in source:
        train, pairs = Path(source["train"]), {"train": str(Path(source["train"]).resolve())}
    else:
        train = out / "pairs.jsonl"
        mining = MiningConfig(window=tuple(cfg.window), num_negatives=max(cfg.negatives, cfg.group_size - 1),
                              seed=cfg.seed)
        pairs = stage("mine", f"BM25 hard negatives (ranks {cfg.window[0]}-{cfg.window[1]}) "
                      f"for the {cfg.pairs} pairs",
                      lambda: mine(source["corpus"], train, queries=source["queries"], qrels=source["qrels"],
                                   method="bm25", config=mining),
                      train.is_file(), {"pairs": cfg.pairs, "window": cfg.window,
                                        "negatives": mining.num_negatives, "seed": cfg.seed}, output=str(train))

    if cfg.finetune_steps:
        ft_dir = out / "finetune"
        train_cfg = finetune_train_config(output_dir=str(ft_dir), max_steps=cfg.finetune_steps,
                                          batch_size=cfg.batch_size, save_every=max(cfg.finetune_steps // 4, 1),
                                          seed=cfg.seed, resume=True, cpu=cfg.cpu, progress=cfg.progress)
        ft_cfg = FinetuneConfig(group_size=cfg.group_size, max_query_length=cfg.max_query_length,
                                max_passage_length=cfg.max_passage_length, data_seed=cfg.seed)
        shaped = stage("finetune", f"{cfg.finetune_steps} contrastive steps of {cfg.batch_size} queries x "
                       f"{cfg.group_size} passages from {model}",
                       lambda: finetune(model, str(train), train_cfg, ft_cfg),
                       (ft_dir / "final" / "llara.json").is_file(),
                       {"start": shaped, "pairs": pairs, "batch_size": cfg.batch_size, "group_size": cfg.group_size,
                        "max_query_length": cfg.max_query_length, "max_passage_length": cfg.max_passage_length,
                        "seed": cfg.seed, **{k: getattr(train_cfg, k) for k in FINETUNE_TRAIN_DEFAULTS}},
                       steps=cfg.finetune_steps, run_dir=ft_dir, model=str(ft_dir / "final"))
        model = str(ft_dir / "final")

    index_dir = out / "index"

    def build():
        if "index" in stages and index_dir.exists():  # built for another model or corpus: rebuilt, not resumed
            shutil.rmtree(index_dir)
        build_index(make_encoder(model), cfg.corpus, index_dir, model_spec=model, resume=True, bm25=True)

    stage("index", f"{cfg.corpus} encoded by {model} + BM25", build, _index_complete(index_dir),
          {"model": shaped, "corpus": corpus}, output=str(index_dir))
    record["model"], record["index"] = model, str(index_dir)
    write_json(record_path, record)
    return record
