"""The ``llara`` command line. Each command parses its flags and calls the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from . import cli_args
from .cli_args import fusion_config, index_location, make_encoder, train_config
from .data.shipped import shipped_pairs
from .console import ConsoleReport, console, fail, print_hits, print_side_by_side, print_table, setup_logging, styled

log = logging.getLogger("llara")



def cmd_evaluate(args) -> int:
    """Evaluate BM25, dense templates and/or hybrid runs on BEIR-format datasets (evaluation.runner)."""
    from .evaluation.runner import evaluate_datasets

    out = Path(args.output)
    try:
        pairs = evaluate_datasets(args.dataset, args.method or ["dense"], out, templates=args.template,
                                  encoder=lambda: make_encoder(args, args.template), split=args.split, k=args.k,
                                  fusion=fusion_config(args))
        results = [r for r, _ in pairs]
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
    def encoder(model, templates):
        return make_encoder(argparse.Namespace(**{**vars(args), "model": model}), templates)

    r = run_demo(cfg, encoder, ConsoleReport())
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
        shipped = shipped_pairs(args.pairs)
        args.corpus, args.queries, args.qrels = (str(shipped[k]) for k in ("corpus", "queries", "qrels"))
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


def cmd_recipe(args) -> int:
    """Adapt, mine, fine-tune and index a corpus of the user's (llara.recipe), resumable."""
    from .modeling.encoder import Encoder
    from .recipe import RecipeConfig, run_recipe
    from .retrieval.searcher import Searcher
    from .training.config import config_from_args

    t0 = time.perf_counter()
    try:
        cfg = config_from_args(argparse.Namespace(**vars(args), cpu=args.device == "cpu"), RecipeConfig)
        r = run_recipe(cfg, lambda model: Encoder.from_pretrained(model, device=args.device, dtype=args.dtype,
                                                                  show_progress=args.progress),
                       say=console().print,
                       make_searcher=lambda index: Searcher.from_index(index, device=args.device, dtype=args.dtype))
    except ValueError as e:
        return fail(e)
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in r["stages"].items())
    console().print(f"done in {time.perf_counter() - t0:.0f} s (recorded stage times: {times}); "
                    f"model {r['model']}; index {r['index']}: llara search --index {r['index']} \"your question\"")
    return 0


def cmd_loadtest(args) -> int:
    """Load-test a running service (llara.loadtest)."""
    from .loadtest import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    return cli_args.build_parser({
        "evaluate": cmd_evaluate,
        "mine": cmd_mine,
        "pretrain": cmd_pretrain,
        "finetune": cmd_finetune,
        "recipe": cmd_recipe,
        "export": cmd_export,
        "demo": cmd_demo,
        "index": cmd_index,
        "merge": cmd_merge,
        "search": cmd_search,
        "check-index": cmd_check_index,
        "serve": cmd_serve,
        "loadtest": cmd_loadtest,
    })


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
