"""``llara export SRC OUT``: any model llara loads, written as a llara + sentence-transformers directory.

SRC is anything ``--model`` takes: a llara checkpoint (its template and lengths are kept), a PEFT
adapter directory (merged), a Hugging Face directory such as a released LLaRA model (its tokenizer
already holds ``<s1>``..``<s16>``: they are reused, never added twice), a .gguf file or ``default``.
The weights keep the dtype they have on disk; the LM head is dropped (embeddings never use it).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..modeling.encoder import DEFAULT_MAX_PASSAGE_LENGTH, DEFAULT_MAX_QUERY_LENGTH
from ..modeling.loading import ensure_slot_tokens, load_model, resolve_model
from ..prompts import DEFAULT_TEMPLATE, get_template
from ..training.export import export_model

__all__ = ["export_checkpoint"]


def _disk_dtype(spec: str):
    from transformers import AutoConfig

    resolved = resolve_model(spec)
    config = AutoConfig.from_pretrained(resolved.adapter_base or resolved.path)
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def export_checkpoint(
    src: str,
    out: str | os.PathLike,
    *,
    template=None,
    max_query_length: int | None = None,
    max_passage_length: int | None = None,
    dtype=None,
) -> Path:
    """Load ``src`` on the CPU and export it to ``out`` (atomically; an existing ``out`` is replaced)."""
    if Path(src).exists() and Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"{out}: the export would replace its own source; choose another directory")
    dtype = dtype or _disk_dtype(src)
    model, tokenizer, resolved = load_model(src, device="cpu", dtype=dtype)
    cfg = dict(resolved.llara_config or {})
    template = get_template(template or resolved.template or DEFAULT_TEMPLATE)
    ensure_slot_tokens(tokenizer, model, template.slot_tokens)
    for key in ("llara_version", "template", "export"):
        cfg.pop(key, None)
    extra = {
        **cfg,
        "exported_from": resolved.path,
        "max_query_length": max_query_length or cfg.get("max_query_length", DEFAULT_MAX_QUERY_LENGTH),
        "max_passage_length": max_passage_length or cfg.get("max_passage_length", DEFAULT_MAX_PASSAGE_LENGTH),
    }
    return export_model(model, tokenizer, out, template=template, extra=extra)

