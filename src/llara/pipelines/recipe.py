"""``llara recipe``: the whole path on a corpus of yours, in one resumable command.

1. **adapt**: LLaRA adaptation (EBAE + EBAR + LM) on the corpus's own text (no labels);
2. **mine**: training pairs with BM25 hard negatives: the SQuAD pairs shipped with llara (CC BY-SA
   4.0), pairs made from the corpus itself (title -> text, inverse cloze task, doc2query by the model;
   :mod:`llara.retrieval.corpus_pairs`), a mix of these (``--pairs squad:1,title:1,ict:2``), a BEIR
   directory with ``qrels/train.tsv``, or ready ``{query, pos, neg}`` lines;
3. **finetune**: contrastive fine-tuning of the adapted model (``llara finetune``'s defaults);
4. **index**: the corpus encoded by the fine-tuned model into a FAISS + BM25 index directory
   (``llara search`` / ``llara serve`` read it; hybrid search works out of the box).

Every stage writes into ``<output>/`` and is skipped when its output is complete; a stage cut off
half-way resumes from its checkpoint (training) or its last shard (index). ``<output>/recipe.json``
records each stage's settings, output and wall time.

``budget_minutes`` (30 by default) caps the run's time: after the pairs are made, a 3-step probe run
measures the fine-tuning step, the index time is estimated from it, and when ``finetune_steps`` would not
fit the rest of the budget, fewer steps are run (said either way). On a CPU with fast bf16 the default
128 steps fit with room to spare; on one without (fp32 training, about 3x slower) they may not. ``eval`` (a BEIR directory with queries and qrels of the same
corpus) ends the run with dense, BM25 and hybrid nDCG@10 / Recall@100 of the index it built
(``<output>/eval.md`` and ``eval.json``).
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
from ..io import iter_jsonl, write_json, write_text
from ..retrieval.corpus_pairs import PairsConfig, build_pairs, check_titles, parse_mix
from ..retrieval.index import build_index
from ..retrieval.mining import MiningConfig, mine
from ..training.finetune import FINETUNE_TRAIN_DEFAULTS, FinetuneConfig, finetune, finetune_train_config
from ..training.config import TrainConfig
from ..training.pretrain import pretrain
from .recipe_budget import PROBE_STEPS, budget_steps
from .recipe_eval import eval_files, eval_table, evaluate_index

STAGES = ("adapt", "mine", "finetune", "index")
# The default pair mix, chosen by benchmarks/recipe.py --stage compare (benchmarks/results/recipe_compare.md).
AUTO_PAIRS = "squad:1,title:1,ict:1"


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
    pairs: str = _f("auto", f"training pairs: auto (the default: {AUTO_PAIRS}, without title where no document "
                             "has one), or a mix NAME:RATIO,... of "
                             f"{', '.join(SHIPPED_PAIRS)} (10,570 SQuAD v1.1 "
                             "questions shipped with llara, CC BY-SA 4.0), title (title -> text of your corpus), ict "
                             "(inverse cloze task: a sentence -> the rest of its document) and d2q (queries written "
                             "by the model, an instruct model) e.g. squad:1,title:1,ict:2; or a BEIR directory with "
                             "qrels/train.tsv; or a .jsonl of {query, pos, neg} lines")
    d2q_docs: int = _f(200, "documents the d2q source writes queries for (at most)")
    budget_minutes: float = _f(30.0, "time budget of the whole run: when finetune_steps would not fit it (from a "
                                     "measured step time), fewer are run; 0: no budget. To fill a budget, ask for "
                                     "more steps than fit (e.g. --finetune-steps 1024)")
    eval: str = _f("", "BEIR directory with queries.jsonl and qrels/test.tsv for this corpus: evaluate the index "
                       "(dense, BM25, hybrid) at the end and write eval.md")
    adapt_steps: int = _f(50, "adaptation steps; 0: fine-tune the model as given")
    adapt_lr: float = _f(5e-5, "adaptation learning rate")
    adapt_batch_size: int = _f(8, "(chunk, next chunk) pairs per adaptation step")
    chunk_tokens: int = _f(96, "adaptation chunk length")
    finetune_steps: int = _f(128, "fine-tuning steps; 0: none")
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
        if self.budget_minutes < 0:
            raise ValueError(f"budget_minutes must be >= 0, got {self.budget_minutes}")
        if self.budget_minutes and not self.finetune_steps:
            raise ValueError("budget_minutes chooses fine-tuning steps: it needs finetune_steps > 0")
        if self.d2q_docs < 1:
            raise ValueError(f"d2q_docs must be >= 1, got {self.d2q_docs}")
        if self.eval:
            eval_files(self.eval)
        self.window = list(self.window)


def resolve_pairs(pairs: str, corpus: str, say: Callable[[str], None] = lambda line: None) -> str:
    """``pairs`` itself, or for ``auto`` the default mix (:data:`AUTO_PAIRS`) without ``title`` when no
    document of ``corpus`` has a title (a title source asked for by name on such a corpus is an error)."""
    if pairs != "auto":
        return pairs
    mix = parse_mix(AUTO_PAIRS)
    if "title" in mix and not any((row.get("title") or "").strip() for _, row in iter_jsonl(corpus)):
        mix.pop("title")
        say(f"pairs: {corpus} has no titles, so the default mix is without title pairs")
    return ",".join(f"{k}:{v:g}" for k, v in mix.items())


def _pairs_source(pairs: str) -> dict[str, Any]:
    """mine()'s inputs for ``pairs``, ``{"train": path}`` when it is already mined, or ``{"mix": {name:
    ratio}}`` for a mix that takes pairs from the corpus (a shipped set alone is mined as before)."""
    p = Path(pairs)
    if p.is_dir() and (p / "qrels" / "train.tsv").is_file():
        return {"corpus": str(p / "corpus.jsonl"), "queries": str(p / "queries.jsonl"),
                "qrels": str(p / "qrels" / "train.tsv")}
    if p.is_file():
        return {"train": str(p)}
    if p.is_dir() or "/" in pairs or pairs.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"--pairs {pairs!r}: no such training .jsonl file, or a directory without qrels/train.tsv")
    mix = parse_mix(pairs)
    if len(mix) == 1 and next(iter(mix)) in SHIPPED_PAIRS:
        return {k: str(v) for k, v in shipped_pairs(next(iter(mix))).items()}
    return {"mix": mix}


def _index_complete(index_dir: Path) -> bool:
    manifest = index_dir / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def _check_mix(cfg: RecipeConfig, mix: dict[str, float]) -> None:
    """What a mix needs of the corpus and the model, checked before any training."""
    if "title" in mix:
        from ..data.beir import load_corpus

        check_titles(load_corpus(cfg.corpus), cfg.corpus)
    if "d2q" in mix:
        from ..modeling.loading import load_tokenizer, resolve_model

        if not getattr(load_tokenizer(resolve_model(cfg.model).path), "chat_template", None):
            raise ValueError(f"--pairs {cfg.pairs!r}: d2q needs an instruct model with a chat template, and "
                             f"{cfg.model}'s tokenizer has none (drop d2q)")


def run_recipe(cfg: RecipeConfig, make_encoder: Callable[[str], Any], say: Callable[[str], None] = print,
               make_searcher: Callable[[str], Any] | None = None) -> dict:
    """Run the stages not yet done; returns (and writes to ``<output>/recipe.json``) what each did.
    ``make_encoder(model_dir)`` builds the index's encoder (the CLI passes its device/dtype flags);
    ``make_searcher(index_dir)`` the searcher of ``--eval`` (default :meth:`Searcher.from_index`).

    Each training stage keeps its last checkpoint only (an adaptation checkpoint of the embedded model
    holds its weights and AdamW states: 1.6 GB), enough to resume it or to continue it with more steps.

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
    pairs_spec = resolve_pairs(cfg.pairs, cfg.corpus, say)
    source = _pairs_source(pairs_spec)
    if "mix" in source:
        _check_mix(cfg, source["mix"])

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
        fn()  # may fill the dicts among ``info`` (recorded after it returns)
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), **made, **info}
        write_json(record_path, record)
        return made

    model, shaped = cfg.model, {"model": cfg.model}  # the model so far, and what shaped it
    corpus = str(Path(cfg.corpus).resolve())
    if cfg.adapt_steps:
        adapt_dir = out / "adapt"
        train_cfg = TrainConfig(output_dir=str(adapt_dir), max_steps=cfg.adapt_steps, batch_size=cfg.adapt_batch_size,
                                lr=cfg.adapt_lr, save_every=max(cfg.adapt_steps // 4, 1), seed=cfg.seed, resume=True,
                                keep_last=1, cpu=cfg.cpu, progress=cfg.progress)
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
    elif "mix" in source:
        train = out / "pairs.jsonl"
        negatives = max(cfg.negatives, cfg.group_size - 1)
        total = cfg.batch_size * max(cfg.finetune_steps, 1)
        pcfg = PairsConfig(window=tuple(cfg.window), num_negatives=negatives, seed=cfg.seed, d2q_docs=cfg.d2q_docs)
        sources: dict[str, Any] = {}

        def shipped_lines(name: str) -> list[dict]:
            mined = out / f"mined_{name}.jsonl"
            files = {k: str(v) for k, v in shipped_pairs(name).items()}
            mine(files["corpus"], mined, queries=files["queries"], qrels=files["qrels"], method="bm25",
                 config=MiningConfig(window=tuple(cfg.window), num_negatives=negatives, seed=cfg.seed))
            return [row for _, row in iter_jsonl(mined)]

        def generator():
            from ..modeling.loading import load_model

            model_, tokenizer, _ = load_model(cfg.model, causal_lm=True, device="cpu" if cfg.cpu else None)
            return model_, tokenizer

        mix_text = ", ".join(f"{k} {v:g}" for k, v in source["mix"].items())
        pairs = stage("mine", f"{total} training pairs mixed {mix_text}, BM25 hard negatives (ranks "
                      f"{cfg.window[0]}-{cfg.window[1]})",
                      lambda: sources.update(build_pairs(source["mix"], cfg.corpus, train, total, pcfg,
                                                         shipped_lines=shipped_lines, generator=generator, say=say)),
                      train.is_file(), {"pairs": pairs_spec, "corpus": corpus, "total": total, "window": cfg.window,
                                        "negatives": negatives, "seed": cfg.seed,
                                        **({"model": cfg.model, "d2q_docs": cfg.d2q_docs}
                                           if "d2q" in source["mix"] else {})},
                      output=str(train), sources=sources)
    else:
        train = out / "pairs.jsonl"
        mining = MiningConfig(window=tuple(cfg.window), num_negatives=max(cfg.negatives, cfg.group_size - 1),
                              seed=cfg.seed)
        pairs = stage("mine", f"BM25 hard negatives (ranks {cfg.window[0]}-{cfg.window[1]}) "
                      f"for the {pairs_spec} pairs",
                      lambda: mine(source["corpus"], train, queries=source["queries"], qrels=source["qrels"],
                                   method="bm25", config=mining),
                      train.is_file(), {"pairs": pairs_spec, "window": cfg.window,
                                        "negatives": mining.num_negatives, "seed": cfg.seed}, output=str(train))

    steps = cfg.finetune_steps
    ft_cfg = FinetuneConfig(group_size=cfg.group_size, max_query_length=cfg.max_query_length,
                            max_passage_length=cfg.max_passage_length, data_seed=cfg.seed)
    if cfg.budget_minutes and steps > PROBE_STEPS:
        steps = budget_steps(cfg, record, model, train, ft_cfg, say)
    if steps:
        ft_dir = out / "finetune"
        train_cfg = finetune_train_config(output_dir=str(ft_dir), max_steps=steps,
                                          batch_size=cfg.batch_size, save_every=max(steps // 4, 1), keep_last=1,
                                          seed=cfg.seed, resume=True, cpu=cfg.cpu, progress=cfg.progress)
        shaped = stage("finetune", f"{steps} contrastive steps of {cfg.batch_size} queries x "
                       f"{cfg.group_size} passages from {model}",
                       lambda: finetune(model, str(train), train_cfg, ft_cfg),
                       (ft_dir / "final" / "llara.json").is_file(),
                       {"start": shaped, "pairs": pairs, "batch_size": cfg.batch_size, "group_size": cfg.group_size,
                        "max_query_length": cfg.max_query_length, "max_passage_length": cfg.max_passage_length,
                        "seed": cfg.seed, **{k: getattr(train_cfg, k) for k in FINETUNE_TRAIN_DEFAULTS}},
                       steps=steps, run_dir=ft_dir, model=str(ft_dir / "final"))
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
    if cfg.eval:
        say(f"eval: dense, BM25 and hybrid search of {index_dir} on the queries of {cfg.eval}")
        if make_searcher is None:
            from ..retrieval.searcher import Searcher

            make_searcher = Searcher.from_index
        rows = evaluate_index(make_searcher(str(index_dir)), cfg.eval)
        table = eval_table(rows, cfg.eval)
        write_text(out / "eval.md", table)
        write_json(out / "eval.json", rows)
        record["eval"] = {"dir": str(Path(cfg.eval).resolve()), "rows": rows}
        write_json(record_path, record)
        say(table + f"(written to {out / 'eval.md'})")
    else:
        say(f"to measure what this bought on queries with judgments of this corpus (a BEIR directory DIR with "
            f"queries.jsonl and qrels/test.tsv), run the same command again with --eval DIR: the stages done "
            f"are not redone, the index is searched in dense, BM25 and hybrid mode and the table written to "
            f"{out / 'eval.md'}")
    return record
