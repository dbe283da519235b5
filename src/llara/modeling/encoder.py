"""The encoder: a stock Hugging Face decoder + a prompt template -> embeddings (normalised as the
template says).

Implements the BEIR/MTEB protocol (``encode_queries``, ``encode_corpus``). Texts are sorted by
token length and batched so that padding stays small; tokenising, padding, the forward pass and
pooling are :mod:`llara.modeling.embed`'s, the same path training takes.

The pipeline of ``encode``: texts are sorted by characters (free), tokenised a window at a time
(``WINDOW_TEXTS``), sorted exactly by tokens inside the window and cut into batches of at most
``batch_size`` rows and ``max_batch_tokens`` padded tokens (``embed.plan_batches``). A background
thread (``prefetch`` batches ahead; the tokenizer releases the GIL) tokenises and pads batch i+1
while the model runs batch i; on CUDA the batches are pinned and copied with ``non_blocking=True``,
and the pooled vectors come back by non-blocking copies into pinned memory, read once their CUDA
event has passed: no host synchronisation per batch (these parts: :mod:`llara.modeling.encode_pipeline`).
Vectors are returned in the input order and a text's vector does not depend on its batch (the
invariance tests), so the plan changes speed only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import passage_text, save_npy
from ..prompts import EncodedSide, PromptSide, Template, encode_side, get_template
from .embed import Packed, base_model, hidden_states, normalize, pack, pad_token_id, plan_batches, pool, tokenize
from .encode_pipeline import ModelClock, PlannedBatch, Prefetch, ToHost
from .host_memory import keep_freed_memory
from .loading import ensure_slot_tokens, load_model, write_llara_config
from .runtime import load_runtime

log = logging.getLogger(__name__)

DEFAULT_MAX_QUERY_LENGTH = 64
DEFAULT_MAX_PASSAGE_LENGTH = 256
# Texts tokenised at once (then sorted exactly by tokens and batched): the first window is the wait
# before the first forward pass; a larger one pads a little less at the window edges.
WINDOW_TEXTS = 512


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
        batch_size: int | None = 32,
        max_batch_tokens: int | None = None,
        prefetch: int = 2,
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
        # Rows per batch and padded tokens per batch (either may be None, not both; see plan_batches).
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)
        if self.batch_size is None and self.max_batch_tokens is None:
            raise ValueError("give batch_size, max_batch_tokens or both")
        self.prefetch = int(prefetch)  # batches prepared ahead by a background thread; 0: none, all inline
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

    def encode(self, texts: Sequence[str], side: str, batch_size: int | None = None, *,
               max_batch_tokens: int | None = None) -> np.ndarray:
        """(len(texts), H) float32 vectors in the input order. ``batch_size`` / ``max_batch_tokens``
        override the encoder's limits for this call (rows / padded tokens per batch)."""
        return self.encode_multi(texts, side, [self.template], batch_size=batch_size,
                                 max_batch_tokens=max_batch_tokens)[self.template.name]

    def encode_multi(
        self, texts: Sequence[str], side: str, templates: Iterable["str | Template"], batch_size: int | None = None,
        *, max_batch_tokens: int | None = None,
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
            arrays = self._encode_group(prepared[casing], side, group, batch_size, max_batch_tokens)
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

    def batches(self, texts: Sequence[str], side: str, batch_size: int | None = None,
                max_batch_tokens: int | None = None) -> Iterator[tuple[np.ndarray, Packed]]:
        """The batches ``encode(texts, side)`` runs, in its order: (rows of ``texts``, right-padded
        batch) pairs, built here in this thread; with ``forward`` they time the forward pass alone."""
        sides = [self.encoded_side(side)]
        for b in self._plan(self.template.prepare(texts), side, sides, batch_size, max_batch_tokens, pin=False):
            yield b.rows, b.packed

    def set_max_batch_tokens(self, max_batch_tokens: int | None) -> "Encoder":
        """Bound the padded tokens of every forward pass (None: rows only), checked against both sides'
        maximum lengths first; a call over the budget runs as several passes, with the same vectors."""
        if max_batch_tokens is not None:
            for side in self.max_length:
                self.limits(side, max_batch_tokens=max_batch_tokens)  # ValueError naming the least budget
        self.max_batch_tokens = max_batch_tokens
        return self

    def limits(self, side: str, batch_size: int | None = None, max_batch_tokens: int | None = None
               ) -> tuple[int | None, int | None]:
        """(rows, padded tokens) per batch for ``side``: the arguments, else the encoder's. A token
        budget must hold one text of the side's max length (padded), as TEI's ``--max-batch-tokens``."""
        rows = batch_size or self.batch_size
        budget = max_batch_tokens or self.max_batch_tokens
        if budget is not None:
            m = self.pad_to_multiple_of if self.pad_to_multiple_of > 1 else 1
            need = -(-self.max_length[side] // m) * m
            if budget < need:
                raise ValueError(f"max_batch_tokens={budget} is below one {side} of max length "
                                 f"{self.max_length[side]} (padded to {need}); raise it to at least {need}")
        return rows, budget

    @torch.inference_mode()
    def forward(self, batch: Packed) -> torch.Tensor:
        """Final hidden states (B, L, H) of a batch: the stock model, or the runtime it was loaded with."""
        if self._forward is not None:
            return self._forward(batch.input_ids, batch.attention_mask)
        return hidden_states(self.model, batch.input_ids, batch.attention_mask, read=batch.read, live=batch.live)

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

    def _plan(self, texts: Sequence[str], side: str, sides: Sequence[EncodedSide], batch_size: int | None,
              max_batch_tokens: int | None, pin: bool) -> Iterator["PlannedBatch"]:
        """The batches of prepared ``texts``, lazily: sorted by characters, tokenised a window at a
        time, each window sorted by tokens and cut by ``plan_batches``; ``sides`` share input ids."""
        rows_cap, budget = self.limits(side, batch_size, max_batch_tokens)
        pad_id = pad_token_id(self.tokenizer)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for w in range(0, len(order), WINDOW_TEXTS):
            window = order[w : w + WINDOW_TEXTS]
            built, truncated = tokenize(self.tokenizer, sides[0], [texts[i] for i in window], self.max_length[side])
            lengths = [len(ids) for ids, _, _ in built]
            for k, part in enumerate(plan_batches(lengths, rows_cap, budget, self.pad_to_multiple_of)):
                packed = pack([built[j] for j in part], sides, pad_id, self.pad_to_multiple_of)
                yield PlannedBatch(window[part], packed.pin_memory() if pin else packed,
                             sum(lengths[j] for j in part), truncated if k == 0 else 0)

    def _encode_group(
        self, texts: Sequence[str], side: str, templates: Sequence[Template], batch_size: int | None,
        max_batch_tokens: int | None = None,
    ) -> list[np.ndarray]:
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults for the activations each batch frees (host_memory.py)
        sides = [self.encoded_side(t.side(side)) for t in templates]
        plan = self._plan(texts, side, sides, batch_size, max_batch_tokens, pin=cuda)
        stats = EncodeStats(texts=len(texts))
        dim = self.model.config.hidden_size
        outs = [np.zeros((len(texts), dim), dtype=np.float32) for _ in templates]
        sink, clock = ToHost(outs, cuda), ModelClock(cuda)
        bar = tqdm(total=len(texts), desc="encode queries" if side == "query" else "encode passages", unit="text",
                   disable=not self.show_progress, leave=False)
        # One batch (a service's micro-batch, a query) has nothing to overlap: no thread for it.
        rows_cap, _ = self.limits(side, batch_size, max_batch_tokens)
        ahead = (Prefetch(plan, self.prefetch) if self.prefetch > 0 and len(texts) > (rows_cap or 1)
                 else nullcontext(plan))
        # the CUDA events and copies go to the model's device, whichever device is current
        on_device = torch.cuda.device(self.device) if cuda else nullcontext()
        with on_device, ahead as batches, torch.inference_mode():
            for b in batches:
                stats.padded_tokens += b.packed.input_ids.numel()
                stats.tokens += b.tokens
                stats.truncated += b.truncated
                batch = b.packed.to(self.device, non_blocking=True) if self._forward is None else b.packed
                with clock:
                    pooled = pool(batch.pool, self.forward(batch))  # (P, B, H) float32
                    vecs = torch.stack([normalize(pooled[p], t.normalize) for p, t in enumerate(templates)])
                sink.add(b.rows, vecs)
                bar.update(len(b.rows))
                bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - t0):.0f}", refresh=False)
            sink.finish()
        bar.close()
        stats.model_seconds = clock.seconds(self.device)
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
