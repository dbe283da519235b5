"""The ``llara`` parser (:func:`build_parser`): every command's flags are generated from its config
dataclasses (:mod:`llara.cli.configs`; the training configs for pretrain, finetune and recipe), so a
flag, its default, its help and its check are written once, on a field."""
from __future__ import annotations

import argparse
from typing import Callable, Mapping

from .. import __version__
from ..data.pretrain import PretrainDataConfig
from ..pipelines.recipe import RecipeConfig
from ..serve import loadtest
from ..training.checkpoint import list_checkpoints
from ..training.config import TrainConfig, add_config_arguments, config_from_args
from ..training.finetune import FINETUNE_TRAIN_DEFAULTS, FinetuneConfig
from ..training.pretrain import PretrainLossConfig
from . import configs as c

# command -> (help, the config checked before it runs, the further configs whose fields are flags, defaults)
COMMANDS: dict[str, tuple] = {
    "evaluate": ("evaluate dense templates and/or BM25 on BEIR-format datasets", c.EvaluateConfig),
    "mine": ("mine hard negatives: write {query, pos, neg} training lines", c.MineConfig),
    "pretrain": ("LLaRA unsupervised adaptation (EBAE + EBAR) on unlabelled text", c.PretrainInputs,
                 (TrainConfig, PretrainDataConfig, PretrainLossConfig)),
    "finetune": ("contrastive fine-tuning with hard negatives", c.FinetuneInputs, (TrainConfig, FinetuneConfig),
                 FINETUNE_TRAIN_DEFAULTS),
    "recipe": ("your corpus end to end, resumable: adapt on it, mine and fine-tune on the shipped SQuAD pairs, index "
               "it (FAISS + BM25)", c.RecipeInputs, (RecipeConfig,)),
    "export": ("write any model llara loads as a llara + sentence-transformers directory", c.ExportConfig),
    "demo": ("the main job: evaluate the embedded model, adapt it with LLaRA on the demo collection's corpus, "
             "evaluate again", c.DemoCommand),
    "index": ("encode a corpus.jsonl into a persistent FAISS index directory (resumable)", c.IndexConfig),
    "merge": ("join index parts built with --shard i/n", c.MergeConfig),
    "search": ("search an index with the model recorded in it", c.SearchConfig),
    "check-index": ("check an index against its manifest: sizes, line counts, .npy headers and the id/title files' "
                    "sha256 (--full: every file's sha256)", c.CheckIndexConfig),
    "serve": ("HTTP search and OpenAI-compatible embedding service over an index (POST /search, POST /v1/embeddings, "
              "GET /v1/models, /health, /ready, /metrics, /info)", c.ServeConfig),
    "loadtest": ("bounded load test of a running 'llara serve': statuses, requests/s, latency percentiles, server "
                 "memory (one JSON line on stdout)", None),
}
# fields of the further configs that the command's own config (or the command) sets
NOT_FLAGS = {TrainConfig: ("output_dir",), PretrainDataConfig: ("seed",), FinetuneConfig: ("seed",),
             RecipeConfig: ("corpus", "model", "cpu")}


def build_parser(commands: Mapping[str, Callable]) -> argparse.ArgumentParser:
    """The ``llara`` parser; ``commands`` maps each command name to the function that runs it (given
    the parsed flags, whose ``config`` main() fills with the command's checked config)."""
    parser = argparse.ArgumentParser(prog="llara", description="LLaRA dense retrieval with decoder-only LLMs")
    parser.add_argument("--version", action="version", version=f"llara {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        help, config, further, defaults = spec + ((), {})[len(spec) - 2:]
        p = sub.add_parser(name, help=help, description=help)
        if config is None:
            loadtest.add_arguments(p)
        else:
            add_config_arguments(p, config, title="the command")
        for cls in further:
            add_config_arguments(p, cls, skip=NOT_FLAGS.get(cls, ()))
        p.set_defaults(func=commands[name], config_class=config, **defaults)
    return parser


def train_config(args) -> TrainConfig:
    """The TrainConfig of ``llara pretrain`` / ``finetune`` (run directory: --output; one epoch unless told)."""
    if not args.resume and list_checkpoints(args.output):
        raise FileExistsError(f"{args.output} holds checkpoints of an earlier run: continue it with --resume, "
                              "or choose another --output")
    return config_from_args(args, TrainConfig, output_dir=args.output,
                            epochs=1 if args.max_steps is None and args.epochs is None else args.epochs)
