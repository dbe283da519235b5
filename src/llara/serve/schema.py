"""The search service's request, response and error models: the OpenAPI schema is built from these,
so it states what the service really accepts and answers (schemathesis checks it in the tests).

Requests: exactly one of ``query`` (a string) or ``queries`` (a non-empty list of strings) — a
``oneOf`` in the schema —, each text 1..``max_query_chars`` characters with at least one
non-whitespace character, ``k`` an integer in 1..``max_k``, a ``mode`` among those the index
offers, fusion settings only in hybrid mode (an ``anyOf``), no other fields, no nulls. Every error,
whichever layer raises it, has one body: ``{"error": "<message>"}``.

The OpenAI-compatible routes under ``/v1`` speak OpenAI's dialect instead: ``POST /v1/embeddings``
takes ``input`` (a string or a list of strings), ``model``, ``encoding_format`` (``float`` or
``base64``: little-endian float32), ``dimensions`` (only the model's own), ``user`` (ignored) and
llara's ``input_type`` (``query`` / ``passage``, default :data:`DEFAULT_INPUT_TYPE`); their errors
are ``{"error": {"message", "type", "param", "code"}}`` (:func:`error_json` picks the shape by path).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator, model_validator

__all__ = ["ErrorBody", "OpenAIErrorBody", "SearchResponse", "BatchSearchResponse", "Health", "Ready", "Info",
           "request_model", "embeddings_request_model", "EmbeddingsResponse", "ModelList", "ModelCard",
           "error_responses", "error_json", "NON_BLANK", "DEFAULT_INPUT_TYPE", "input_type_doc"]

# "Contains a character that is not whitespace", with ECMA-262's whitespace (what \s means in a JSON
# Schema pattern) spelled out, so that every regex engine (the server's python-re, a client's
# ECMA or Rust engine) reads it the same way; Python's \s would also count U+0085 and U+001C-1F.
NON_BLANK = r"[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="what is wrong, in one line")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what is wrong, in one line")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, "
                                  "service_unavailable_error or server_error")
    param: Optional[str] = Field(description="the request field at fault, when there is one")
    code: Optional[str] = Field(description="model_not_found, invalid_api_key, rate_limit_exceeded, ... or null")


class OpenAIErrorBody(BaseModel):
    """The body of every error under ``/v1`` (OpenAI's shape, which OpenAI client libraries parse)."""

    error: OpenAIErrorDetail


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error",
                 503: "service_unavailable_error"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_json(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The error body for a request to ``path``: OpenAI's shape under ``/v1``, else ``{"error": message}``."""
    if not is_openai_path(path):
        return {"error": message}
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or _OPENAI_CODES.get(status)}}


class Hit(BaseModel):
    doc_id: str
    score: float = Field(description="inner product of the L2-normalised embeddings (cosine)")
    title: str


class QueryHits(BaseModel):
    query: str
    hits: list[Hit] = Field(description="best first; fewer than k when the index is smaller")


class SearchResponse(QueryHits):
    """The answer to ``{"query": ...}``."""

    k: int
    mode: Literal["dense", "bm25", "hybrid"]
    took_ms: float


class BatchSearchResponse(BaseModel):
    """The answer to ``{"queries": [...]}``: one entry per query, in order."""

    results: list[QueryHits]
    k: int
    mode: Literal["dense", "bm25", "hybrid"]
    took_ms: float


class Health(BaseModel):
    status: Literal["ok"] = Field(description="the process is alive (it may still be loading; see /ready)")
    passages: Optional[int] = Field(description="passages in the index; null while loading or without an index")


class Ready(BaseModel):
    status: Literal["ready"]


class Limits(BaseModel):
    max_query_chars: int
    max_k: int
    max_queries: int
    max_body_bytes: int
    max_batch: int
    max_wait_ms: float
    max_pending: int = Field(description="queries and inputs waiting for the encoder before new requests get 429")
    max_inputs: int = Field(description="inputs per POST /v1/embeddings request")
    body_timeout_s: float


class Info(BaseModel):
    model_id: Optional[str] = Field(description="the model's name or hub id, when it has one")
    model_name: str = Field(description="the name POST /v1/embeddings expects in 'model' (GET /v1/models)")
    template: str
    max_query_length: int
    max_passage_length: int
    passages: Optional[int] = Field(description="null when serving embeddings only (no index)")
    dimension: int
    factory: Optional[str] = Field(description="the FAISS index factory (null without an index)")
    llara_version: str
    modes: list[Literal["dense", "bm25", "hybrid"]] = Field(description="search modes (empty without an index)")
    default_mode: Optional[Literal["dense", "bm25", "hybrid"]]
    fusion: Optional[dict] = Field(description="the index's hybrid settings (null without BM25)")
    bm25: Optional[dict] = Field(description="the index's BM25 settings (null without BM25)")
    limits: Limits
    batches: int = Field(description="micro-batches run so far (one worker job each)")
    queries_answered: int = Field(description="search queries answered so far")
    inputs_embedded: int = Field(description="POST /v1/embeddings inputs answered so far")


