"""The flags of the ``llara`` commands (:func:`build_parser`), the argument groups they share, and the
objects those are turned into (an encoder, a fusion config, a training config). The commands
themselves are in ``llara.cli``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Mapping

from .data.shipped import SHIPPED_PAIRS

DEMO_DIR = Path(__file__).parent / "data" / "demo"


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    from .modeling.encoder import DEFAULT_MAX_PASSAGE_LENGTH, DEFAULT_MAX_QUERY_LENGTH

    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a llara checkpoint, "
                        "or a Hugging Face directory / hub id (default: %(default)s)")
    p.add_argument("--template", action="append", default=None,
                   help="built-in name (llara, paper, eos, mean, prompteol) or a .yaml/.json file; repeatable "
                        "(default: the checkpoint's template, else llara)")
    p.add_argument("--max-query-length", type=int, default=None,
                   help="tokens per query, prompt included; only the text is truncated "
                        f"(default: the checkpoint's, else {DEFAULT_MAX_QUERY_LENGTH})")
    p.add_argument("--max-passage-length", type=int, default=None,
                   help="tokens per passage, prompt included "
                        f"(default: the checkpoint's, else {DEFAULT_MAX_PASSAGE_LENGTH})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per batch (default: 32; with --max-batch-tokens alone, no limit on texts)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per batch, as text-embeddings-inference's: texts sorted by length fill each "
                        "batch up to it (at least one text of the max length; with --batch-size, both limits apply)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPUs and on CPUs whose bf16 matmul is measured faster than fp32 "
                        "(AMX, AVX512-BF16), else float32 (default: %(default)s)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx-int8"],
                   help="onnx-int8: the forward pass int8 in ONNX Runtime on the CPU (needs the int8 extra; "
                        "exported once and cached; pooling unchanged) (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="embedding cache keyed by weights, template and text (default: $LLARA_CACHE/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")


def make_encoder(args, templates=None):
    from .modeling.encoder import Encoder
    from .modeling.loading import cache_root

    budget = getattr(args, "max_batch_tokens", None)
    cache = None if args.no_cache else (args.cache_dir or cache_root() / "embeddings")
    lengths = {k: v for k, v in (("max_query_length", args.max_query_length),
                                 ("max_passage_length", args.max_passage_length)) if v is not None}
    return Encoder.from_pretrained(
        args.model,
        template=templates[0] if templates else None,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size if args.batch_size is not None or budget else 32,
        max_batch_tokens=budget,
        cache_dir=cache,
        runtime=args.runtime,
        show_progress=getattr(args, "verbose", False) or sys.stderr.isatty(),  # no bar in logs
        **lengths,
    )


def add_fusion_args(p: argparse.ArgumentParser, *, overrides: bool = False) -> None:
    """--fusion, --alpha, --rrf-k, --depth, --normalization. With ``overrides`` the defaults are None
    (the index's settings apply)."""
    from .retrieval.fusion import DEFAULT_ALPHA, DEFAULT_DEPTH, DEFAULT_RRF_K, FUSIONS, NORMALIZATIONS

    d = (lambda v: None) if overrides else (lambda v: v)
    src = "the index's" if overrides else "%(default)s"
    g = p.add_argument_group("hybrid retrieval (BM25 + dense fusion)")
    g.add_argument("--fusion", choices=FUSIONS, default=d("linear"),
                   help=f"linear: alpha * dense + (1 - alpha) * BM25 on per-query normalised scores; rrf: "
                        f"reciprocal rank fusion (default: {src})")
    g.add_argument("--alpha", type=float, default=d(DEFAULT_ALPHA),
                   help=f"weight of the dense run in linear fusion, 0..1 (default: {src})")
    g.add_argument("--normalization", choices=NORMALIZATIONS, default=d("minmax"),
                   help=f"per-query score normalisation for linear fusion (default: {src})")
    g.add_argument("--rrf-k", type=float, default=d(DEFAULT_RRF_K), help=f"the k of RRF (default: {src})")
    g.add_argument("--depth", type=int, default=d(DEFAULT_DEPTH),
                   help=f"candidates taken from each run (at least -k) (default: {src})")


def fusion_config(args, base=None):
    """A FusionConfig from the fusion flags (unset ones from ``base``); ValueError when invalid."""
    from .retrieval.fusion import FusionConfig

    given = {"method": args.fusion, "alpha": args.alpha, "normalization": args.normalization,
             "rrf_k": args.rrf_k, "depth": args.depth}
    return FusionConfig(**{**(base.to_dict() if base else {}), **{k: v for k, v in given.items() if v is not None}})


def shard_arg(value: str):
    from .retrieval.index import parse_shard_spec

    try:
        return parse_shard_spec(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def port_arg(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def index_location(args) -> str:
    """--index DIR (faiss) or --uri URI (a vector database)."""
    if args.backend == "faiss":
        if not args.index:
            raise ValueError("give --index DIR (or --backend qdrant --uri URI)")
        return args.index
    if not args.uri:
        raise ValueError(f"--backend {args.backend} needs --uri (a server URL or a local directory)")
    return args.uri


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["faiss", "qdrant"], default="faiss",
                   help="where the vectors are searched: the index folder's FAISS file, or a Qdrant collection "
                        "(default: %(default)s)")
    p.add_argument("--uri", default=None, help="Qdrant: a server URL (http://host:6333; API key from "
                                               "$QDRANT_API_KEY) or a local directory (embedded mode)")
    p.add_argument("--collection", default="llara", help="Qdrant collection (default: %(default)s)")


def train_config(args):
    from .training.checkpoint import list_checkpoints
    from .training.config import TrainConfig, config_from_args

    if not args.resume and list_checkpoints(args.output):
        raise FileExistsError(f"{args.output} holds checkpoints of an earlier run: continue it with --resume, "
                              "or choose another --output")
    args.output_dir = args.output
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    return config_from_args(args, TrainConfig)


def add_training_args(p: argparse.ArgumentParser, *extra_configs) -> None:
    from .training.config import TrainConfig, add_config_arguments

    p.add_argument("--model", default="default", help="model to train (same forms as for evaluate)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, train_log.jsonl, loss.png, final/")
    add_config_arguments(p, TrainConfig, skip=("output_dir",))
    for cls in extra_configs:
        add_config_arguments(p, cls, skip=("seed",))


NO_VERIFY_HELP = ("open without hashing the embeddings and FAISS file: only the light check of 'llara check-index' "
                  "(sizes, line counts, .npy headers, the id/title files' sha256); for large indexes")


def build_parser(commands: Mapping[str, Callable]) -> argparse.ArgumentParser:
    """The ``llara`` parser; ``commands`` maps each command name to the function that runs it."""
    from . import __version__
    from . import loadtest

    parser = argparse.ArgumentParser(prog="llara", description="LLaRA dense retrieval with decoder-only LLMs")
    parser.add_argument("--version", action="version", version=f"llara {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="evaluate dense templates and/or BM25 on BEIR-format datasets")
    p.add_argument("--dataset", action="append", required=True, help="BEIR-format directory; repeatable")
    p.add_argument("--method", action="append", choices=["dense", "bm25", "hybrid"],
                   help="repeatable (default: dense); hybrid fuses the dense and BM25 runs (one pass of each "
                        "per dataset, shared with --method dense / bm25)")
    p.add_argument("--split", default="test")
    p.add_argument("-k", type=int, default=100, help="documents retrieved per query (default: %(default)s)")
    p.add_argument("--output", required=True, help="directory for metrics.json, run.trec and summary files")
    add_encoder_args(p)
    add_fusion_args(p)
    p.set_defaults(func=commands["evaluate"])

    p = sub.add_parser("mine", help="mine hard negatives: write {query, pos, neg} training lines")
    p.add_argument("--corpus", help="corpus.jsonl to mine from")
    p.add_argument("--pairs", choices=list(SHIPPED_PAIRS),
                   help="instead of --corpus/--queries/--qrels: pairs shipped with llara; squad = 10,570 SQuAD v1.1 "
                        "questions and their Wikipedia paragraphs (CC BY-SA 4.0, attribution in data/pairs/squad)")
    p.add_argument("--queries", help="queries.jsonl (with --qrels)")
    p.add_argument("--qrels", help="qrels .tsv naming the positives (e.g. qrels/train.tsv)")
    p.add_argument("--train", help="instead of --queries/--qrels: train.jsonl with {query, pos: [...]}")
    p.add_argument("--method", choices=["dense", "bm25"], default="dense")
    p.add_argument("--window", type=int, nargs=2, default=[10, 200], metavar=("LO", "HI"),
                   help="1-based rank window to sample negatives from (default: 10 200)")
    p.add_argument("--negatives", type=int, default=15, help="negatives per query (default: 15)")
    p.add_argument("--margin", type=float, default=None,
                   help="drop candidates scoring above (best positive score - margin): false-negative guard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="train.jsonl to write")
    add_encoder_args(p)
    p.set_defaults(func=commands["mine"])

    from .data.pretrain import PretrainDataConfig
    from .recipe import RecipeConfig
    from .training.config import add_config_arguments
    from .training.finetune import FINETUNE_TRAIN_DEFAULTS, FinetuneConfig
    from .training.pretrain import PretrainLossConfig

    p = sub.add_parser("pretrain", help="LLaRA unsupervised adaptation (EBAE + EBAR) on unlabelled text")
    p.add_argument("--data", action="append", required=True,
                   help="text file, JSONL (text field), BEIR corpus.jsonl or {doc, idx, text} passages; repeatable")
    add_training_args(p, PretrainDataConfig, PretrainLossConfig)
    p.set_defaults(func=commands["pretrain"])

    p = sub.add_parser("finetune", help="contrastive fine-tuning with hard negatives")
    p.add_argument("--data", required=True, help="train.jsonl with {query, pos: [...], neg: [...]} lines")
    add_training_args(p, FinetuneConfig)
    p.set_defaults(func=commands["finetune"], **FINETUNE_TRAIN_DEFAULTS)

    p = sub.add_parser("recipe", help="your corpus end to end, resumable: adapt on it, mine and fine-tune on the "
                                       "shipped SQuAD pairs, index it (FAISS + BM25)")
    p.add_argument("--corpus", required=True, help=RecipeConfig.__dataclass_fields__["corpus"].metadata["help"])
    add_config_arguments(p, RecipeConfig, skip=("corpus", "cpu"))
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available); cpu also trains there")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="index encoding precision (default: %(default)s)")
    p.set_defaults(func=commands["recipe"])

    p = sub.add_parser("export", help="write any model llara loads as a llara + sentence-transformers directory")
    p.add_argument("source", help="llara checkpoint, PEFT adapter dir, Hugging Face dir (e.g. a released LLaRA), .gguf, default")
    p.add_argument("output", help="directory to write (replaced atomically)")
    p.add_argument("--template", default=None, help="default: the source's template, else llara")
    p.add_argument("--max-query-length", type=int, default=None)
    p.add_argument("--max-passage-length", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype of the weights on disk")
    p.set_defaults(func=commands["export"])

    p = sub.add_parser("demo", help="the main job: evaluate the embedded model, adapt it with LLaRA on the demo "
                                     "collection's corpus, evaluate again")
    p.add_argument("--dataset", default=str(DEMO_DIR / "med"))
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--adapt-steps", type=int, default=32, help="adaptation steps; 0: zero-shot only (default: 32)")
    p.add_argument("--adapt-batch-size", type=int, default=8)
    p.add_argument("--adapt-lr", type=float, default=5e-5)
    p.add_argument("--adapt-chunk-tokens", type=int, default=96)
    p.add_argument("--split", default="test")
    p.add_argument("-k", type=int, default=100)
    add_encoder_args(p)
    add_fusion_args(p)
    p.set_defaults(func=commands["demo"], template=None, max_passage_length=112, max_query_length=64)
    p = sub.add_parser("index", help="encode a corpus.jsonl into a persistent FAISS index directory (resumable)")
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl ({_id, title, text} per line), streamed")
    p.add_argument("--output", required=True, help="index directory (manifest.json, shards/, index.faiss)")
    p.add_argument("--factory", default="Flat",
                   help="FAISS index_factory string, inner product: Flat, IVF4096,PQ64, HNSW32 ... (default: Flat)")
    p.add_argument("--shard-size", type=int, default=10_000, help="passages per shard (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run after its last finished shard")
    p.add_argument("--shard", type=shard_arg, default=None, metavar="i/n",
                   help="encode only part i of n (shards s with s %% n == i) into a partial directory; "
                        "join the parts with 'llara merge'")
    p.add_argument("--train-size", type=int, default=200_000,
                   help="vectors sampled to train non-Flat indexes (default: %(default)s)")
    p.add_argument("--no-bm25", dest="bm25", action="store_false",
                   help="do not build the BM25 index of the corpus (dense search only)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data actors, one model each, on a local or remote Ray "
                        "cluster (pip install 'llara[ray]'); same shards and manifest (default: %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one")
    p.add_argument("--workers", type=int, default=2, help="Ray: encoder actors (default: %(default)s)")
    add_backend_args(p)
    add_encoder_args(p)
    add_fusion_args(p)
    p.set_defaults(func=commands["index"])

    p = sub.add_parser("merge", help="join index parts built with --shard i/n")
    p.add_argument("--output", required=True, help="directory for the merged index")
    p.add_argument("parts", nargs="+", metavar="PART_DIR")
    p.add_argument("--factory", default=None, help="FAISS factory string (default: the parts')")
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--no-bm25", dest="bm25", action="store_false", help="do not build the BM25 index")
    add_fusion_args(p)
    p.set_defaults(func=commands["merge"])

    p = sub.add_parser("search", help="search an index with the model recorded in it")
    p.add_argument("--index", help="index directory (FAISS backend)")
    add_backend_args(p)
    p.add_argument("query", nargs="+", help="one or more queries")
    p.add_argument("-k", type=int, default=10, help="hits per query (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default=None,
                   help="default: hybrid when the index has BM25, else dense")
    add_fusion_args(p, overrides=True)
    p.add_argument("--device", default=None)
    p.add_argument("--faiss-params", "--search-params", dest="faiss_params", default=None,
                   help="FAISS run-time parameters, e.g. nprobe=32 or efSearch=128; Qdrant: exact=1 or hnsw_ef=128")
    p.add_argument("--runtime", default=None, choices=["torch", "onnx-int8"],
                   help="forward pass for the queries (default: the one the index was built with)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    p.set_defaults(func=commands["search"])

    p = sub.add_parser("check-index", help="check an index against its manifest: sizes, line counts, .npy headers "
                                           "and the id/title files' sha256 (--full: every file's sha256)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--full", action="store_true", help="hash every file, embeddings and FAISS index included")
    p.add_argument("--json", action="store_true", help="print what was checked as one JSON object")
    p.set_defaults(func=commands["check-index"])

    p = sub.add_parser("serve", help="HTTP search and OpenAI-compatible embedding service over an index (POST "
                                      "/search, POST /v1/embeddings, GET /v1/models, /health, /ready, /metrics, /info)")
    p.add_argument("--index", help="index directory (FAISS backend)")
    p.add_argument("--model", default=None,
                   help="the model to load (default: the one the index's manifest names); without an index: "
                        "serve embeddings only (POST /v1/embeddings), no /search")
    add_backend_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_arg, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--faiss-params", "--search-params", dest="faiss_params", default=None,
                   help="FAISS run-time parameters, e.g. nprobe=32; Qdrant: exact=1 or hnsw_ef=128")
    p.add_argument("--runtime", default=None, choices=["torch", "onnx-int8"],
                   help="forward pass for the queries (default: the one the index was built with)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="texts (search queries and embedding inputs) per micro-batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long a free encoder may wait for the clients it expects back (those answered by "
                        "its last batch) before it runs a batch; one client never waits (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--max-query-chars", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-pending", type=int, default=None,
                   help="queries and texts waiting for the encoder before new requests get 429 + Retry-After "
                        "(default: 8 x --max-batch)")
    p.add_argument("--max-inputs", type=int, default=None,
                   help="texts per POST /v1/embeddings request (default: --max-pending)")
    p.add_argument("--model-name", default=None,
                   help="the model name /v1/embeddings expects and /v1/models lists (default: the model's id, "
                        "e.g. its directory name)")
    p.add_argument("--default-input-type", choices=["query", "passage"], default=None,
                   help="the side /v1/embeddings embeds when a request has no input_type (default: passage, "
                        "what clients unaware of the field usually send: documents to index)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /ready, /metrics and "
                        "the schema (default: $LLARA_API_KEY; none: no authentication). Prefer the environment "
                        "variable: a flag shows in the process list")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a request has to send its whole body, else 408 (default: %(default)s)")
    p.add_argument("--keep-alive", type=int, default=5,
                   help="seconds an idle connection stays open after a response (default: %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    p.set_defaults(func=commands["serve"])

    p = sub.add_parser("loadtest", help="bounded load test of a running 'llara serve': statuses, requests/s, "
                                        "latency percentiles, server memory (one JSON line on stdout)")
    loadtest.add_arguments(p)
    p.set_defaults(func=commands["loadtest"])
    return parser
