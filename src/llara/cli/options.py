"""The flags several ``llara`` commands share: option classes (:class:`EncoderOptions`,
:class:`FusionOptions`, :class:`BackendOptions`, :class:`IndexLocation`) that the command configs of
:mod:`llara.cli.configs` inherit, each checking its own fields in a cooperative ``__post_init__``
(:class:`Checked` is the chain's root), and :func:`like`, a flag that copies another config's field.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..io import cache_root
from ..modeling.encoder import DEFAULT_MAX_PASSAGE_LENGTH, DEFAULT_MAX_QUERY_LENGTH, Encoder
from ..modeling.loading import check_model
from ..modeling.runtime import RUNTIMES
from ..prompts import get_template
from ..retrieval.fusion import DEFAULT_ALPHA, DEFAULT_DEPTH, DEFAULT_RRF_K, FUSIONS, NORMALIZATIONS, FusionConfig
from ..training.config import option
from .checks import check_index_dir, positive

DTYPES = ("float32", "bfloat16", "float16")
AUTO_DTYPES = ("auto", *DTYPES)
INDEX_ELSE = "the index's for search, else "  # the fusion flags' defaults


def like(cls, name: str, help: str | None = None, **kw):
    """A flag with the default (and, unless given, the help) of the field ``name`` of ``cls``."""
    f = cls.__dataclass_fields__[name]
    return option(f.default, f.metadata.get("help", "") if help is None else help, **kw)


class Checked:
    """Root of the cooperative ``__post_init__`` chain of the option classes."""

    def __post_init__(self) -> None:
        pass


@dataclass(kw_only=True)
class EncoderOptions(Checked):
    """How the model that encodes texts is loaded."""

    model: str = option("default", "'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a llara checkpoint, "
                                   "or a Hugging Face directory / hub id")
    template: list[str] | None = option(None, "built-in name (llara, paper, eos, mean, prompteol) or a .yaml/.json "
                                              "file; repeatable (default: the checkpoint's template, else llara)",
                                        action="append")
    max_query_length: int | None = option(None, "tokens per query, prompt included; only the text is truncated "
                                                f"(default: the checkpoint's, else {DEFAULT_MAX_QUERY_LENGTH})")
    max_passage_length: int | None = option(None, "tokens per passage, prompt included (default: the checkpoint's, "
                                                  f"else {DEFAULT_MAX_PASSAGE_LENGTH})")
    batch_size: int | None = option(None, "texts per batch (default: 32; with --max-batch-tokens alone, no limit "
                                          "on texts)")
    max_batch_tokens: int | None = option(None, "padded tokens per batch, as text-embeddings-inference's: texts "
                                                "sorted by length fill each batch up to it (at least one text of "
                                                "the max length; with --batch-size, both limits apply)")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str = option("auto", "auto: bfloat16 on GPUs and on CPUs whose bf16 matmul is measured faster than fp32 "
                                "(AMX, AVX512-BF16), else float32", choices=AUTO_DTYPES)
    runtime: str = option("torch", "onnx-int8: the forward pass int8 in ONNX Runtime on the CPU (needs the int8 "
                                   "extra; exported once and cached; pooling unchanged)", choices=RUNTIMES)
    cache_dir: str | None = option(None, "embedding cache keyed by weights, template and text (default: "
                                         "$LLARA_CACHE/embeddings)")
    cache: bool = option(True, "read and write the embedding cache")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(max_query_length=self.max_query_length, max_passage_length=self.max_passage_length,
                 batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens)
        check_model(self.model)
        for t in self.template or ():
            get_template(t)

    def encoder(self, templates=None, *, model: str | None = None, cache: bool | None = None):
        """The :class:`~llara.modeling.encoder.Encoder` these options describe (``templates[0]``: its
        template; ``model``: another model, with the same options)."""
        budget = self.max_batch_tokens
        use_cache = self.cache if cache is None else cache
        lengths = {k: v for k, v in (("max_query_length", self.max_query_length),
                                     ("max_passage_length", self.max_passage_length)) if v is not None}
        return Encoder.from_pretrained(
            model or self.model, template=templates[0] if templates else None, device=self.device,
            dtype=self.dtype, batch_size=self.batch_size if self.batch_size is not None or budget else 32,
            max_batch_tokens=budget, cache_dir=(self.cache_dir or cache_root() / "embeddings") if use_cache else None,
            runtime=self.runtime, show_progress=sys.stderr.isatty(), **lengths)  # no bar in logs


@dataclass(kw_only=True)
class FusionOptions(Checked):
    """Hybrid retrieval (BM25 + dense fusion).

    A setting not given is the index's (search) or the default (the others)."""

    fusion: str | None = option(None, "linear: alpha * dense + (1 - alpha) * BM25 on per-query normalised scores; "
                                      f"rrf: reciprocal rank fusion (default: {INDEX_ELSE}linear)", choices=FUSIONS)
    alpha: float | None = option(None, "weight of the dense run in linear fusion, 0..1 "
                                       f"(default: {INDEX_ELSE}{DEFAULT_ALPHA})")
    normalization: str | None = option(None, f"per-query score normalisation for linear fusion (default: "
                                             f"{INDEX_ELSE}minmax)", choices=NORMALIZATIONS)
    rrf_k: float | None = option(None, f"the k of RRF (default: {INDEX_ELSE}{DEFAULT_RRF_K:g})")
    depth: int | None = option(None, f"candidates taken from each run, at least -k (default: {INDEX_ELSE}"
                                     f"{DEFAULT_DEPTH})")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fusion_config()  # the ranges: FusionConfig checks them

    def fusion_given(self) -> dict:
        """The settings given, by :meth:`~llara.retrieval.searcher.Searcher.plan`'s names."""
        return {k: getattr(self, k) for k in ("fusion", "alpha", "normalization", "rrf_k", "depth")
                if getattr(self, k) is not None}

    def fusion_config(self) -> FusionConfig:
        """The defaults with the settings given."""
        return FusionConfig(**{("method" if k == "fusion" else k): v for k, v in self.fusion_given().items()})


@dataclass(kw_only=True)
class BackendOptions(Checked):
    """Where the vectors are: the index folder (FAISS) or a vector database."""

    backend: str = option("faiss", "where the vectors are searched: the index folder's FAISS file, or a Qdrant "
                                   "collection", choices=("faiss", "qdrant"))
    uri: str | None = option(None, "Qdrant: a server URL (http://host:6333; API key from $QDRANT_API_KEY) or a local "
                                   "directory (embedded mode)")
    collection: str = option("llara", "Qdrant collection")


@dataclass(kw_only=True)
class IndexLocation(BackendOptions):
    """The index searched."""

    index: str | None = option(None, "index directory (FAISS backend)")
    no_index = "give --index DIR (or --backend qdrant --uri URI)"  # the error without one (not a flag)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend != "faiss":
            if not self.uri:
                raise ValueError(f"--backend {self.backend} needs --uri (a server URL or a local directory)")
        elif self.index:
            check_index_dir(self.index)
        elif self.needs_index:
            raise ValueError(self.no_index)

    @property
    def needs_index(self) -> bool:
        return True

    @property
    def location(self) -> str | None:
        return self.index if self.backend == "faiss" else self.uri