FUSION_FIELDS = ("fusion", "alpha", "rrf_k")


def _fusion_rule(modes, default_mode: str) -> list[dict]:
    """JSON Schema (anyOf) for "fusion settings only in hybrid mode": the mode is 'hybrid', or it is
    absent and the index's default is hybrid, or no fusion field is given."""
    rule = [{"not": {"anyOf": [{"required": [f]} for f in FUSION_FIELDS]}}]
    if "hybrid" in modes:
        rule.insert(0, {"required": ["mode"], "properties": {"mode": {"const": "hybrid"}}})
        if default_mode == "hybrid":
            rule.insert(0, {"not": {"required": ["mode"]}})
    return rule


def request_model(max_query_chars: int, max_k: int, max_queries: int, default_k: int,
                  modes: tuple[str, ...] = ("dense",), default_mode: str = "dense"):
    """The ``POST /search`` body model for these limits and the modes the index offers."""
    Text = Annotated[str, StringConstraints(min_length=1, max_length=max_query_chars, pattern=NON_BLANK)]
    Mode = Literal[tuple(modes)]  # only what this index can do: bm25/hybrid need its BM25 index

    def no_default(schema: dict) -> None:  # absent, not null: the schema says "string" / "array"
        schema.pop("default", None)

    class SearchRequest(BaseModel):
        """Exactly one of ``query`` or ``queries``; fusion settings only in hybrid mode."""

        model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re",
                                  json_schema_extra={"oneOf": [{"required": ["query"]}, {"required": ["queries"]}],
                                                     "anyOf": _fusion_rule(modes, default_mode)})

        # Not Optional: null is not accepted, the default None only stands for "absent".
        query: Text = Field(default=None, description="one query text",  # type: ignore[valid-type]
                            json_schema_extra=no_default)
        queries: list[Text] = Field(  # type: ignore[valid-type]
            default=None, min_length=1, max_length=max_queries, description="several query texts, answered in order",
            json_schema_extra=no_default)
        k: int = Field(default=default_k, ge=1, le=max_k, description="hits per query")
        mode: Mode = Field(default=None, json_schema_extra=no_default,  # type: ignore[valid-type]
                           description=f"retrieval mode (default: {default_mode})")
        fusion: Literal["linear", "rrf"] = Field(default=None, json_schema_extra=no_default,
                                                 description="hybrid only (default: the index's)")
        alpha: float = Field(default=None, ge=0, le=1, json_schema_extra=no_default,
                             description="hybrid only: weight of the dense run in linear fusion")
        rrf_k: float = Field(default=None, ge=0, allow_inf_nan=False, json_schema_extra=no_default,
                             description="hybrid only: the k of reciprocal rank fusion")

        @model_validator(mode="before")
        @classmethod
        def _no_nulls(cls, data):
            if isinstance(data, dict):
                for key in ("query", "queries", "mode", *FUSION_FIELDS):
                    if key in data and data[key] is None:
                        raise ValueError(f"'{key}' may not be null; leave it out instead")
                mode = data.get("mode")
                if isinstance(mode, str) and mode in ("bm25", "hybrid") and mode not in modes:
                    raise ValueError(f"mode {mode!r} needs a BM25 index, and this index has none; "
                                     f"use mode {' or '.join(map(repr, modes))}")
                k = data.get("k")
                if isinstance(k, float) and k.is_integer():  # 3.0 is an integer in JSON Schema
                    data = {**data, "k": int(k)}
            return data

        @model_validator(mode="after")
        def _one_of(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
            return self

    return SearchRequest


_JSON_TYPES = {dict: "an object", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}
DEFAULT_INPUT_TYPE = "passage"
INPUT_TYPE_WHY = (
    "llara's default is 'passage': a client that does not know this field (an OpenAI client library, a vector "
    "database's ingestion pipeline) most often sends documents to be indexed, in bulk, and vectors stored "
    "under the wrong side would have to be recomputed for the whole corpus, while a query sent without the "
    "field costs one request to resend with input_type 'query'.")


def input_type_doc(default: str = DEFAULT_INPUT_TYPE) -> str:
    """The description of ``input_type`` in the schema, with the default this server uses."""
    return ("Which side of the model's template embeds the inputs: 'query' (a search query) or 'passage' (a "
            "document to be searched). LLaRA embeds the two sides with different prompts, so queries must be "
            f"sent with input_type 'query' to match passages. The default here is '{default}'. " + INPUT_TYPE_WHY)


def embeddings_request_model(max_inputs: int, dimension: int, model_name: str,
                             default_input_type: str = DEFAULT_INPUT_TYPE):
    """The ``POST /v1/embeddings`` body model: OpenAI's fields (text input only) plus ``input_type``."""
    Text = Annotated[str, StringConstraints(min_length=1, pattern=NON_BLANK)]
    text_schema = {"type": "string", "minLength": 1, "pattern": NON_BLANK}
    # A single string is validated as a list of one (the answer is the same: one embedding), and the
    # schema says what is accepted: a string or a list of strings.
    input_schema = {"anyOf": [text_schema, {"type": "array", "items": text_schema, "minItems": 1,
                                            "maxItems": max_inputs}],
                    "title": "Input",
                    "description": f"one text, or a list of 1..{max_inputs} texts (token-id arrays are not accepted)"}

    def no_default(schema: dict) -> None:
        schema.pop("default", None)

    class EmbeddingsRequest(BaseModel):
        """OpenAI's embeddings request. ``input`` is text: llara wraps each text in its template's prompt,
        so arrays of token ids are refused (422)."""

        model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

        input: Annotated[list[Text], WithJsonSchema(input_schema)] = Field(  # type: ignore[valid-type]
            min_length=1, max_length=max_inputs)
        model: str = Field(description="the served model's name (GET /v1/models); another name gets 404, as "
                                       "from OpenAI", json_schema_extra={"enum": [model_name]})
        encoding_format: Literal["float", "base64"] = Field(
            default="float", description="'float': lists of numbers; 'base64': the little-endian float32 bytes "
                                         "of each vector, base64-encoded (what OpenAI's Python client asks for)")
        dimensions: int = Field(default=None, json_schema_extra=lambda schema: (no_default(schema),
                                                                        schema.update(const=dimension)),
                                description=f"must equal the model's dimension ({dimension}); llara does not "
                                            "shorten vectors")
        user: str = Field(default=None, json_schema_extra=no_default, description="accepted and ignored")
        input_type: Literal["query", "passage"] = Field(default=default_input_type,
                                                        description=input_type_doc(default_input_type))

        @field_validator("input", mode="before")
        @classmethod
        def _text_only(cls, x):
            if isinstance(x, str):
                if not re.search(NON_BLANK, x):
                    raise ValueError("the text is empty (only whitespace)" if x else "the text is empty")
                return [x]
            if isinstance(x, list) and x and all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in x):
                raise ValueError("token-id arrays are not supported; send text (llara wraps each text in its "
                                 "template's prompt, which needs the text). LangChain: OpenAIEmbeddings("
                                 "check_embedding_ctx_length=False)")
            if not isinstance(x, list):
                raise ValueError(f"must be a string or a list of strings, not {_JSON_TYPES.get(type(x), 'that')}")
            return x

        @field_validator("dimensions", mode="before")
        @classmethod
        def _dimension(cls, d):
            if isinstance(d, float) and d.is_integer():  # 768.0 is an integer in JSON Schema
                d = int(d)
            if isinstance(d, int) and not isinstance(d, bool) and d != dimension:
                raise ValueError(f"this model gives {dimension}-d vectors and llara does not shorten them; "
                                 f"leave 'dimensions' out or send {dimension}")
            return d

    return EmbeddingsRequest


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int = Field(description="the input's position in the request")
    embedding: Union[list[float], str] = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model ran for these inputs: each text (cut to the side's "
                                           "maximum length) in its template's prompt")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when the model was loaded (Unix seconds)")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


