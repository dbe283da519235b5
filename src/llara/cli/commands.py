"""What each ``llara`` command does: take its checked config (``args.config``, made by
:func:`llara.cli.main` from the flags), call one library function, print the outcome. Errors are
caught once, in ``main()``. The flags and their checks are in :mod:`llara.cli.configs`."""
from __future__ import annotations

import json
import sys
import time

from .args import train_config
from .console import ConsoleReport, console, print_hits, print_side_by_side, print_table, styled


def cmd_evaluate(args) -> int:
    """Evaluate BM25, dense templates and/or hybrid runs on BEIR-format datasets (evaluation.runner)."""
    from ..evaluation.runner import evaluate_datasets

    cfg = args.config
    pairs = evaluate_datasets(cfg.dataset, cfg.method or ["dense"], cfg.output, templates=cfg.template,
                              encoder=lambda: cfg.encoder(cfg.template), split=cfg.split, k=cfg.k,
                              fusion=cfg.fusion_config())
    results = [r for r, _ in pairs]
    print_table(results, f"retrieval quality ({cfg.split} split)")
    print_side_by_side(results, "nDCG@10, side by side")
    console().print(f"results written to {cfg.output}/ (summary.md, summary.json, <dataset>/<method>/metrics.json, "
                    "run.trec)")
    return 0


def cmd_export(args) -> int:
    from ..interop.convert import export_checkpoint

    cfg = args.config
    out = export_checkpoint(cfg.source, cfg.output, template=cfg.template, dtype=cfg.dtype,
                            max_query_length=cfg.max_query_length, max_passage_length=cfg.max_passage_length)
    console().print(f"exported {cfg.source} to {out} (llara, sentence-transformers with trust_remote_code=True)")
    return 0


