"""Sentence splitting, chunking of tokenized documents and (chunk, next chunk) pairs.

See ``llara.data.pretrain`` for the whole pipeline and the meaning of the chunking options.
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

CHUNKINGS = ("sentences", "tokens")
SINGLE_CHUNK = ("skip", "ebae")


# --------------------------------------------------------------------------- sentences

# Abbreviations after which a period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc cf al fig figs eq eqs no nos vol vols pp ch sec ca approx "
    "inc ltd co corp dept est gen gov col lt sgt capt rev hon jan feb mar apr jun jul aug sep sept oct "
    "nov dec".split()
)
# A run of terminators (+ closing quotes/brackets) and the whitespace after it, or a blank line.
_CANDIDATE = re.compile(r"(?P<term>[.!?]+[\"'”’)\]]*)(?P<ws>\s+)|(?P<para>\s*\n\s*\n\s*)")
_OPENERS = "\"'“‘([¿¡"


def _is_boundary(text: str, m: re.Match) -> bool:
    if m.group("para") is not None or m.group("ws").count("\n") >= 2:
        return True
    end = m.end()
    if end >= len(text):
        return False
    start = m.start()
    before = text[:start]
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    spaced = not word or before[-1:].isspace()  # " . " style (tokenized text such as Medline's)
    nxt = text[end]
    if not (nxt.isupper() or nxt.isdigit() or nxt in _OPENERS or spaced):
        return False
    if m.group("term").startswith(".") and not spaced:
        bare = word.lstrip(_OPENERS).lower()
        if bare in _ABBREVIATIONS or "." in bare or (len(bare) == 1 and bare.isalpha()):
            return False  # "Dr. Smith", "e.g. The", "U.S. Army", "J. R. R. Tolkien"
    return True


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, whitespace excluded.

    A regex splitter (documented, deterministic, no data files): a sentence ends at '.', '!' or '?'
    (plus closing quotes/brackets) followed by whitespace and an upper-case letter, a digit or an
    opening quote/bracket, or at a blank line. A period after a known abbreviation, a single letter
    (an initial) or a dotted word ('e.g.', 'U.S.') does not end a sentence. A terminator standing
    alone between spaces (' . ', as in lower-cased, tokenized corpora) ends a sentence whatever
    follows."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _CANDIDATE.finditer(text):
        if _is_boundary(text, m):
            cut = m.start("ws") if m.group("ws") is not None else m.start()
            if text[start:cut].strip():
                spans.append((start, cut))
            start = m.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    out = []
    for a, b in spans:  # trim whitespace at both ends
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        out.append((a, b))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see :func:`sentence_spans`)."""
    return [text[a:b] for a, b in sentence_spans(text)]


# --------------------------------------------------------------------------- chunking


def token_chunks(n: int, chunk_tokens: int, balanced: bool = True) -> list[tuple[int, int]]:
    """[start, end) token ranges covering n tokens, each at most chunk_tokens long. balanced: the
    ceil(n / chunk_tokens) chunks differ in length by at most one; else fixed windows and a remainder."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    if n <= 0:
        return []
    if not balanced:
        return [(a, min(a + chunk_tokens, n)) for a in range(0, n, chunk_tokens)]
    k = math.ceil(n / chunk_tokens)
    base, extra = divmod(n, k)
    out, a = [], 0
    for i in range(k):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def sentence_chunks(n: int, starts: Sequence[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """Greedy packing of whole sentences into [start, end) token ranges of at most chunk_tokens.

    starts: token indices where a sentence begins (0 implied). A sentence longer than chunk_tokens
    is cut into chunk_tokens pieces; its last piece starts a chunk that may take the next sentences."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    if n <= 0:
        return []
    bounds = [0, *sorted({s for s in starts if 0 < s < n}), n]
    chunks: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for a, b in zip(bounds, bounds[1:]):
        if cur is not None and b - cur[0] <= chunk_tokens:
            cur = (cur[0], b)
            continue
        if cur is not None:
            chunks.append(cur)
        while b - a > chunk_tokens:
            chunks.append((a, a + chunk_tokens))
            a += chunk_tokens
        cur = (a, b)
    if cur is not None:
        chunks.append(cur)
    return chunks


@dataclass(frozen=True, slots=True)
class PretrainExample:
    """One adaptation example: a chunk (model input and EBAE target) and the next chunk of the same
    document (EBAR target; empty for an EBAE-only example). doc: index of the document in the file
    stream; chunk: index of text_ids among the document's chunks (both for provenance only)."""

    text_ids: list[int]
    next_ids: list[int]
    doc: int = -1
    chunk: int = 0


def chunk_pairs(
    chunks: Sequence[Sequence[int]],
    *,
    min_chunk_tokens: int = 8,
    single_chunk: str = "skip",
    doc: int = -1,
) -> Iterator[PretrainExample]:
    """Examples of one document: chunk i paired with chunk i + 1 (see the module docstring)."""
    if single_chunk not in SINGLE_CHUNK:
        raise ValueError(f"single_chunk must be one of {SINGLE_CHUNK}, got {single_chunk!r}")
    if len(chunks) == 1:
        if single_chunk == "ebae" and len(chunks[0]) >= min_chunk_tokens:
            yield PretrainExample(list(chunks[0]), [], doc, 0)
        return
    for i in range(len(chunks) - 1):
        if len(chunks[i]) >= min_chunk_tokens and len(chunks[i + 1]) >= min_chunk_tokens:
            yield PretrainExample(list(chunks[i]), list(chunks[i + 1]), doc, i)


class Chunker:
    """Tokenize documents (lists of units) and cut them into chunks of token ids.

    The units are joined with ``joiner`` and tokenized once without special tokens; sentence mode
    needs a fast tokenizer (character offsets). Unit boundaries are always sentence boundaries."""

    def __init__(self, tokenizer, chunk_tokens: int = 120, chunking: str = "sentences", *,
                 balanced: bool = True, joiner: str = " "):
        if chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        if chunking == "sentences" and not getattr(tokenizer, "is_fast", False):
            raise ValueError("sentence chunking needs a fast tokenizer (character offsets); use chunking='tokens'")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.chunking = chunking
        self.balanced = balanced
        self.joiner = joiner

    def _join(self, units: Sequence[str]) -> tuple[str, list[int]]:
        """The document text and the character offsets where its sentences start."""
        parts, starts, pos = [], [], 0
        for k, unit in enumerate(units):
            if k:
                parts.append(self.joiner)
                pos += len(self.joiner)
            if self.chunking == "sentences":
                starts.extend(pos + a for a, _ in sentence_spans(unit))
            else:
                starts.append(pos)
            parts.append(unit)
            pos += len(unit)
        return "".join(parts), starts

    def __call__(self, docs: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """For each document, its chunks as lists of token ids (in document order)."""
        if not docs:
            return []
        joined = [self._join(units) for units in docs]
        sentences = self.chunking == "sentences"
        enc = self.tokenizer(
            [text for text, _ in joined],
            add_special_tokens=False,
            return_offsets_mapping=sentences,
            return_attention_mask=False,
            verbose=False,
        )
        out = []
        for i, (_, char_starts) in enumerate(joined):
            ids = list(enc["input_ids"][i])
            if sentences:
                ends = [e for _, e in enc["offset_mapping"][i]]
                # a sentence starting at character c begins with the first token that ends after c
                starts = [bisect.bisect_right(ends, c) for c in char_starts]
                spans = sentence_chunks(len(ids), starts, self.chunk_tokens)
            else:
                spans = token_chunks(len(ids), self.chunk_tokens, self.balanced)
            out.append([ids[a:b] for a, b in spans])
        return out
