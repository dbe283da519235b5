"""The ``llara`` command line. Each command parses its flags and calls the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from typing import Sequence

log = logging.getLogger("llara")

DEMO_DIR = Path(__file__).parent / "data" / "demo"
PAIRS_DIR = Path(__file__).parent / "data" / "pairs"  # shipped, redistributable training pairs (README inside)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, console=_console(stderr=True))],
    )
    if not verbose:
        logging.getLogger("llara").setLevel(logging.INFO)
    for noisy in ("transformers", "accelerate", "huggingface_hub", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped or captured output gets full-width tables instead of rich's 80-column default. No markup:
    # ids, titles, queries and paths are data and may hold "[/bold]" (styles go through rich.text.Text).
    return Console(stderr=stderr, width=None if stream.isatty() else 160, markup=False)


def _styled(*parts) -> "object":
    """A line of plain strings and ``(text, style)`` pairs, printed without markup parsing."""
    from rich.text import Text

    return Text.assemble(*parts)


def print_table(results, title: str) -> None:
    from rich.table import Table

    from .evaluation.runner import REPORTED

    table = Table(title=title)
    for col in ("dataset", "method", *REPORTED, "queries", "docs", "s"):
        table.add_column(col, justify="left" if col in ("dataset", "method") else "right")
    for r in results:
        table.add_row(r.dataset, r.label, *(f"{r.metrics[k]:.4f}" for k in REPORTED),
                      str(r.num_queries), str(r.num_docs), f"{r.seconds:.1f}")
    _console().print(table)


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
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


def _make_encoder(args, templates=None):
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


def _add_fusion_args(p: argparse.ArgumentParser, *, overrides: bool = False) -> None:
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


def _fusion(args, base=None):
    """A FusionConfig from the fusion flags (unset ones from ``base``); ValueError when invalid."""
    from .retrieval.fusion import FusionConfig

    given = {"method": args.fusion, "alpha": args.alpha, "normalization": args.normalization,
             "rrf_k": args.rrf_k, "depth": args.depth}
    return FusionConfig(**{**(base.to_dict() if base else {}), **{k: v for k, v in given.items() if v is not None}})


def run_evaluation(datasets, methods, templates, args, out_dir: Path):
    """Evaluate every (dataset, method[, template]) and write results; returns the (Result, run) pairs."""
    from .evaluation.runner import evaluate_datasets

    return evaluate_datasets(datasets, methods, out_dir, encoder=lambda: _make_encoder(args, templates),
                             templates=templates, split=args.split, k=args.k, fusion=_fusion(args))


def print_side_by_side(results, title: str) -> None:
    from rich.table import Table

    from .evaluation.runner import side_by_side

    head, rows = side_by_side(results)
    if len(head) <= 2:
        return
    table = Table(title=title)
    for col in head:
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def cmd_evaluate(args) -> int:
    out = Path(args.output)
    methods = args.method or ["dense"]
    try:
        results = [r for r, _ in run_evaluation(args.dataset, methods, args.template, args, out)]
    except ValueError as e:
        return _fail(e)
    print_table(results, f"retrieval quality ({args.split} split)")
    print_side_by_side(results, "nDCG@10, side by side")
    _console().print(f"results written to {out}/ (summary.md, summary.json, <dataset>/<method>/metrics.json, run.trec)")
    return 0


def cmd_export(args) -> int:
    from .interop.convert import export_checkpoint

    out = export_checkpoint(args.source, args.output, template=args.template, dtype=args.dtype,
                            max_query_length=args.max_query_length, max_passage_length=args.max_passage_length)
    _console().print(f"exported {args.source} to {out} (llara, sentence-transformers with trust_remote_code=True)")
    return 0


def cmd_demo(args) -> int:
    """The README's main job: evaluate the embedded model, adapt it with LLaRA on the demo collection's
    own corpus (unsupervised: no queries, no judgments), evaluate again, print before/after."""
    from .data.pretrain import PretrainDataConfig
    from .evaluation.runner import write_summary
    from .training.config import TrainConfig
    from .training.pretrain import pretrain

    t0 = time.perf_counter()
    out = Path(args.output)
    console = _console()
    corpus = Path(args.dataset) / "corpus.jsonl"
    console.print(_styled(("llara demo", "bold"), f": model={args.model}, collection={args.dataset}. Passages are "
                          f"truncated to {args.max_passage_length} tokens and queries to {args.max_query_length} "
                          "(prompts included), to finish in minutes on a laptop CPU."))
    console.print(_styled(("1/3", "bold"), " zero-shot: BM25 and the untrained model's embeddings"))
    before_pairs = run_evaluation([args.dataset], ["bm25", "dense"], args.template, args, out / "before")
    before = [r for r, _ in before_pairs]
    print_table(before, "before adaptation (zero-shot)")
    if args.adapt_steps <= 0:
        console.print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}/")
        return 0

    console.print(_styled(("2/3", "bold"), f" LLaRA adaptation (EBAE + EBAR + LM loss) on {corpus} for "
                          f"{args.adapt_steps} steps of {args.adapt_batch_size} (chunk, next chunk) pairs: "
                          "unlabelled text only"))
    train_cfg = TrainConfig(output_dir=str(out / "adapt"), max_steps=args.adapt_steps, batch_size=args.adapt_batch_size,
                            lr=args.adapt_lr, save_every=max(args.adapt_steps // 2, 1), seed=0, resume=True,
                            cpu=args.device == "cpu", progress=sys.stderr.isatty())
    result = pretrain(args.model, [str(corpus)], train_cfg, PretrainDataConfig(chunk_tokens=args.adapt_chunk_tokens))

    console.print(_styled(("3/3", "bold"), " the adapted model's slot embeddings"))
    adapted = argparse.Namespace(**{**vars(args), "model": str(result.export_dir), "template": ["llara"]})
    after_pairs = run_evaluation([args.dataset], ["dense"], ["llara"], adapted, out / "after")
    # hybrid: the BM25 run of step 1 fused with the adapted run of step 3 (no new retrieval, no encoding)
    from .data.beir import load_beir
    from .evaluation.runner import evaluate_hybrid, save_result

    bm25_pair = next(p for p in before_pairs if p[0].retrieval == "bm25")
    fusion = _fusion(args)
    hybrid = evaluate_hybrid(load_beir(args.dataset, split=args.split), bm25_pair, after_pairs[0], fusion, k=args.k)
    save_result(*hybrid, out / "after")
    after = [r for r, _ in after_pairs] + [hybrid[0]]
    for r in after:
        r.model = "adapted"
    rows = [r for r in before if r.template != "eos"] + after
    print_table(rows, f"before and after {args.adapt_steps} adaptation steps")
    get = {("hybrid" if r.retrieval == "hybrid" else "adapted") if r.model == "adapted" else r.template: r.metrics
           for r in rows}
    names = {"llara": "untrained slots", "adapted": "adapted slots", "mean": "untrained mean pooling", "bm25": "BM25",
             "hybrid": f"hybrid: BM25 + adapted slots ({fusion.describe()})"}
    cols = [c for c in names if c in get]  # --template may leave out mean (or the untrained slots)
    lines = ["| metric | " + " | ".join(names[c] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for k in ("ndcg@10", "recall@100", "mrr@10"):
        lines.append(f"| {k} | " + " | ".join(f"{get[c][k]:.4f}" for c in cols) + " |")
    write_summary(rows, out, header="\n".join(lines))
    untrained = f"{get['llara']['ndcg@10']:.3f} untrained -> " if "llara" in get else ""
    console.print(_styled(f"nDCG@10 of the LLaRA slots: {untrained}", (f"{get['adapted']['ndcg@10']:.3f}", "bold"),
                          f" adapted ({args.adapt_steps} steps); loss curve: {result.plot_path}; "
                          f"adapted model: {result.export_dir}"))
    console.print(_styled("nDCG@10, hybrid of BM25 and the adapted slots: ", (f"{get['hybrid']['ndcg@10']:.3f}", "bold"),
                          f" (BM25 alone {get['bm25']['ndcg@10']:.3f}, adapted slots alone "
                          f"{get['adapted']['ndcg@10']:.3f})"))
    console.print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}/ (summary.md, before/, after/, adapt/)")
    return 0


# --------------------------------------------------------------------------- index, merge, search, serve
def _shard_arg(value: str):
    from .retrieval.index import parse_shard_spec

    try:
        return parse_shard_spec(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_arg(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _fail(e: "Exception | str", status: int = 2) -> int:
    """Print ``error: <message>`` to stderr as plain text (the message is data, never markup)."""
    _console(stderr=True).print(_styled(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
    return status


def cmd_index(args) -> int:
    """Encode a corpus.jsonl into a persistent, resumable index directory (and export it to a vector database)."""
    from .retrieval.index import build_index

    if args.template and len(args.template) > 1:
        return _fail(ValueError("an index has one template; give --template once"))
    if args.backend != "faiss" and (not args.uri or args.shard):
        return _fail(ValueError(f"--backend {args.backend} needs --uri, and exports a whole index (no --shard)"))
    args.no_cache = True  # the shards are the cache; the embedding cache would store them twice
    t0 = time.perf_counter()
    try:
        encoder = _make_encoder(args, args.template)
        engine = None
        if args.engine == "ray":
            from .retrieval.ray_engine import RayEngine

            engine = RayEngine.from_encoder(encoder, args.model, workers=args.workers, address=args.ray_address,
                                            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        out = build_index(encoder, args.corpus, args.output, model_spec=args.model, shard_size=args.shard_size,
                          factory=args.factory, resume=args.resume, shard=args.shard, batch_size=args.batch_size,
                          train_size=args.train_size, faiss_index=args.backend == "faiss", engine=engine,
                          bm25=args.bm25, fusion=_fusion(args))
        if args.backend == "qdrant":
            from .retrieval.qdrant import export_to_qdrant

            meta = export_to_qdrant(out, args.uri, args.collection)
    except ValueError as e:  # DataError and TemplateError included
        return _fail(e)
    import json

    m = json.loads((out / "manifest.json").read_text())
    what = f"part {args.shard[0]}/{args.shard[1]} " if args.shard else ""
    where = f"{out}" + (f" and Qdrant {args.uri} (collection {args.collection!r}, {meta['count']} points)"
                        if args.backend == "qdrant" else "")
    kind = m["factory"] if args.backend == "faiss" else "shards only"
    lexical = ", + BM25" if m.get("bm25") else ""
    _console().print(f"indexed {what}{m['count']} passages ({len(m['shards'])} shards, {kind}{lexical}) into {where} "
                     f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_merge(args) -> int:
    """Join the parts of an index built with --shard i/n."""
    from .retrieval.index import merge_indexes

    try:
        out = merge_indexes(args.parts, args.output, factory=args.factory, train_size=args.train_size,
                            bm25=args.bm25, fusion=_fusion(args))
    except ValueError as e:
        return _fail(e)
    _console().print(f"merged {len(args.parts)} parts into {out}")
    return 0


def _index_location(args) -> str:
    """--index DIR (faiss) or --uri URI (a vector database)."""
    if args.backend == "faiss":
        if not args.index:
            raise ValueError("give --index DIR (or --backend qdrant --uri URI)")
        return args.index
    if not args.uri:
        raise ValueError(f"--backend {args.backend} needs --uri (a server URL or a local directory)")
    return args.uri


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["faiss", "qdrant"], default="faiss",
                   help="where the vectors are searched: the index folder's FAISS file, or a Qdrant collection "
                        "(default: %(default)s)")
    p.add_argument("--uri", default=None, help="Qdrant: a server URL (http://host:6333; API key from "
                                               "$QDRANT_API_KEY) or a local directory (embedded mode)")
    p.add_argument("--collection", default="llara", help="Qdrant collection (default: %(default)s)")


def cmd_search(args) -> int:
    """Search an index from the command line (loads the model recorded in the index)."""
    import json

    from .retrieval.searcher import Searcher

    try:
        searcher = Searcher.from_index(_index_location(args), device=args.device, params=args.faiss_params,
                                       verify=args.verify, backend=args.backend, collection=args.collection,
                                       runtime=args.runtime)
        mode = searcher.check_mode(args.mode)
        given = any(v is not None for v in (args.fusion, args.alpha, args.normalization, args.rrf_k, args.depth))
        if given and mode != "hybrid":
            raise ValueError(f"--fusion/--alpha/--normalization/--rrf-k/--depth are for --mode hybrid, not {mode}")
        results = searcher.search(args.query, k=args.k, mode=mode,
                                  fusion=_fusion(args, searcher.fusion) if given else None)
    except ValueError as e:
        return _fail(e)
    if args.json:
        for q, hits in zip(args.query, results):
            sys.stdout.write(json.dumps({"query": q, "hits": [h.__dict__ for h in hits]}, ensure_ascii=False) + "\n")
        return 0
    from rich.table import Table

    for q, hits in zip(args.query, results):
        table = Table(title=q)
        for col in ("rank", "score", "doc_id", "title"):
            table.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for rank, h in enumerate(hits, 1):
            table.add_row(str(rank), f"{h.score:.4f}", h.doc_id, h.title)
        _console().print(table)
    return 0


def cmd_check_index(args) -> int:
    """Check an index against its manifest without reading it into memory."""
    import json

    from .retrieval.check import check_index

    try:
        r = check_index(args.index, full=args.full)
    except ValueError as e:
        return _fail(e)
    if args.json:
        sys.stdout.write(json.dumps(r) + "\n")
        return 0
    state = "complete" if r["complete"] else f"part {r['part'][0]}/{r['part'][1]}" if r["part"] else "unfinished"
    _console().print(f"ok: {r['path']}: {r['rows']} passages in {r['shards']} shards ({state}); {r['files']} files, "
                     f"{r['bytes'] / 1e6:.1f} MB, {r['bytes_hashed'] / 1e6:.1f} MB hashed, in {r['seconds']:.2f} s")
    return 0


def cmd_serve(args) -> int:
    """HTTP search service (loopback by default)."""
    from .serve import run

    try:
        run(_index_location(args), backend=args.backend, collection=args.collection,
            host=args.host, port=args.port, device=args.device, params=args.faiss_params, runtime=args.runtime,
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_k=args.max_k,
            max_query_chars=args.max_query_chars, max_body_bytes=args.max_body_bytes, verify=args.verify,
            max_pending=args.max_pending, head_timeout=args.head_timeout, body_timeout=args.body_timeout,
            keep_alive=args.keep_alive)
    except ValueError as e:
        return _fail(e)
    return 0


def cmd_mine(args) -> int:
    """Hard negatives for contrastive fine-tuning, from BM25 or a dense model."""
    from .data.beir import load_corpus, load_qrels, load_queries
    from .retrieval import mining

    if args.pairs:
        if args.corpus or args.queries or args.qrels or args.train:
            return _fail(ValueError("--pairs replaces --corpus, --queries, --qrels and --train: give one or the other"))
        shipped = PAIRS_DIR / args.pairs
        args.corpus, args.queries = str(shipped / "corpus.jsonl.gz"), str(shipped / "queries.jsonl.gz")
        args.qrels = str(shipped / "qrels" / "train.tsv.gz")
    elif not args.corpus:
        return _fail(ValueError("give --corpus (with --queries/--qrels or --train), or --pairs squad"))
    corpus = load_corpus(args.corpus)
    if args.train:
        queries, positives, unmatched = mining.positives_from_train_jsonl(args.train, corpus)
        if unmatched:
            log.warning("%d positives of %s are not in the corpus (they are still kept out of the negatives "
                        "only if their text matches a corpus document)", unmatched, args.train)
    else:
        if not (args.queries and args.qrels):
            raise FileNotFoundError("give --queries and --qrels (a BEIR split), or --train train.jsonl")
        all_queries = load_queries(args.queries)
        qrels = load_qrels(args.qrels)
        positives = {q: {d for d, s in rel.items() if s > 0} for q, rel in qrels.items()}
        unknown = [q for q in positives if q not in all_queries]
        if unknown:
            raise FileNotFoundError(f"{args.qrels}: query id {unknown[0]!r} is not in {args.queries}")
        queries = {q: all_queries[q] for q in positives}
    cfg = mining.MiningConfig(window=tuple(args.window), num_negatives=args.negatives, margin=args.margin,
                              seed=args.seed)
    encoder = _make_encoder(args, args.template) if args.method == "dense" else None
    k = cfg.window[1] + max((len(p) for p in positives.values()), default=0)
    run, emb, dids = mining.retrieve(args.method, corpus, queries, k, encoder)
    pos_scores = mining.dense_positive_scores(emb, dids, positives) if emb is not None else None
    negatives = mining.sample_negatives(run, positives, cfg, pos_scores)
    n = mining.write_jsonl_atomic(mining.iter_training_lines(queries, positives, negatives, corpus), args.output)
    counts = [len(v) for v in negatives.values()]
    _console().print(f"wrote {n} training groups to {args.output} "
                     f"({np.mean(counts) if counts else 0:.1f} negatives per query on average, "
                     f"ranks {cfg.window[0]}-{cfg.window[1]} of {args.method})")
    return 0


def _train_config(args):
    from .training.checkpoint import list_checkpoints
    from .training.config import TrainConfig, config_from_args

    if not args.resume and list_checkpoints(args.output):
        raise FileExistsError(f"{args.output} holds checkpoints of an earlier run: continue it with --resume, "
                              "or choose another --output")
    args.output_dir = args.output
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    return config_from_args(args, TrainConfig)


def cmd_pretrain(args) -> int:
    """LLaRA adaptation (EBAE + EBAR) on unlabelled text."""
    from .data.pretrain import PretrainDataConfig
    from .training.config import config_from_args
    from .training.pretrain import PretrainLossConfig, pretrain

    train_cfg = _train_config(args)
    data_cfg = config_from_args(argparse.Namespace(**{**vars(args), "seed": args.seed}), PretrainDataConfig)
    loss_cfg = config_from_args(args, PretrainLossConfig)
    result = pretrain(args.model, args.data, train_cfg, data_cfg, loss_cfg)
    _console().print(f"adapted model: {result.export_dir or args.output}; loss curve: {args.output}/loss.png")
    return 0


def cmd_finetune(args) -> int:
    """Contrastive fine-tuning on {query, pos, neg} lines (e.g. from `llara mine`)."""
    from .training.config import config_from_args
    from .training.finetune import FinetuneConfig, finetune

    train_cfg = _train_config(args)
    result = finetune(args.model, args.data, train_cfg, config_from_args(args, FinetuneConfig))
    _console().print(f"fine-tuned model: {result.export_dir or args.output}; loss curve: {args.output}/loss.png")
    return 0


def _add_training_args(p: argparse.ArgumentParser, *extra_configs) -> None:
    from .training.config import TrainConfig, add_config_arguments

    p.add_argument("--model", default="default", help="model to train (same forms as for evaluate)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, train_log.jsonl, loss.png, final/")
    add_config_arguments(p, TrainConfig, skip=("output_dir",))
    for cls in extra_configs:
        add_config_arguments(p, cls, skip=("seed",))


NO_VERIFY_HELP = ("open without hashing the embeddings and FAISS file: only the light check of 'llara check-index' "
                  "(sizes, line counts, .npy headers, the id/title files' sha256); for large indexes")


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
    _add_encoder_args(p)
    _add_fusion_args(p)
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
    _add_encoder_args(p)
    p.set_defaults(func=cmd_mine)

    from .data.pretrain import PretrainDataConfig
    from .training.finetune import FinetuneConfig
    from .training.pretrain import PretrainLossConfig

    p = sub.add_parser("pretrain", help="LLaRA unsupervised adaptation (EBAE + EBAR) on unlabelled text")
    p.add_argument("--data", action="append", required=True,
                   help="text file, JSONL (text field), BEIR corpus.jsonl or {doc, idx, text} passages; repeatable")
    _add_training_args(p, PretrainDataConfig, PretrainLossConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="contrastive fine-tuning with hard negatives")
    p.add_argument("--data", required=True, help="train.jsonl with {query, pos: [...], neg: [...]} lines")
    _add_training_args(p, FinetuneConfig)
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
    _add_encoder_args(p)
    _add_fusion_args(p)
    p.set_defaults(func=cmd_demo, template=None, max_passage_length=112, max_query_length=64)
    p = sub.add_parser("index", help="encode a corpus.jsonl into a persistent FAISS index directory (resumable)")
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl ({_id, title, text} per line), streamed")
    p.add_argument("--output", required=True, help="index directory (manifest.json, shards/, index.faiss)")
    p.add_argument("--factory", default="Flat",
                   help="FAISS index_factory string, inner product: Flat, IVF4096,PQ64, HNSW32 ... (default: Flat)")
    p.add_argument("--shard-size", type=int, default=10_000, help="passages per shard (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run after its last finished shard")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="i/n",
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
    _add_backend_args(p)
    _add_encoder_args(p)
    _add_fusion_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("merge", help="join index parts built with --shard i/n")
    p.add_argument("--output", required=True, help="directory for the merged index")
    p.add_argument("parts", nargs="+", metavar="PART_DIR")
    p.add_argument("--factory", default=None, help="FAISS factory string (default: the parts')")
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--no-bm25", dest="bm25", action="store_false", help="do not build the BM25 index")
    _add_fusion_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("search", help="search an index with the model recorded in it")
    p.add_argument("--index", help="index directory (FAISS backend)")
    _add_backend_args(p)
    p.add_argument("query", nargs="+", help="one or more queries")
    p.add_argument("-k", type=int, default=10, help="hits per query (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default=None,
                   help="default: hybrid when the index has BM25, else dense")
    _add_fusion_args(p, overrides=True)
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
    _add_backend_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=_port_arg, default=8000)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.template is None:
        args.template = ["mean", "eos", "llara"]  # mean and eos share one forward pass
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (ValueError, OSError) as e:  # bad input: DataError, TemplateError, missing/existing files ...
        if args.verbose:
            log.exception("%s", e)
        return _fail(e)
    except Exception as e:  # a bug: one line, the traceback with -v
        if args.verbose:
            log.exception("unexpected error")
        return _fail(f"unexpected {type(e).__name__}: {e} (rerun with -v for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
