"""Bag-of-words targets of LLaRA's adaptation: which token ids may be targets (``target_filter``,
with a stopword list from ``load_stopwords``) and the padded target tensors of a batch
(``bow_targets``). EBAE's targets are a text's own tokens, EBAR's the next passage's; the losses that
read them are in :mod:`llara.training.losses`.
"""
from __future__ import annotations

import logging
import string
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..modeling.masks import pad_right

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_STOPWORDS", "bow_targets", "load_stopwords", "target_filter"]

DEFAULT_STOPWORDS = "bm25s"


def load_stopwords(spec: str | Iterable[str] | None = DEFAULT_STOPWORDS) -> tuple[str, ...]:
    """Stopwords for the bag-of-words targets.

    'bm25s' (default): bm25s's English list (33 function words, Lucene's); 'stop-words': the
    stop-words package's English list (1,333 entries, including content words such as 'large',
    'information', 'computer': too aggressive for targets); 'none' or None: no stopwords; a path to
    a file with one word per line; or an iterable of words."""
    if spec is None or spec == "none":
        return ()
    if isinstance(spec, str):
        if spec == "bm25s":
            from bm25s.stopwords import STOPWORDS_EN

            return tuple(STOPWORDS_EN)
        if spec == "stop-words":
            from stop_words import get_stop_words

            return tuple(get_stop_words("en"))
        path = Path(spec)
        if path.is_file():
            return tuple(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())
        raise ValueError(f"unknown stopword list {spec!r}: use 'bm25s', 'stop-words', 'none' or a file path")
    return tuple(spec)