def cmd_demo(args) -> int:
    """The README's main job (llara.pipelines.demo): evaluate, adapt with LLaRA, evaluate again."""
    from ..pipelines.demo import run_demo

    t0 = time.perf_counter()
    cfg = args.config
    r = run_demo(cfg.demo, lambda model, templates: cfg.encoder(templates, model=model), ConsoleReport())
    con, out = console(), cfg.output
    if r.adapted_model is not None:
        nd = r.ndcg
        untrained = f"{nd['llara']:.3f} untrained -> " if "llara" in nd else ""
        con.print(styled(f"nDCG@10 of the LLaRA slots: {untrained}", (f"{nd['adapted']:.3f}", "bold"),
                         f" adapted ({cfg.adapt_steps} steps); loss curve: {r.loss_plot}; "
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
    from ..retrieval.index import build_index

    cfg = args.config
    t0 = time.perf_counter()
    encoder = cfg.encoder(cfg.template, cache=False)  # the shards are the cache; the embedding cache would double them
    engine = None
    if cfg.engine == "ray":
        from ..retrieval.ray_engine import RayEngine

        engine = RayEngine.from_encoder(encoder, cfg.model, workers=cfg.workers, address=cfg.ray_address,
                                        batch_size=encoder.batch_size, max_batch_tokens=encoder.max_batch_tokens,
                                        device=cfg.device, dtype=cfg.dtype)
    out = build_index(encoder, cfg.corpus, cfg.output, model_spec=cfg.model, shard_size=cfg.shard_size,
                      factory=cfg.factory, resume=cfg.resume, shard=cfg.shard, batch_size=cfg.batch_size,
                      train_size=cfg.train_size, faiss_index=cfg.backend == "faiss", engine=engine,
                      bm25=cfg.bm25, fusion=cfg.fusion_config())
    if cfg.backend == "qdrant":
        from ..retrieval.qdrant import export_to_qdrant

        meta = export_to_qdrant(out, cfg.uri, cfg.collection)
    m = json.loads((out / "manifest.json").read_text())
    what = f"part {cfg.shard[0]}/{cfg.shard[1]} " if cfg.shard else ""
    where = f"{out}" + (f" and Qdrant {cfg.uri} (collection {cfg.collection!r}, {meta['count']} points)"
                        if cfg.backend == "qdrant" else "")
    kind = m["factory"] if cfg.backend == "faiss" else "shards only"
    lexical = ", + BM25" if m.get("bm25") else ""
    console().print(f"indexed {what}{m['count']} passages ({len(m['shards'])} shards, {kind}{lexical}) into {where} "
                    f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_merge(args) -> int:
    """Join the parts of an index built with --shard i/n."""
    from ..retrieval.index import merge_indexes

    cfg = args.config
    out = merge_indexes(cfg.parts, cfg.output, factory=cfg.factory, train_size=cfg.train_size, bm25=cfg.bm25,
                        fusion=cfg.fusion_config())
    console().print(f"merged {len(cfg.parts)} parts into {out}")
    return 0


def cmd_search(args) -> int:
    """Search an index from the command line (loads the model recorded in the index)."""
    from ..retrieval.searcher import Searcher

    cfg = args.config
    searcher = Searcher.from_index(cfg.location, device=cfg.device, params=cfg.faiss_params, verify=cfg.verify,
                                   backend=cfg.backend, collection=cfg.collection, runtime=cfg.runtime)
    mode, fusion = searcher.plan(cfg.mode, **cfg.fusion_given())
    results = searcher.search(cfg.query, k=cfg.k, mode=mode, fusion=fusion)
    for q, hits in zip(cfg.query, results):
        if cfg.json:
            sys.stdout.write(json.dumps({"query": q, "hits": [h.__dict__ for h in hits]}, ensure_ascii=False) + "\n")
        else:
            print_hits(q, hits)
    return 0


def cmd_check_index(args) -> int:
    """Check an index against its manifest without reading it into memory."""
    from ..retrieval.check import check_index

    cfg = args.config
    r = check_index(cfg.index, full=cfg.full)
    if cfg.json:
        sys.stdout.write(json.dumps(r) + "\n")
        return 0
    state = "complete" if r["complete"] else f"part {r['part'][0]}/{r['part'][1]}" if r["part"] else "unfinished"
    console().print(f"ok: {r['path']}: {r['rows']} passages in {r['shards']} shards ({state}); {r['files']} files, "
                    f"{r['bytes'] / 1e6:.1f} MB, {r['bytes_hashed'] / 1e6:.1f} MB hashed, in {r['seconds']:.2f} s")
    return 0


def cmd_serve(args) -> int:
    """HTTP search service (loopback by default)."""
    from ..serve.server import run

    cfg = args.config
    run(cfg.location, backend=cfg.backend, collection=cfg.collection, host=cfg.host, port=cfg.port,
        device=cfg.device, params=cfg.faiss_params, runtime=cfg.runtime, max_batch=cfg.max_batch,
        max_wait_ms=cfg.max_wait_ms, max_k=cfg.max_k, max_query_chars=cfg.max_query_chars,
        max_body_bytes=cfg.max_body_bytes, verify=cfg.verify, max_pending=cfg.max_pending,
        head_timeout=cfg.head_timeout, body_timeout=cfg.body_timeout, keep_alive=cfg.keep_alive, model=cfg.model,
        max_inputs=cfg.max_inputs, model_name=cfg.model_name, default_input_type=cfg.default_input_type,
        api_key=cfg.api_key, max_batch_tokens=cfg.max_batch_tokens)
    return 0


def cmd_mine(args) -> int:
    """Hard negatives for contrastive fine-tuning, from BM25 or a dense model."""
    from ..retrieval.mining import mine

    cfg = args.config
    r = mine(cfg.corpus, cfg.output, queries=cfg.queries, qrels=cfg.qrels, train=cfg.train, method=cfg.method,
             config=cfg.mining, encoder=lambda: cfg.encoder(cfg.template))
    console().print(f"wrote {r.groups} training groups to {cfg.output} "
                    f"({r.mean_negatives:.1f} negatives per query on average, "
                    f"ranks {cfg.window[0]}-{cfg.window[1]} of {cfg.method})")
    return 0


def cmd_pretrain(args) -> int:
    """LLaRA adaptation (EBAE + EBAR) on unlabelled text."""
    from ..data.pretrain import PretrainDataConfig
    from ..training.config import config_from_args
    from ..training.pretrain import PretrainLossConfig, pretrain

    cfg = args.config
    result = pretrain(cfg.model, cfg.data, train_config(args), config_from_args(args, PretrainDataConfig),
                      config_from_args(args, PretrainLossConfig))
    console().print(f"adapted model: {result.export_dir or cfg.output}; loss curve: {cfg.output}/loss.png")
    return 0


def cmd_finetune(args) -> int:
    """Contrastive fine-tuning on {query, pos, neg} lines (e.g. from `llara mine`)."""
    from ..training.config import config_from_args
    from ..training.finetune import FinetuneConfig, finetune

    cfg = args.config
    result = finetune(cfg.model, cfg.data, train_config(args), config_from_args(args, FinetuneConfig))
    console().print(f"fine-tuned model: {result.export_dir or cfg.output}; loss curve: {cfg.output}/loss.png")
    return 0


def cmd_recipe(args) -> int:
    """Adapt, mine, fine-tune and index a corpus of the user's (llara.pipelines.recipe), resumable."""
    from ..modeling.encoder import Encoder
    from ..pipelines.recipe import RecipeConfig, run_recipe
    from ..retrieval.searcher import Searcher
    from ..training.config import config_from_args

    t0 = time.perf_counter()
    cfg = config_from_args(args, RecipeConfig, cpu=args.device == "cpu")
    r = run_recipe(cfg, lambda model: Encoder.from_pretrained(model, device=args.device, dtype=args.dtype,
                                                              show_progress=args.progress),
                   say=console().print,
                   make_searcher=lambda index: Searcher.from_index(index, device=args.device, dtype=args.dtype))
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in r["stages"].items())
    console().print(f"done in {time.perf_counter() - t0:.0f} s (recorded stage times: {times}); "
                    f"model {r['model']}; index {r['index']}: llara search --index {r['index']} \"your question\"")
    return 0


def cmd_loadtest(args) -> int:
    """Load-test a running service (llara.serve.loadtest)."""
    from ..serve.loadtest import run

    return run(args)
