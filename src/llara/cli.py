"""The ``llara`` command line. Each command parses its flags and calls the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from typing import Sequence

from .cli_args import (NO_VERIFY_HELP, add_backend_args, add_encoder_args, add_fusion_args, add_training_args,
                       fusion_config, index_location, make_encoder, port_arg, shard_arg, train_config)
from .console import ConsoleReport, console, fail, print_hits, print_side_by_side, print_table, setup_logging, styled

log = logging.getLogger("llara")

DEMO_DIR = Path(__file__).parent / "data" / "demo"
PAIRS_DIR = Path(__file__).parent / "data" / "pairs"  # shipped, redistributable training pairs (README inside)


def run_evaluation(datasets, methods, templates, args, out_dir: Path):
    """Evaluate every (dataset, method[, template]) and write results; returns the (Result, run) pairs."""
    from .evaluation.runner import evaluate_datasets

    return evaluate_datasets(datasets, methods, out_dir, encoder=lambda: make_encoder(args, templates),
                             templates=templates, split=args.split, k=args.k, fusion=fusion_config(args))


def cmd_evaluate(args) -> int:
    out = Path(args.output)
    methods = args.method or ["dense"]
    try:
        results = [r for r, _ in run_evaluation(args.dataset, methods, args.template, args, out)]
    except ValueError as e:
        return fail(e)
    print_table(results, f"retrieval quality ({args.split} split)")
    print_side_by_side(results, "nDCG@10, side by side")
    console().print(f"results written to {out}/ (summary.md, summary.json, <dataset>/<method>/metrics.json, run.trec)")
    return 0


def cmd_export(args) -> int:
    from .interop.convert import export_checkpoint

    out = export_checkpoint(args.source, args.output, template=args.template, dtype=args.dtype,
                            max_query_length=args.max_query_length, max_passage_length=args.max_passage_length)
    console().print(f"exported {args.source} to {out} (llara, sentence-transformers with trust_remote_code=True)")
    return 0


def cmd_demo(args) -> int:
    """The README's main job (llara.demo): evaluate, adapt with LLaRA, evaluate again."""
    from .demo import DemoConfig, run_demo

    t0 = time.perf_counter()
    cfg = DemoConfig(dataset=args.dataset, output=args.output, model=args.model, templates=args.template,
                     adapt_steps=args.adapt_steps, adapt_batch_size=args.adapt_batch_size, adapt_lr=args.adapt_lr,
                     adapt_chunk_tokens=args.adapt_chunk_tokens, split=args.split, k=args.k, fusion=fusion_config(args),
                     cpu=args.device == "cpu", max_query_length=args.max_query_length,
                     max_passage_length=args.max_passage_length)
    r = run_demo(cfg, lambda model, templates: make_encoder(argparse.Namespace(**{**vars(args), "model": model}),
                                                             templates), ConsoleReport())
    con, out = console(), args.output
    if r.adapted_model is not None:
        nd = r.ndcg
        untrained = f"{nd['llara']:.3f} untrained -> " if "llara" in nd else ""
        con.print(styled(f"nDCG@10 of the LLaRA slots: {untrained}", (f"{nd['adapted']:.3f}", "bold"),
                              f" adapted ({args.adapt_steps} steps); loss curve: {r.loss_plot}; "
                              f"adapted model: {r.adapted_model}"))
        con.print(styled("nDCG@10, hybrid of BM25 and the adapted slots: ", (f"{nd['hybrid']:.3f}", "bold"),
                              f" (BM25 alone {nd['bm25']:.3f}, adapted slots alone {nd['adapted']:.3f})"))
        con.print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}/ (summary.md, before/, after/, adapt/)")
    else:
        con.print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}/")
    return 0


# --------------------------------------------------------------------------- index, merge, search, serve