def bow_targets(
    target_ids: Sequence[Sequence[int] | Tensor],
    vocab_size: int,
    keep: Tensor | None = None,
    *,
    unique: bool = True,
    pad_id: int = 0,
    min_width: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Turn per-row lists of target token ids into a padded id tensor and its mask.

    target_ids: B rows of token ids (lists or 1D tensors), e.g. the tokens of the text (EBAE) or of
    the next passage (EBAR). keep: optional (V',) bool mask from `target_filter`; ids with
    keep[id] False are dropped. unique: remove repeated ids in a row (first occurrence kept, the
    authors' form); False keeps multiplicity (the paper's form).
    Returns targets (B, T) long (padding = pad_id, a valid index) and mask (B, T) bool, with
    T = max(min_width, longest row after filtering). Rows may end up empty (mask all False).
    """
    rows: list[list[int]] = []
    keep_list = keep.tolist() if keep is not None else None
    for row in target_ids:
        ids = row.tolist() if isinstance(row, Tensor) else [int(i) for i in row]
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"target id {i} outside the vocabulary [0, {vocab_size})")
        if keep_list is not None:
            ids = [i for i in ids if i < len(keep_list) and keep_list[i]]
        if unique:
            ids = list(dict.fromkeys(ids))
        rows.append(ids)
    targets, mask = pad_right(rows, pad_id, min_length=min_width)
    return targets.to(device), mask.bool().to(device)


# --------------------------------------------------------------------------- target filtering

# word-start markers of byte-level BPE (GPT-2, LLaMA-3, Qwen) and SentencePiece (LLaMA-2, Mistral);
# the bare form is found by encoding, so a SentencePiece mid-word piece such as 'the' is not dropped
_WORD_MARKERS = ("Ġ", "▁")


def _is_punctuation(text: str) -> bool:
    """Non-empty after stripping, and every character is ASCII punctuation or Unicode P*."""
    text = text.strip()
    return bool(text) and all(
        ch in string.punctuation or unicodedata.category(ch).startswith("P") for ch in text
    )


def target_filter(
    tokenizer: Any,
    vocab_size: int | None = None,
    *,
    stopwords: Iterable[str] | None = None,
    language: str = "en",
    drop_stopwords: bool = True,
    drop_punctuation: bool = True,
    drop_whitespace: bool = True,
    drop_special: bool = True,
    bare_min_len: int = 4,
) -> Tensor:
    """Which token ids may be bag-of-words targets: a (V,) bool tensor, usable as keep[target_ids].

    Dropped:
    - stopwords (default: `stop_words.get_stop_words(language)`; entries without a letter, such as
      '10' or '39', are ignored): each word and its capitalised form, with and without a leading
      space, as the tokenizer encodes them when that gives one token (word-start markers 'Ġ'/'▁'
      are also looked up in the vocabulary directly). Where the tokenizer marks word starts, a
      lowercase stopword's unmarked token is a sub-word piece too, so for words shorter than
      bare_min_len ('ed', 'er', 'the' in 'a|the|ist') it is kept (capitalised ones are dropped);
    - tokens that decode to pure punctuation (and, with drop_whitespace, to whitespace only);
    - every special token (BOS/EOS/PAD/UNK, added special tokens such as the slot tokens);
    - ids in [len(tokenizer), vocab_size), the padding rows of a resized embedding matrix.
    vocab_size: the model's vocabulary size (defaults to len(tokenizer)).
    """
    n_tok = len(tokenizer)
    size = max(vocab_size or 0, n_tok)
    keep = torch.zeros(size, dtype=torch.bool)
    keep[:n_tok] = True
    texts = tokenizer.batch_decode([[i] for i in range(n_tok)], skip_special_tokens=False)
    blank = {i for i, t in enumerate(texts) if not t.strip()}

    special: set[int] = set()
    if drop_special:
        special.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        for i, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                special.add(int(i))
        special = {i for i in special if 0 <= i < n_tok}
        keep[list(special)] = False

    punct: set[int] = set()
    if drop_punctuation:
        punct = {i for i, t in enumerate(texts) if _is_punctuation(t)}
    if drop_whitespace:
        punct |= blank
    if punct:
        keep[list(punct)] = False

    stop_ids: set[int] = set()
    if drop_stopwords:
        if stopwords is None:
            from stop_words import get_stop_words

            stopwords = get_stop_words(language)
        words = {w.strip() for w in stopwords if any(ch.isalpha() for ch in w)}
        variants = sorted({v for w in words for v in (w, w[:1].upper() + w[1:])})
        vocab = tokenizer.get_vocab()
        for v in variants:
            for marker in _WORD_MARKERS:
                i = vocab.get(marker + v)
                if i is not None and 0 <= i < n_tok:
                    stop_ids.add(i)
        spaced = [" " + v for v in variants]
        encoded = tokenizer(variants + spaced, add_special_tokens=False)["input_ids"]

        def single(s: str, ids: list[int]) -> int | None:
            """The one token s encodes to, if it decodes back to s (not <unk>, not a piece)."""
            if len(ids) != 1:
                # SentencePiece may give [lone marker, marked word]; byte-level BPE gives
                # ['Ġ', 'ed'] for a word without a marked token, and that 'ed' is a sub-word piece
                ids = [i for i in ids if i not in blank]
                if len(ids) != 1 or not tokenizer.convert_ids_to_tokens(ids[0]).startswith(_WORD_MARKERS):
                    return None
            if texts[ids[0]].strip().casefold() == s.strip().casefold():
                return ids[0]
            return None

        for v, bare_ids, spaced_ids in zip(variants, encoded[: len(variants)], encoded[len(variants) :]):
            spaced_id = single(" " + v, spaced_ids)
            if spaced_id is not None:
                stop_ids.add(spaced_id)
            bare_id = single(v, bare_ids)
            if bare_id is None:
                continue
            # With word-start markers (byte-level BPE) the bare form of a word is also a sub-word
            # piece ('walk|ed', 'quick|ly'); a short lowercase one is mostly that, so keep it.
            if bare_id != spaced_id and v[:1].islower() and len(v) < bare_min_len:
                continue
            stop_ids.add(bare_id)
        if stop_ids:
            keep[list(stop_ids)] = False

    logger.info(
        "target filter: %d of %d ids kept (%d stopword, %d punctuation/blank, %d special ids dropped)",
        int(keep.sum()), size, len(stop_ids), len(punct), len(special),
    )
    return keep
