"""The encoder: a stock Hugging Face decoder + a prompt template -> embeddings (normalised as the
template says).

Implements the BEIR/MTEB protocol (``encode_queries``, ``encode_corpus``). Texts are sorted by
token length and batched so that padding stays small; tokenising, padding, the forward pass and
pooling are :mod:`llara.modeling.embed`'s, the same path training takes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import passage_text, save_npy
from ..prompts import EncodedSide, PromptSide, Template, encode_side, get_template
from .embed import Packed, base_model, hidden_states, normalize, pack, pad_token_id, pool, tokenize
from .loading import ensure_slot_tokens, load_model, write_llara_config
from .runtime import load_runtime

log = logging.getLogger(__name__)

DEFAULT_MAX_QUERY_LENGTH = 64
DEFAULT_MAX_PASSAGE_LENGTH = 256


@dataclass
class EncodeStats:
    """What the last ``encode`` call did: real tokens, padded tokens, seconds in total and in the model."""

    texts: int = 0
    truncated: int = 0  # texts cut to fit max_length (the prompt is never cut)
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Encoder:
    """Encode queries and passages with a decoder-only LLM and a prompt template.

    Examples:
        ``model_dir`` is any model llara loads: ``"default"`` (the embedded SmolLM2-135M-Instruct), a
        checkpoint directory, a hub id or a .gguf file (the doctest loads a tiny random checkpoint):

        >>> from llara import Encoder
        >>> enc = Encoder.from_pretrained(model_dir, template="llara", show_progress=False)
        >>> q = enc.encode_queries(["how do fish breathe?"])          # query prompt, slots <s9>..<s16>
        >>> d = enc.encode_corpus([{"title": "Gills", "text": "Fish take oxygen from water."}])  # passage prompt
        >>> q.shape == (1, enc.model.config.hidden_size), q.dtype.name   # fp32, one row per text
        (True, 'float32')
        >>> scores = q @ d.T                                          # L2-normalised: cosine similarity
        >>> bool(abs(scores[0, 0]) <= 1.0001)
        True
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: "str | Template | dict | None" = None,
        *,
        max_query_length: int = DEFAULT_MAX_QUERY_LENGTH,
        max_passage_length: int = DEFAULT_MAX_PASSAGE_LENGTH,
        batch_size: int = 32,
        show_progress: bool = True,
        pad_to_multiple_of: int | None = None,
        model_id: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        fingerprint: str | None = None,
        runtime: str = "torch",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = {"query": int(max_query_length), "passage": int(max_passage_length)}
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self.device = next(model.parameters()).device
        # Multiples of 8 help tensor cores; on a CPU they only add padding.
        self.pad_to_multiple_of = pad_to_multiple_of or (8 if self.device.type == "cuda" else 1)
        self.model_id = model_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.fingerprint = fingerprint  # identifies the weights; without it nothing is cached
        self.last_stats = EncodeStats()
        self._encoded: dict[tuple, EncodedSide] = {}
        self._slots_checked: set[tuple] = set()
        self._ensure_slots(self.template)
        self.runtime = runtime
        self._forward = load_runtime(runtime, base_model(model), fingerprint)  # None: torch

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        template: "str | Template | dict | None" = None,
        *,
        device: str | None = None,
        dtype: "torch.dtype | str | None" = None,
        attn_implementation: str = "sdpa",
        runtime: str = "torch",
        **kwargs,
    ) -> "Encoder":
        """Load from ``default``, a .gguf file, a llara checkpoint, or an HF directory / hub id.

        The template is, in order: the one given, the checkpoint's own, the authors' form.
        ``runtime="onnx-int8"`` runs the forward pass int8 in ONNX Runtime on the CPU (exported once
        from fp32 weights and cached, see :mod:`llara.modeling.runtime`); pooling is unchanged.
        """
        if runtime != "torch":
            if dtype not in (None, "auto", "float32", torch.float32):
                raise ValueError(f"runtime {runtime} quantises fp32 weights; drop dtype={dtype!r}")
            dtype, device = torch.float32, device or "cpu"
        m, tok, resolved = load_model(model, device=device, dtype=dtype, attn_implementation=attn_implementation)
        cfg = resolved.llara_config or {}
        for key in ("max_query_length", "max_passage_length"):
            if key in cfg and key not in kwargs:
                kwargs[key] = cfg[key]
        kwargs.setdefault("model_id", resolved.model_id)
        kwargs.setdefault("fingerprint", resolved.fingerprint())
        return cls(m, tok, template if template is not None else resolved.template, runtime=runtime, **kwargs)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Weights + tokenizer + llara.json (template and max lengths), loadable by from_pretrained."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        write_llara_config(
            out,
            self.template,
            {"max_query_length": self.max_length["query"], "max_passage_length": self.max_length["passage"]},
        )
        return out

    # ------------------------------------------------------------------ public API
    def encode_queries(self, queries: Sequence[str], batch_size: int | None = None, **_) -> np.ndarray:
        return self.encode(list(queries), "query", batch_size=batch_size)

    def encode_corpus(self, corpus: "Sequence[dict] | dict[str, dict]", batch_size: int | None = None, **_) -> np.ndarray:
        docs = corpus.values() if isinstance(corpus, dict) else corpus
        return self.encode([passage_text(d) for d in docs], "passage", batch_size=batch_size)

    def encode(self, texts: Sequence[str], side: str, batch_size: int | None = None) -> np.ndarray:
        return self.encode_multi(texts, side, [self.template], batch_size=batch_size)[self.template.name]

    def encode_multi(
        self, texts: Sequence[str], side: str, templates: Iterable["str | Template"], batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Encode with several templates; templates whose inputs are identical (e.g. ``eos`` and
        ``mean``) share one forward pass and differ only in pooling."""
        templates = [get_template(t) for t in templates]
        self.last_stats = EncodeStats(texts=len(texts))
        for t in templates:
            self._ensure_slots(t)
        out: dict[str, np.ndarray] = {}
        groups: dict[tuple, list[Template]] = {}
        prepared = {t.casing: t.prepare(texts) for t in templates}  # the cache is keyed by the prepared texts
        for t in templates:
            key = self.cache_key(prepared[t.casing], side, t)
            cached = self._cache_load(key)
            if cached is not None:
                out[t.name] = cached
            else:
                groups.setdefault((t.casing, t.side(side).input_signature()), []).append(t)
        for (casing, _), group in groups.items():
            arrays = self._encode_group(prepared[casing], side, group, batch_size)
            for t, arr in zip(group, arrays):
                self._cache_save(self.cache_key(prepared[casing], side, t), arr)
                out[t.name] = arr
        return out

    def encoded_side(self, side: "str | PromptSide") -> EncodedSide:
        """A prompt side (``"query"`` / ``"passage"`` of this encoder's template, or any PromptSide)
        tokenized for this tokenizer; cached."""
        prompt = self.template.side(side) if isinstance(side, str) else side
        key = (prompt, len(self.tokenizer))
        if key not in self._encoded:
            self._encoded[key] = encode_side(self.tokenizer, prompt)
        return self._encoded[key]

    def batches(self, texts: Sequence[str], side: str, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, Packed]]:
        """The batches ``encode(texts, side)`` runs, in its order (longest first): (rows of ``texts``,
        right-padded batch) pairs; with ``forward`` they time the forward pass alone."""
        return self._batches(self.template.prepare(texts), side, [self.encoded_side(side)], batch_size)[1]

    @torch.inference_mode()
    def forward(self, batch: Packed) -> torch.Tensor:
        """Final hidden states (B, L, H) of a batch: the stock model, or the runtime it was loaded with."""
        if self._forward is not None:
            return self._forward(batch.input_ids, batch.attention_mask)
        return hidden_states(self.model, batch.input_ids, batch.attention_mask)

    # ------------------------------------------------------------------ internals
    def _ensure_slots(self, template: Template) -> None:
        # Once per template and vocabulary size: reading the vocabulary costs ~30 ms on a 49k-token
        # tokenizer, more than encoding one short query.
        key = (tuple(template.slot_tokens), len(self.tokenizer))
        if key in self._slots_checked:
            return
        before = self.model.get_input_embeddings().weight.shape[0]
        ensure_slot_tokens(self.tokenizer, self.model, template.slot_tokens)
        self._slots_checked.add((tuple(template.slot_tokens), len(self.tokenizer)))
        if getattr(self, "_forward", None) is not None and self.model.get_input_embeddings().weight.shape[0] != before:
            self._forward = load_runtime(self.runtime, base_model(self.model), self.fingerprint)  # new vocabulary

    def _batches(self, texts: Sequence[str], side: str, sides: Sequence[EncodedSide], batch_size: int | None):
        """(stats, lazy batches) of prepared texts sorted by length; ``sides`` share their input ids."""
        built, truncated = tokenize(self.tokenizer, sides[0], texts, self.max_length[side])
        lengths = np.array([len(ids) for ids, _, _ in built])
        order = np.argsort(-lengths, kind="stable")
        bs = batch_size or self.batch_size
        pad_id = pad_token_id(self.tokenizer)
        stats = EncodeStats(texts=len(texts), truncated=truncated, tokens=int(lengths.sum()))
        batches = ((order[i : i + bs], pack([built[j] for j in order[i : i + bs]], sides, pad_id, self.pad_to_multiple_of))
                   for i in range(0, len(order), bs))
        return stats, batches

    def _encode_group(
        self, texts: Sequence[str], side: str, templates: Sequence[Template], batch_size: int | None
    ) -> list[np.ndarray]:
        t0 = time.perf_counter()
        stats, batches = self._batches(texts, side, [self.encoded_side(t.side(side)) for t in templates], batch_size)
        dim = self.model.config.hidden_size
        outs = [np.zeros((len(texts), dim), dtype=np.float32) for _ in templates]
        bar = tqdm(total=len(texts), desc="encode queries" if side == "query" else "encode passages", unit="text", disable=not self.show_progress, leave=False)
        done = 0
        for idx, batch in batches:
            stats.padded_tokens += batch.input_ids.numel()
            tm = time.perf_counter()
            with torch.inference_mode():
                pooled = pool(batch.pool, self.forward(batch))
                for p, t in enumerate(templates):
                    outs[p][idx] = normalize(pooled[p], t.normalize).cpu().numpy()
            stats.model_seconds += time.perf_counter() - tm
            done += len(idx)
            bar.update(len(idx))
            el = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{stats.tokens * done / max(len(texts), 1) / el:.0f}")
        bar.close()
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return outs

    # ------------------------------------------------------------------ embedding cache
    def cache_key(self, texts: Sequence[str], side: str, template: Template) -> str | None:
        if self.cache_dir is None or self.fingerprint is None:
            return None
        h = hashlib.sha256()
        dtype = str(next(self.model.parameters()).dtype)  # bf16 and fp32 vectors differ: never mix them
        key = [self.fingerprint, side, self.max_length[side], template.side(side).__dict__, template.normalize, dtype]
        if self.runtime != "torch":  # int8 vectors differ too (torch keys unchanged)
            key.append(self.runtime)
        h.update(json.dumps(key, sort_keys=True, default=str).encode())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()[:32]

    def _cache_load(self, key: str | None) -> np.ndarray | None:
        if key is None:
            return None
        path = self.cache_dir / f"{key}.npy"
        if path.is_file():
            log.info("embeddings from cache %s", path)
            return np.load(path)
        return None

    def _cache_save(self, key: str | None, arr: np.ndarray) -> None:
        if key is None:
            return
        save_npy(self.cache_dir / f"{key}.npy", arr)
