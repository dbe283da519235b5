"""The sentence-transformers files of a llara model directory (written without importing it).

A llara export keeps its weights, tokenizer and ``llara.json`` in the root; these files add the
module pipeline sentence-transformers builds from ``modules.json``:

0. ``llara.interop.st.LlaraTransformer`` (root, ``sentence_bert_config.json``): the stock
   sentence-transformers ``Transformer`` with llara's token ids (prefix with special tokens, text
   without them and alone truncated, suffix without the tokenizer's added specials, EOS) and, per
   text, the positions the template pools;
1. ``llara.interop.st.LlaraPooling`` (``1_LlaraPooling/``): the mean of the states at those
   positions (slots, last token or text tokens);
2. the stock ``Normalize`` when the template normalises.

``config_sentence_transformers.json`` names the prompts ``query`` and ``document``. Each prompt is
the side's template written out, ``prefix{text}suffix`` (and the EOS token when appended), so that
``encode(..., prompt_name=...)``, ``encode_query`` and ``encode_document`` all find the side.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..prompts import PromptSide, Template

TEXT_MARK = "{text}"
ST_MODULE = "llara.interop.st.LlaraTransformer"
ST_POOLING = "llara.interop.st.LlaraPooling"
ST_NORMALIZE = "sentence_transformers.base.modules.Normalize"
POOLING_DIR = "1_LlaraPooling"
NORMALIZE_DIR = "2_Normalize"
ST_VERSIONS = ">=6.0,<7"  # the range tested; keep in step with pyproject's [st] extra


def side_prompt(side: PromptSide, eos_token: str | None) -> str:
    """The prompt string that stands for one template side."""
    eos = (eos_token or "") if side.append_eos else ""
    return side.prefix + TEXT_MARK + side.suffix + eos


def template_prompts(template: Template, eos_token: str | None) -> dict[str, str]:
    return {"query": side_prompt(template.query, eos_token), "document": side_prompt(template.passage, eos_token)}


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_st_files(
    out_dir: str | Path,
    template: Template,
    *,
    eos_token: str | None,
    hidden_size: int,
    max_query_length: int,
    max_passage_length: int,
) -> None:
    """Write modules.json and the module configs into ``out_dir`` (which holds weights and tokenizer).

    The caller writes into a temporary directory that it moves into place (see export_model).
    """
    out = Path(out_dir)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_MODULE},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": ST_POOLING},
    ]
    if template.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": ST_NORMALIZE})
        _dump(out / NORMALIZE_DIR / "config.json", {})
    _dump(out / "modules.json", modules)
    _dump(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "llara_template": template.to_dict(),
        "max_query_length": int(max_query_length),
        "max_passage_length": int(max_passage_length),
    })
    _dump(out / POOLING_DIR / "config.json", {"embedding_dimension": int(hidden_size)})
    _dump(out / "config_sentence_transformers.json", {
        "__version__": {"llara": __version__},
        # checked by sentence-transformers before any module loads: a clear ImportError without llara
        "requirements": {
            "llara": {"specifier": f">={__version__}", "reason": "the modules come from pip install 'llara[st]'"},
            "sentence-transformers": ST_VERSIONS,
        },
        "model_type": "SentenceTransformer",
        "prompts": template_prompts(template, eos_token),
        "default_prompt_name": "document",
        "similarity_fn_name": "cosine" if template.normalize else "dot",
    })
