"""The search service's request, response and error models: the OpenAPI schema is built from these,
so it states what the service really accepts and answers (schemathesis checks it in the tests).

Requests: exactly one of ``query`` (a string) or ``queries`` (a non-empty list of strings) — a
``oneOf`` in the schema —, each text 1..``max_query_chars`` characters with at least one
non-whitespace character, ``k`` an integer in 1..``max_k``, a ``mode`` among those the index
offers, fusion settings only in hybrid mode (an ``anyOf``), no other fields, no nulls. Every error,
whichever layer raises it, has one body: ``{"error": "<message>"}``.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = ["ErrorBody", "SearchResponse", "BatchSearchResponse", "Health", "Info", "request_model",
           "error_responses", "NON_BLANK"]

# "Contains a character that is not whitespace", with ECMA-262's whitespace (what \s means in a JSON
# Schema pattern) spelled out, so that every regex engine (the server's python-re, a client's
# ECMA or Rust engine) reads it the same way; Python's \s would also count U+0085 and U+001C-1F.
NON_BLANK = r"[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="what is wrong, in one line")


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
    status: Literal["ok"]
    passages: int


class Limits(BaseModel):
    max_query_chars: int
    max_k: int
    max_queries: int
    max_body_bytes: int
    max_batch: int
    max_wait_ms: float
    max_pending: int = Field(description="queries waiting for the encoder before new requests get 503")
    body_timeout_s: float


class Info(BaseModel):
    model_id: Optional[str] = Field(description="the model's name or hub id, when it has one")
    template: str
    max_query_length: int
    passages: int
    dimension: int
    factory: str
    llara_version: str
    modes: list[Literal["dense", "bm25", "hybrid"]]
    default_mode: Literal["dense", "bm25", "hybrid"]
    fusion: Optional[dict] = Field(description="the index's hybrid settings (null without BM25)")
    bm25: Optional[dict] = Field(description="the index's BM25 settings (null without BM25)")
    limits: Limits
    batches: int = Field(description="encoder calls so far")
    queries_answered: int


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


_DESCRIPTIONS = {
    400: "malformed JSON or an invalid Content-Length",
    404: "no such path",
    405: "method not allowed on this path",
    408: "the request body did not arrive within the body timeout",
    413: "the request body is over the size limit",
    415: "the body is not declared as application/json",
    422: "the body is JSON but not a valid request (types, lengths, k, exactly one of query/queries)",
    500: "the search failed (see the server log)",
    503: "the encoder's queue is full; retry after the number of seconds in Retry-After",
}


def error_responses(*codes: int) -> dict:
    """FastAPI ``responses=`` entries documenting ``codes`` with the error body (and Retry-After on 503)."""
    out = {}
    for code in codes:
        entry = {"model": ErrorBody, "description": _DESCRIPTIONS[code]}
        if code == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds until the queue has likely drained",
                                                "schema": {"type": "integer", "minimum": 1}}}
        out[code] = entry
    return out


SEARCH_RESPONSE = Union[SearchResponse, BatchSearchResponse]
