"""The final model directory: loadable by ``transformers.AutoModel.from_pretrained``, by
``llara.modeling.loading.load_model`` (it carries the tokenizer and ``llara.json``) and, for full
weights, by ``sentence_transformers.SentenceTransformer`` (see ``llara.modeling.st_config``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..modeling.st_config import write_st_files
from ..modeling.encoder import DEFAULT_MAX_PASSAGE_LENGTH, DEFAULT_MAX_QUERY_LENGTH
from ..io import atomic_dir
from ..modeling.loading import write_llara_config
from .lora import is_peft_model, merged_state_dict

logger = logging.getLogger(__name__)

__all__ = ["export_model"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_model(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    template=None,
    merge_lora: bool = True,
    extra: dict[str, Any] | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write a model directory atomically (temp dir + rename; an existing one is replaced).

    model: a Hugging Face model or a peft model. With ``merge_lora`` the adapter (and trainable
    token rows) are folded into full weights, without modifying ``model``; otherwise the adapter is
    written as peft saves it (loading it needs the base model named in ``adapter_config.json``).
    template: a ``llara.prompts.Template`` (or name) recorded in ``llara.json`` with ``extra``.
    state_dict: full weights gathered by the caller (DeepSpeed ZeRO-3 / FSDP), for plain models.
    """
    from ..prompts import get_template

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        if is_peft_model(model) and merge_lora:
            base = model.get_base_model()
            base.save_pretrained(tmp, state_dict=merged_state_dict(model), safe_serialization=True)
            kind = "merged LoRA"
        elif is_peft_model(model):
            # The slot rows are in the adapter (trainable tokens or modules_to_save): no copy of the
            # whole resized embedding, which peft would otherwise add (as large as the vocabulary).
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            kind = "LoRA adapter"
        else:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
            kind = "full weights"
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"export": kind, **(extra or {})}
        template = get_template(template)
        write_llara_config(tmp, template, info)
        if kind != "LoRA adapter" and tokenizer is not None:
            write_st_files(tmp, template, eos_token=tokenizer.eos_token, hidden_size=model.config.hidden_size,
                           max_query_length=info.get("max_query_length", DEFAULT_MAX_QUERY_LENGTH),
                           max_passage_length=info.get("max_passage_length", DEFAULT_MAX_PASSAGE_LENGTH))
        for f in tmp.rglob("*"):  # some writers (peft's safetensors) leave files private
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
    logger.info("exported %s to %s", kind, out)
    return out