def cmd_index(args) -> int:
    """Encode a corpus.jsonl into a persistent, resumable index directory (and export it to a vector database)."""
    from .retrieval.index import build_index

    if args.template and len(args.template) > 1:
        return fail(ValueError("an index has one template; give --template once"))
    if args.backend != "faiss" and (not args.uri or args.shard):
        return fail(ValueError(f"--backend {args.backend} needs --uri, and exports a whole index (no --shard)"))
    args.no_cache = True  # the shards are the cache; the embedding cache would store them twice
    t0 = time.perf_counter()
    try:
        encoder = make_encoder(args, args.template)
        engine = None
        if args.engine == "ray":
            from .retrieval.ray_engine import RayEngine

            engine = RayEngine.from_encoder(encoder, args.model, workers=args.workers, address=args.ray_address,
                                            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        out = build_index(encoder, args.corpus, args.output, model_spec=args.model, shard_size=args.shard_size,
                          factory=args.factory, resume=args.resume, shard=args.shard, batch_size=args.batch_size,
                          train_size=args.train_size, faiss_index=args.backend == "faiss", engine=engine,
                          bm25=args.bm25, fusion=fusion_config(args))
        if args.backend == "qdrant":
            from .retrieval.qdrant import export_to_qdrant

            meta = export_to_qdrant(out, args.uri, args.collection)
    except ValueError as e:  # DataError and TemplateError included
        return fail(e)
    import json

    m = json.loads((out / "manifest.json").read_text())
    what = f"part {args.shard[0]}/{args.shard[1]} " if args.shard else ""
    where = f"{out}" + (f" and Qdrant {args.uri} (collection {args.collection!r}, {meta['count']} points)"
                        if args.backend == "qdrant" else "")
    kind = m["factory"] if args.backend == "faiss" else "shards only"
    lexical = ", + BM25" if m.get("bm25") else ""
    console().print(f"indexed {what}{m['count']} passages ({len(m['shards'])} shards, {kind}{lexical}) into {where} "
                     f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_merge(args) -> int:
    """Join the parts of an index built with --shard i/n."""
    from .retrieval.index import merge_indexes

    try:
        out = merge_indexes(args.parts, args.output, factory=args.factory, train_size=args.train_size,
                            bm25=args.bm25, fusion=fusion_config(args))
    except ValueError as e:
        return fail(e)
    console().print(f"merged {len(args.parts)} parts into {out}")
    return 0


def cmd_search(args) -> int:
    """Search an index from the command line (loads the model recorded in the index)."""
    import json

    from .retrieval.searcher import Searcher

    try:
        searcher = Searcher.from_index(index_location(args), device=args.device, params=args.faiss_params,
                                       verify=args.verify, backend=args.backend, collection=args.collection,
                                       runtime=args.runtime)
        mode = searcher.check_mode(args.mode)
        given = any(v is not None for v in (args.fusion, args.alpha, args.normalization, args.rrf_k, args.depth))
        if given and mode != "hybrid":
            raise ValueError(f"--fusion/--alpha/--normalization/--rrf-k/--depth are for --mode hybrid, not {mode}")
        results = searcher.search(args.query, k=args.k, mode=mode,
                                  fusion=fusion_config(args, searcher.fusion) if given else None)
    except ValueError as e:
        return fail(e)
    if args.json:
        for q, hits in zip(args.query, results):
            sys.stdout.write(json.dumps({"query": q, "hits": [h.__dict__ for h in hits]}, ensure_ascii=False) + "\n")
        return 0
    for q, hits in zip(args.query, results):
        print_hits(q, hits)
    return 0


def cmd_check_index(args) -> int:
    """Check an index against its manifest without reading it into memory."""
    import json

    from .retrieval.check import check_index

    try:
        r = check_index(args.index, full=args.full)
    except ValueError as e:
        return fail(e)
    if args.json:
        sys.stdout.write(json.dumps(r) + "\n")
        return 0
    state = "complete" if r["complete"] else f"part {r['part'][0]}/{r['part'][1]}" if r["part"] else "unfinished"
    console().print(f"ok: {r['path']}: {r['rows']} passages in {r['shards']} shards ({state}); {r['files']} files, "
                     f"{r['bytes'] / 1e6:.1f} MB, {r['bytes_hashed'] / 1e6:.1f} MB hashed, in {r['seconds']:.2f} s")
    return 0


def cmd_serve(args) -> int:
    """HTTP search service (loopback by default)."""
    from .serve import run

    try:
        run(index_location(args), backend=args.backend, collection=args.collection,
            host=args.host, port=args.port, device=args.device, params=args.faiss_params, runtime=args.runtime,
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_k=args.max_k,
            max_query_chars=args.max_query_chars, max_body_bytes=args.max_body_bytes, verify=args.verify,
            max_pending=args.max_pending, head_timeout=args.head_timeout, body_timeout=args.body_timeout,
            keep_alive=args.keep_alive)
    except ValueError as e:
        return fail(e)
    return 0


def cmd_mine(args) -> int:
    """Hard negatives for contrastive fine-tuning, from BM25 or a dense model."""
    from .retrieval import mining

    if args.pairs:
        if args.corpus or args.queries or args.qrels or args.train:
            return fail(ValueError("--pairs replaces --corpus, --queries, --qrels and --train: give one or the other"))
        shipped = PAIRS_DIR / args.pairs
        args.corpus, args.queries = str(shipped / "corpus.jsonl.gz"), str(shipped / "queries.jsonl.gz")
        args.qrels = str(shipped / "qrels" / "train.tsv.gz")
    elif not args.corpus:
        return fail(ValueError("give --corpus (with --queries/--qrels or --train), or --pairs squad"))
    cfg = mining.MiningConfig(window=tuple(args.window), num_negatives=args.negatives, margin=args.margin,
                              seed=args.seed)
    r = mining.mine(args.corpus, args.output, queries=args.queries, qrels=args.qrels, train=args.train,
                    method=args.method, config=cfg, encoder=lambda: make_encoder(args, args.template))
    console().print(f"wrote {r.groups} training groups to {args.output} "
                     f"({r.mean_negatives:.1f} negatives per query on average, "
                     f"ranks {cfg.window[0]}-{cfg.window[1]} of {args.method})")
    return 0


def cmd_pretrain(args) -> int:
    """LLaRA adaptation (EBAE + EBAR) on unlabelled text."""
    from .data.pretrain import PretrainDataConfig
    from .training.config import config_from_args
    from .training.pretrain import PretrainLossConfig, pretrain

    train_cfg = train_config(args)
    data_cfg = config_from_args(argparse.Namespace(**{**vars(args), "seed": args.seed}), PretrainDataConfig)
    loss_cfg = config_from_args(args, PretrainLossConfig)
    result = pretrain(args.model, args.data, train_cfg, data_cfg, loss_cfg)
    console().print(f"adapted model: {result.export_dir or args.output}; loss curve: {args.output}/loss.png")
    return 0


def cmd_finetune(args) -> int:
    """Contrastive fine-tuning on {query, pos, neg} lines (e.g. from `llara mine`)."""
    from .training.config import config_from_args
    from .training.finetune import FinetuneConfig, finetune

    train_cfg = train_config(args)
    result = finetune(args.model, args.data, train_cfg, config_from_args(args, FinetuneConfig))
    console().print(f"fine-tuned model: {result.export_dir or args.output}; loss curve: {args.output}/loss.png")
    return 0


def cmd_loadtest(args) -> int:
    """Load-test a running service (llara.loadtest)."""
    from .loadtest import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("mine", help="mine hard negatives: write {query, pos, neg} training lines")
    p.add_argument("--corpus", help="corpus.jsonl to mine from")
    p.add_argument("--pairs", choices=["squad"],
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
    p.set_defaults(func=cmd_mine)

    from .data.pretrain import PretrainDataConfig
    from .training.finetune import FinetuneConfig
    from .training.pretrain import PretrainLossConfig

    p = sub.add_parser("pretrain", help="LLaRA unsupervised adaptation (EBAE + EBAR) on unlabelled text")
    p.add_argument("--data", action="append", required=True,
                   help="text file, JSONL (text field), BEIR corpus.jsonl or {doc, idx, text} passages; repeatable")
    add_training_args(p, PretrainDataConfig, PretrainLossConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="contrastive fine-tuning with hard negatives")
    p.add_argument("--data", required=True, help="train.jsonl with {query, pos: [...], neg: [...]} lines")
    add_training_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write any model llara loads as a llara + sentence-transformers directory")
    p.add_argument("source", help="llara checkpoint, PEFT adapter dir, Hugging Face dir (e.g. a released LLaRA), .gguf, default")
    p.add_argument("output", help="directory to write (replaced atomically)")
    p.add_argument("--template", default=None, help="default: the source's template, else llara")
    p.add_argument("--max-query-length", type=int, default=None)
    p.add_argument("--max-passage-length", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype of the weights on disk")
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_demo, template=None, max_passage_length=112, max_query_length=64)
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
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("merge", help="join index parts built with --shard i/n")
    p.add_argument("--output", required=True, help="directory for the merged index")
    p.add_argument("parts", nargs="+", metavar="PART_DIR")
    p.add_argument("--factory", default=None, help="FAISS factory string (default: the parts')")
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--no-bm25", dest="bm25", action="store_false", help="do not build the BM25 index")
    add_fusion_args(p)
    p.set_defaults(func=cmd_merge)

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
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("check-index", help="check an index against its manifest: sizes, line counts, .npy headers "
                                           "and the id/title files' sha256 (--full: every file's sha256)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--full", action="store_true", help="hash every file, embeddings and FAISS index included")
    p.add_argument("--json", action="store_true", help="print what was checked as one JSON object")
    p.set_defaults(func=cmd_check_index)

    p = sub.add_parser("serve", help="HTTP search service over an index (POST /search, GET /health, GET /info)")
    p.add_argument("--index", help="index directory (FAISS backend)")
    add_backend_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_arg, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--faiss-params", "--search-params", dest="faiss_params", default=None,
                   help="FAISS run-time parameters, e.g. nprobe=32; Qdrant: exact=1 or hnsw_ef=128")
    p.add_argument("--runtime", default=None, choices=["torch", "onnx-int8"],
                   help="forward pass for the queries (default: the one the index was built with)")
    p.add_argument("--max-batch", type=int, default=32, help="queries per encoder call (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long a free encoder may wait for the clients it expects back (those answered by "
                        "its last batch) before it runs a batch; one client never waits (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--max-query-chars", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-pending", type=int, default=None,
                   help="queries waiting for the encoder before new requests get 503 + Retry-After "
                        "(default: 8 x --max-batch)")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a complete request head (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a request has to send its whole body, else 408 (default: %(default)s)")
    p.add_argument("--keep-alive", type=int, default=5,
                   help="seconds an idle connection stays open after a response (default: %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    p.set_defaults(func=cmd_serve)

    from . import loadtest

    p = sub.add_parser("loadtest", help="bounded load test of a running 'llara serve': statuses, requests/s, "
                                        "latency percentiles, server memory (one JSON line on stdout)")
    loadtest.add_arguments(p)
    p.set_defaults(func=cmd_loadtest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.template is None:
        args.template = ["mean", "eos", "llara"]  # mean and eos share one forward pass
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except (ValueError, OSError) as e:  # bad input: DataError, TemplateError, missing/existing files ...
        if args.verbose:
            log.exception("%s", e)
        return fail(e)
    except Exception as e:  # a bug: one line, the traceback with -v
        if args.verbose:
            log.exception("unexpected error")
        return fail(f"unexpected {type(e).__name__}: {e} (rerun with -v for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