_DESCRIPTIONS = {
    400: "malformed JSON or an invalid Content-Length",
    401: "no or a wrong API key (send Authorization: Bearer <key>)",
    404: "no such path, or (under /v1) no such model",
    405: "method not allowed on this path",
    408: "the request body did not arrive within the body timeout",
    413: "the request body is over the size limit",
    415: "the body is not declared as application/json",
    422: "the body is JSON but not a valid request (types, lengths, k, exactly one of query/queries)",
    429: "the encoder's queue is full; retry after the number of seconds in Retry-After",
    500: "the search failed (see the server log)",
    503: "not ready: the model or index is still loading (see GET /ready); retry after Retry-After seconds",
}
_RETRY_AFTER = {429: "seconds until the queue has likely drained", 503: "seconds until the next look"}


def error_responses(*codes: int, openai: bool = False) -> dict:
    """FastAPI ``responses=`` entries documenting ``codes`` with the error body (OpenAI's with ``openai``),
    Retry-After on 429 and 503, WWW-Authenticate on 401."""
    out = {}
    for code in codes:
        entry = {"model": OpenAIErrorBody if openai else ErrorBody, "description": _DESCRIPTIONS[code]}
        if code in _RETRY_AFTER:
            entry["headers"] = {"Retry-After": {"description": _RETRY_AFTER[code],
                                                "schema": {"type": "integer", "minimum": 1}}}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
        out[code] = entry
    return out


SEARCH_RESPONSE = Union[SearchResponse, BatchSearchResponse]
