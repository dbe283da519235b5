"""The argument groups the ``llara`` commands share, and the objects they are turned into (an encoder,
a fusion config, a training config)."""
from __future__ import annotations

import argparse


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
    p.add_argument("--batch-size", type=int, default=32)
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

    cache = None if args.no_cache else (args.cache_dir or cache_root() / "embeddings")
    lengths = {k: v for k, v in (("max_query_length", args.max_query_length),
                                 ("max_passage_length", args.max_passage_length)) if v is not None}
    return Encoder.from_pretrained(
        args.model,
        template=templates[0] if templates else None,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        cache_dir=cache,
        runtime=args.runtime,
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
