"""One config dataclass per ``llara`` command: its fields are the command's flags
(:func:`~llara.training.config.add_config_arguments` makes them), and ``__post_init__`` checks the
input before any work: ranges, files that must exist and parse, the model, the index, a free port.
A wrong flag is a ``ValueError`` in the user's terms, raised before a model loads or an output
directory is made; ``llara.cli.main`` prints it as one ``error:`` line.

Flags shared by several commands come from the option classes of :mod:`llara.cli.options`
(``EncoderOptions``, ``FusionOptions``, ``BackendOptions``, ``IndexLocation``) the command configs inherit from.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..data.shipped import SHIPPED_PAIRS, shipped_pairs
from ..modeling.loading import check_model
from ..modeling.runtime import RUNTIMES
from ..pipelines.demo import DemoConfig
from ..pipelines.recipe import RecipeConfig
from ..prompts import get_template
from ..retrieval.mining import MiningConfig
from ..retrieval.searcher import MODES
from ..retrieval.store import MANIFEST, parse_shard_spec
from ..training.config import config_from_args, option
from .checks import (check_beir_dir, check_corpus, check_index_dir, check_jsonl, check_port_free, existing_file,
                     not_negative, positive)
from .options import (AUTO_DTYPES, DTYPES, BackendOptions, Checked, EncoderOptions, FusionOptions, IndexLocation,
                      like)

DEMO_DIR = Path(__file__).parents[1] / "data" / "demo"
NO_VERIFY_HELP = ("hash the embeddings and FAISS file when opening; --no-verify: only the light check of "
                  "'llara check-index' (sizes, line counts, .npy headers, the id/title files' sha256), for large "
                  "indexes")


@dataclass(kw_only=True)
class EvaluateConfig(EncoderOptions, FusionOptions):
    """``llara evaluate``: dense templates, BM25 and/or hybrid runs on BEIR-format datasets."""

    dataset: list[str] = option(help="BEIR-format directory; repeatable", action="append")
    method: list[str] | None = option(None, "repeatable (default: dense); hybrid fuses the dense and BM25 runs (one "
                                            "pass of each per dataset, shared with --method dense / bm25)",
                                      action="append", choices=("dense", "bm25", "hybrid"))
    split: str = option("test", "qrels split to evaluate on")
    k: int = option(100, "documents retrieved per query", flags=("-k",))
    output: str = option(help="directory for metrics.json, run.trec and summary files")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(k=self.k)
        for d in self.dataset:
            check_beir_dir(d, self.split)


@dataclass(kw_only=True)
class MineConfig(EncoderOptions):
    """``llara mine``: hard negatives for contrastive fine-tuning, from BM25 or a dense model."""

    corpus: str | None = option(None, "corpus.jsonl to mine from")
    pairs: str | None = option(None, "instead of --corpus/--queries/--qrels: pairs shipped with llara; squad = 10,570 "
                                     "SQuAD v1.1 questions and their Wikipedia paragraphs (CC BY-SA 4.0, attribution "
                                     "in data/pairs/squad)", choices=tuple(SHIPPED_PAIRS))
    queries: str | None = option(None, "queries.jsonl (with --qrels)")
    qrels: str | None = option(None, "qrels .tsv naming the positives (e.g. qrels/train.tsv)")
    train: str | None = option(None, "instead of --queries/--qrels: train.jsonl with {query, pos: [...]}")
    method: str = option("dense", "retriever whose ranks the negatives come from", choices=("dense", "bm25"))
    window: list[int] = option([10, 200], "1-based rank window LO HI to sample negatives from", nargs=2,
                               metavar=("LO", "HI"))
    negatives: int = option(15, "negatives per query")
    margin: float | None = option(None, "drop candidates scoring above (best positive score - margin): "
                                        "false-negative guard")
    seed: int = option(0, "sampling seed")
    output: str = option(help="train.jsonl to write")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pairs:
            if self.corpus or self.queries or self.qrels or self.train:
                raise ValueError("--pairs replaces --corpus, --queries, --qrels and --train: give one or the other")
            shipped = shipped_pairs(self.pairs)
            self.corpus, self.queries, self.qrels = (str(shipped[k]) for k in ("corpus", "queries", "qrels"))
        elif not self.corpus:
            raise ValueError("give --corpus (with --queries/--qrels or --train), or --pairs squad")
        if not self.train and not (self.queries and self.qrels):
            raise ValueError("give --queries and --qrels (a BEIR split), or --train train.jsonl")
        check_corpus(self.corpus)
        for name in ("queries", "qrels", "train"):
            if getattr(self, name) is not None:
                existing_file(getattr(self, name), f"--{name} file")
        self.mining = MiningConfig(window=tuple(self.window), num_negatives=self.negatives, margin=self.margin,
                                   seed=self.seed)


@dataclass(kw_only=True)
class IndexConfig(EncoderOptions, FusionOptions, BackendOptions):
    """``llara index``: encode a corpus.jsonl into a persistent, resumable index directory."""

    corpus: str = option(help="BEIR corpus.jsonl ({_id, title, text} per line), streamed")
    output: str = option(help="index directory (manifest.json, shards/, index.faiss)")
    factory: str = option("Flat", "FAISS index_factory string, inner product: Flat, IVF4096,PQ64, HNSW32 ...")
    shard_size: int = option(10_000, "passages per shard")
    resume: bool = option(False, "continue an interrupted run after its last finished shard")
    shard: tuple[int, int] | None = option(None, "encode only part i of n (shards s with s % n == i) into a partial "
                                                 "directory; join the parts with 'llara merge'", type=str,
                                           metavar="i/n")
    train_size: int = option(200_000, "vectors sampled to train non-Flat indexes")
    bm25: bool = option(True, "build the BM25 index of the corpus too (--no-bm25: dense search only)")
    engine: str = option("local", "local: this process; ray: Ray Data actors, one model each, on a local or remote "
                                  "Ray cluster (pip install 'llara[ray]'); same shards and manifest",
                         choices=("local", "ray"))
    ray_address: str | None = option(None, "Ray cluster to join (e.g. ray://head:10001 or auto); default: start a "
                                           "local one")
    workers: int = option(2, "Ray: encoder actors")

    def __post_init__(self) -> None:
        self.shard = parse_shard_spec(self.shard)
        super().__post_init__()
        positive(shard_size=self.shard_size, train_size=self.train_size, workers=self.workers)
        if self.template and len(self.template) > 1:
            raise ValueError("an index has one template; give --template once")
        if self.backend != "faiss" and (not self.uri or self.shard):
            raise ValueError(f"--backend {self.backend} needs --uri, and exports a whole index (no --shard)")
        if (Path(self.output) / MANIFEST).is_file() and not self.resume:
            raise ValueError(f"{self.output}: already holds an index; resume it (--resume) or choose a new directory")
        check_corpus(self.corpus)


@dataclass(kw_only=True)
class MergeConfig(FusionOptions):
    """``llara merge``: join the parts of an index built with --shard i/n."""

    output: str = option(help="directory for the merged index")
    parts: list[str] = option(help="the part directories", flags=(), nargs="+", metavar="PART_DIR")
    factory: str | None = option(None, "FAISS factory string (default: the parts')")
    train_size: int = option(200_000, "vectors sampled to train non-Flat indexes")
    bm25: bool = option(True, "build the BM25 index (--no-bm25: dense only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(train_size=self.train_size)
        for part in self.parts:
            check_index_dir(part)


@dataclass(kw_only=True)
class SearchConfig(IndexLocation, FusionOptions):
    """``llara search``: search an index from the command line with the model recorded in it."""

    query: list[str] = option(help="one or more queries", flags=(), nargs="+")
    k: int = option(10, "hits per query", flags=("-k",))
    json: bool = option(False, "one JSON object per query on stdout")
    mode: str | None = option(None, "default: hybrid when the index has BM25, else dense", choices=MODES)
    device: str | None = option(None, "cpu, cuda ... (default: cuda if available)")
    faiss_params: str | None = option(None, "FAISS run-time parameters, e.g. nprobe=32 or efSearch=128; Qdrant: "
                                            "exact=1 or hnsw_ef=128", flags=("--faiss-params", "--search-params"))
    runtime: str | None = option(None, "forward pass for the queries (default: the one the index was built with)",
                                 choices=RUNTIMES)
    verify: bool = option(True, NO_VERIFY_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(k=self.k)
        for i, q in enumerate(self.query, 1):
            if not q.strip():  # as the service answers 422
                raise ValueError(f"query {i} is empty (only whitespace)")


@dataclass(kw_only=True)
class CheckIndexConfig(Checked):
    """``llara check-index``: check an index against its manifest without reading it into memory."""

    index: str = option(help="index directory")
    full: bool = option(False, "hash every file, embeddings and FAISS index included")
    json: bool = option(False, "print what was checked as one JSON object")


@dataclass(kw_only=True)
class ServeConfig(IndexLocation):
    """``llara serve``: the HTTP search and embedding service over an index (loopback by default)."""

    no_index = ("give --index DIR (search and embeddings), --model to serve embeddings only, or --backend qdrant "
                "--uri URI")
    model: str | None = option(None, "the model to load (default: the one the index's manifest names); without an "
                                     "index: serve embeddings only (POST /v1/embeddings), no /search")
    host: str = option("127.0.0.1", "bind address (default: loopback only)")
    port: int = option(8000, "TCP port; 0: any free one")
    device: str | None = option(None, "cpu, cuda ... (default: cuda if available)")
    faiss_params: str | None = option(None, "FAISS run-time parameters, e.g. nprobe=32; Qdrant: exact=1 or "
                                            "hnsw_ef=128", flags=("--faiss-params", "--search-params"))
    runtime: str | None = option(None, "forward pass for the queries (default: the one the index was built with)",
                                 choices=RUNTIMES)
    max_batch: int = option(32, "texts (search queries and embedding inputs) per micro-batch")
    max_wait_ms: float = option(50.0, "how long a free encoder may wait for the clients it expects back (those "
                                      "answered by its last batch) before it runs a batch; one client never waits")
    max_k: int = option(1000, "largest k a request may ask for")
    max_query_chars: int = option(2048, "longest query, in characters")
    max_body_bytes: int = option(1 << 20, "largest request body")
    max_pending: int | None = option(None, "queries and texts waiting for the encoder before new requests get 429 + "
                                           "Retry-After (default: 8 x --max-batch)")
    max_inputs: int | None = option(None, "texts per POST /v1/embeddings request (default: --max-pending)")
    max_batch_tokens: int | None = option(None, "padded tokens per forward pass (as text-embeddings-inference's "
                                                "--max-batch-tokens): a micro-batch over it runs as several passes")
    model_name: str | None = option(None, "the model name /v1/embeddings expects and /v1/models lists (default: the "
                                          "model's id, e.g. its directory name)")
    default_input_type: str | None = option(None, "the side /v1/embeddings embeds when a request has no input_type "
                                                  "(default: passage, what clients unaware of the field usually "
                                                  "send: documents to index)", choices=("query", "passage"))
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every route but /health, /ready, "
                                       "/metrics and the schema (default: $LLARA_API_KEY; none: no authentication). "
                                       "Prefer the environment variable: a flag shows in the process list")
    head_timeout: float = option(10.0, "seconds a connection has to send a complete request head")
    body_timeout: float = option(10.0, "seconds a request has to send its whole body, else 408")
    keep_alive: int = option(5, "seconds an idle connection stays open after a response")
    verify: bool = option(True, NO_VERIFY_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0-65535, got {self.port}")
        positive(max_batch=self.max_batch, max_k=self.max_k, max_query_chars=self.max_query_chars,
                 max_body_bytes=self.max_body_bytes, max_pending=self.max_pending, keep_alive=self.keep_alive,
                 max_inputs=self.max_inputs, max_batch_tokens=self.max_batch_tokens)
        if self.model is not None:
            check_model(self.model)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty (--api-key or $LLARA_API_KEY)")
        not_negative(max_wait_ms=self.max_wait_ms)
        for name in ("head_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_pending is not None and self.max_pending < self.max_batch:
            raise ValueError(f"--max-pending ({self.max_pending}) must be >= --max-batch ({self.max_batch})")
        check_port_free(self.host, self.port)

    @property
    def needs_index(self) -> bool:
        return self.model is None  # with --model alone: embeddings only


@dataclass(kw_only=True)
class ExportConfig(Checked):
    """``llara export``: write any model llara loads as a llara + sentence-transformers directory."""

    source: str = option(help="llara checkpoint, PEFT adapter dir, Hugging Face dir (e.g. a released LLaRA), .gguf, "
                              "default", flags=())
    output: str = option(help="directory to write (replaced atomically)", flags=())
    template: str | None = option(None, "default: the source's template, else llara")
    max_query_length: int | None = option(None, "tokens per query, prompt included (default: the source's)")
    max_passage_length: int | None = option(None, "tokens per passage, prompt included (default: the source's)")
    dtype: str | None = option(None, "default: the dtype of the weights on disk", choices=DTYPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(max_query_length=self.max_query_length, max_passage_length=self.max_passage_length)
        check_model(self.source)
        if self.template is not None:
            get_template(self.template)


@dataclass(kw_only=True)
class TrainInputs(Checked):
    """What ``llara pretrain`` / ``finetune`` read and write (their settings: the training configs)."""

    model: str = option("default", "model to train (same forms as for evaluate)")
    output: str = option(help="run directory: checkpoints, train_log.jsonl, loss.png, final/")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_model(self.model)


@dataclass(kw_only=True)
class PretrainInputs(TrainInputs):
    data: list[str] = option(help="text file, JSONL (text field), BEIR corpus.jsonl or {doc, idx, text} passages; "
                                  "repeatable", action="append")

    def __post_init__(self) -> None:
        super().__post_init__()
        for path in self.data:
            if not Path(path).exists():
                raise ValueError(f"{path}: no such data file")


@dataclass(kw_only=True)
class FinetuneInputs(TrainInputs):
    data: str = option(help="train.jsonl with {query, pos: [...], neg: [...]} lines")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_jsonl(self.data, "training file (train.jsonl)")


@dataclass(kw_only=True)
class RecipeInputs(Checked):
    """What ``llara recipe`` starts from (its settings: :class:`~llara.pipelines.recipe.RecipeConfig`)."""

    corpus: str = like(RecipeConfig, "corpus")
    model: str = like(RecipeConfig, "model")
    device: str | None = option(None, "cpu, cuda ... (default: cuda if available); cpu also trains there")
    dtype: str = option("auto", "index encoding precision", choices=AUTO_DTYPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_model(self.model)
        check_corpus(self.corpus)


@dataclass(kw_only=True)
class DemoCommand(EncoderOptions, FusionOptions):
    """``llara demo``: evaluate the embedded model, adapt it with LLaRA on the demo collection's corpus,
    evaluate again. Its settings are a :class:`~llara.pipelines.demo.DemoConfig` (:attr:`demo`)."""

    dataset: str = option(str(DEMO_DIR / "med"), "BEIR-format directory (default: the shipped med collection)")
    output: str = like(DemoConfig, "output", "run directory: before/, adapt/, after/, summary.md")
    adapt_steps: int = like(DemoConfig, "adapt_steps", "adaptation steps; 0: zero-shot only")
    adapt_batch_size: int = like(DemoConfig, "adapt_batch_size", "(chunk, next chunk) pairs per adaptation step")
    adapt_lr: float = like(DemoConfig, "adapt_lr", "adaptation learning rate")
    adapt_chunk_tokens: int = like(DemoConfig, "adapt_chunk_tokens", "adaptation chunk length")
    split: str = like(DemoConfig, "split", "qrels split to evaluate on")
    k: int = like(DemoConfig, "k", "documents retrieved per query", flags=("-k",))
    max_query_length: int = like(DemoConfig, "max_query_length", "tokens per query, prompt included")
    max_passage_length: int = like(DemoConfig, "max_passage_length", "tokens per passage, prompt included")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beir_dir(self.dataset, self.split)
        # the fields of the same name, and those the command line spells differently
        spelled = {"fusion": self.fusion_config(), "cpu": self.device == "cpu",
                   **({"templates": self.template} if self.template else {})}
        self.demo = config_from_args(argparse.Namespace(**vars(self)), DemoConfig, **spelled)
