"""Training pairs made from the user's own corpus, mixed with the shipped pairs (``llara recipe --pairs``).

A mix is written ``NAME:RATIO,NAME:RATIO,...`` (a bare ``NAME`` is ratio 1), e.g. ``squad:1,title:1,ict:2``.
Names:

- ``squad`` (:data:`~llara.data.shipped.SHIPPED_PAIRS`): SQuAD v1.1 questions about Wikipedia paragraphs,
  shipped with llara; hard negatives mined by BM25 over the SQuAD paragraphs, as before.
- ``title``: a document's title as the query, its text (the title taken out, also where the text repeats it
  at its start) as the positive. Needs titles: a corpus without any is an error that says so. The negatives
  are shown as text without their titles too, so "has a title" cannot tell a negative from the positive.
- ``ict``: the inverse cloze task (Lee, Chang and Toutanova, ACL 2019, "Latent Retrieval for Weakly
  Supervised Open Domain Question Answering"): one sentence of the document is the pseudo-query and the
  document without that sentence is the positive. As in the paper, the sentence is left in the positive
  with a small probability (:attr:`PairsConfig.ict_keep_prob`, 0.1 there and here), so the model also learns
  that word overlap is evidence, not only context. The sentence is drawn among those that start within the
  first :attr:`PairsConfig.ict_max_words` words, the part of the document that fits the training passage.
- ``d2q``: doc2query / InPars-style pseudo-queries, written by the model being trained (it must be an
  instruct model with a chat template) for :attr:`PairsConfig.d2q_docs` documents. The prompt is the data file
  ``llara/data/prompts/doc2query.yaml``; generation is batched with left padding, greedy by default (or
  sampled with the seed). :func:`doc2query` returns its cost (tokens/s).

Every source draws its documents from one seeded shuffle of the corpus, without overlap between sources,
so two pairs of one mix never share a positive document. Hard negatives of the corpus sources come from
BM25 over the user's corpus (:class:`llara.retrieval.bm25.BM25Index`, the index's own tokenisation),
sampled from a rank window by :func:`llara.retrieval.mining.sample_negatives`; the positive's document, and
any document with the same text, is never a negative. The same seed gives the same file.
"""
from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from ..data.chunking import sentence_spans
from ..data.shipped import SHIPPED_PAIRS
from ..io import passage_text, write_jsonl

log = logging.getLogger(__name__)

CORPUS_SOURCES = ("title", "ict", "d2q")
SOURCES = SHIPPED_PAIRS + CORPUS_SOURCES
DOC2QUERY_PROMPT = Path(__file__).parents[1] / "data" / "prompts" / "doc2query.yaml"


@dataclass(frozen=True)
class PairsConfig:
    window: tuple[int, int] = (5, 100)  # BM25 ranks [lo, hi] the negatives are drawn from
    num_negatives: int = 7
    seed: int = 0
    ict_keep_prob: float = 0.1  # Lee et al. 2019: the sentence stays in its passage 10% of the time
    ict_max_words: int = 64  # the ICT sentence starts within the document's first N words
    min_query_words: int = 3  # shorter titles / sentences / generated queries are not used
    d2q_docs: int = 200  # documents given to doc2query (at most)
    d2q_batch_size: int = 16
    d2q_max_new_tokens: int = 32
    d2q_doc_words: int = 160  # the document is cut to its first N words in the prompt
    d2q_sample: bool = False  # greedy (False) or sampled with the seed (temperature 0.7, top-p 0.9)


def parse_mix(spec: str) -> dict[str, float]:
    """``"squad:1,title:1,ict:2"`` -> ``{"squad": 1.0, "title": 1.0, "ict": 2.0}`` (a bare name: ratio 1;
    a ratio of 0 drops the source). ValueError naming the bad part."""
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, ratio = part.strip().partition(":")
        if not name:
            raise ValueError(f"--pairs {spec!r}: empty item (write NAME:RATIO,NAME:RATIO with NAME one of "
                             f"{', '.join(SOURCES)})")
        if name not in SOURCES:
            raise ValueError(f"--pairs {spec!r}: unknown source {name!r}; sources: {', '.join(SOURCES)} "
                             "(or one BEIR directory / training .jsonl on its own)")
        try:
            r = float(ratio) if ratio else 1.0
        except ValueError:
            raise ValueError(f"--pairs {spec!r}: ratio {ratio!r} of {name} is not a number") from None
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"--pairs {spec!r}: ratio of {name} must be a number >= 0, got {ratio}")
        if name in mix:
            raise ValueError(f"--pairs {spec!r}: {name} is named twice")
        mix[name] = r
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise ValueError(f"--pairs {spec!r}: every ratio is 0, no pairs to train on")
    return mix


def quotas(mix: Mapping[str, float], total: int) -> dict[str, int]:
    """Pairs per source for ``total`` pairs, in proportion to the ratios (largest remainders; every
    source with a ratio gets at least one)."""
    s = sum(mix.values())
    raw = {k: total * v / s for k, v in mix.items()}
    out = {k: max(int(math.floor(x)), 1) for k, x in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: max(total - sum(out.values()), 0)]:
        out[k] += 1
    return out


# --------------------------------------------------------------------------- pair sources


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    doc_id: str
    source: str


def _words(text: str) -> int:
    return len(text.split())


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _body(doc: Mapping[str, str]) -> str:
    """The text of a document without its title, also where the text starts with the title
    (some collections, e.g. Cranfield, repeat it)."""
    title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
    if title and text.lower().startswith(title.lower()):
        text = text[len(title):].lstrip(" .:-\n\t")
    return text


def title_pair(doc_id: str, doc: Mapping[str, str], cfg: PairsConfig, rng: random.Random) -> Pair | None:
    title, body = (doc.get("title") or "").strip(), _body(doc)
    if _words(title) < cfg.min_query_words or _words(body) < cfg.min_query_words:
        return None
    return Pair(title, body, doc_id, "title")


def ict_pair(doc_id: str, doc: Mapping[str, str], cfg: PairsConfig, rng: random.Random) -> Pair | None:
    text = (doc.get("text") or "").strip()
    spans = sentence_spans(text)
    if len(spans) < 2:
        return None
    title = _norm(doc.get("title") or "")
    candidates = [(a, b) for a, b in spans  # not the title where the text repeats it: it stays in the passage
                  if _words(text[:a]) < cfg.ict_max_words and _words(text[a:b]) >= cfg.min_query_words
                  and _norm(text[a:b]) != title]
    if not candidates:
        return None
    a, b = rng.choice(candidates)
    keep = rng.random() < cfg.ict_keep_prob
    rest = text if keep else re.sub(r"\s+", " ", f"{text[:a]} {text[b:]}").strip()
    if _words(rest) < cfg.min_query_words:
        return None
    return Pair(text[a:b], passage_text({"title": doc.get("title", ""), "text": rest}), doc_id, "ict")


def _clean_query(reply: str) -> str:
    line = next((x.strip() for x in reply.strip().splitlines() if x.strip()), "")
    line = re.sub(r"^(search\s+)?query\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'“”‘’").strip()


def load_doc2query_prompt(path: str | Path = DOC2QUERY_PROMPT) -> dict[str, str]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("user"), str) or "{document}" not in data["user"]:
        raise ValueError(f"{path}: expected a 'user' text holding {{document}} (and optionally 'system')")
    return {"system": str(data.get("system") or ""), "user": data["user"]}


def doc2query(model, tokenizer, docs: list[Mapping[str, str]], cfg: PairsConfig,
              prompt: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """One pseudo-query per document (``""`` where the reply was empty), and the cost:
    ``{"docs", "generated_tokens", "seconds", "tokens_per_s", "seconds_per_100_docs"}``.

    ``model`` is a causal LM, ``tokenizer`` its tokenizer, which must carry a chat template."""
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("d2q needs an instruct model whose tokenizer has a chat template; this one has none "
                         "(drop d2q from --pairs)")
    prompt = prompt or load_doc2query_prompt()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("d2q: the tokenizer has neither a pad nor an EOS token to pad the batch with")

    def render(doc):
        words = passage_text(doc).split()
        messages = ([{"role": "system", "content": prompt["system"]}] if prompt["system"] else []) + [
            {"role": "user", "content": prompt["user"].replace("{document}", " ".join(words[: cfg.d2q_doc_words]))}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    device = next(model.parameters()).device
    out: list[str] = []
    generated = 0
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        for i in range(0, len(docs), cfg.d2q_batch_size):
            texts = [render(d) for d in docs[i: i + cfg.d2q_batch_size]]
            # the chat template already wrote the special tokens (BOS included where the model has one)
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if cfg.d2q_sample else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=cfg.d2q_max_new_tokens, pad_token_id=pad, **sampling)
            new = ids[:, batch["input_ids"].shape[1]:]
            eos = tokenizer.eos_token_id
            for row in new.tolist():
                n = next((j for j, t in enumerate(row) if t in (eos, pad)), len(row))
                generated += n
                out.append(_clean_query(tokenizer.decode(row[:n], skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = side
    seconds = time.perf_counter() - t0
    cost = {"docs": len(docs), "generated_tokens": generated, "seconds": round(seconds, 2),
            "tokens_per_s": round(generated / seconds, 1) if seconds else None,
            "seconds_per_100_docs": round(100 * seconds / max(len(docs), 1), 1)}
    return out, cost


# --------------------------------------------------------------------------- negatives and the mix


def check_titles(corpus: Mapping[str, Mapping[str, str]], where: str) -> None:
    if not any((d.get("title") or "").strip() for d in corpus.values()):
        raise ValueError(f"{where}: no document has a title, so the 'title' pair source has nothing to pair "
                         "(drop title from --pairs, e.g. --pairs squad:1,ict:1)")


def corpus_pairs(corpus: Mapping[str, Mapping[str, str]], want: Mapping[str, int], cfg: PairsConfig, *,
                 generator: Callable[[], tuple[Any, Any]] | None = None, where: str = "corpus",
                 say: Callable[[str], None] = log.info) -> tuple[list[Pair], dict[str, Any]]:
    """Up to ``want[source]`` pairs of each corpus source, from disjoint documents of one seeded shuffle.
    ``generator()`` returns ``(causal LM, tokenizer)`` for d2q (called only when d2q is wanted).
    Returns the pairs and a report ``{source: {"pairs": n, ...}}``."""
    unknown = set(want) - set(CORPUS_SOURCES)
    if unknown:
        raise ValueError(f"not corpus pair sources: {sorted(unknown)}")
    if "title" in want:
        check_titles(corpus, where)
    ids = sorted(corpus)
    random.Random(f"{cfg.seed}:documents").shuffle(ids)
    used: set[str] = set()
    pairs: list[Pair] = []
    report: dict[str, Any] = {}
    makers = {"title": title_pair, "ict": ict_pair}
    for source in CORPUS_SOURCES:  # a fixed order: the same seed gives the same documents to each source
        n = want.get(source, 0)
        if n <= 0:
            continue
        rng = random.Random(f"{cfg.seed}:{source}")
        got: list[Pair] = []
        if source == "d2q":
            docs = [d for d in ids if d not in used and _words(passage_text(corpus[d])) >= cfg.min_query_words]
            docs = docs[: min(n, cfg.d2q_docs)]
            if generator is None:
                raise ValueError("the d2q pair source needs the model to generate with")
            model, tokenizer = generator()
            say(f"d2q: writing pseudo-queries for {len(docs)} documents with the model")
            queries, cost = doc2query(model, tokenizer, [corpus[d] for d in docs], cfg)
            for d, q in zip(docs, queries):
                if _words(q) >= cfg.min_query_words:
                    got.append(Pair(q, passage_text(corpus[d]), d, "d2q"))
            used.update(docs)
            report["d2q_cost"] = cost
        else:
            for d in ids:
                if len(got) == n:
                    break
                if d in used:
                    continue
                pair = makers[source](d, corpus[d], cfg, rng)
                if pair is not None:
                    got.append(pair)
                    used.add(d)
        if len(got) < n:
            say(f"{source}: {len(got)} pairs of the {n} asked for (the corpus has no more usable documents)")
        report[source] = {"pairs": len(got), "asked": n}
        pairs += got
    return pairs, report


def mine_corpus_negatives(pairs: list[Pair], corpus: Mapping[str, Mapping[str, str]], cfg: PairsConfig,
                          language: str = "english") -> Iterable[dict]:
    """Training lines ``{query, pos, neg, query_id, pos_ids, neg_ids, source}`` with BM25 hard negatives
    over ``corpus``; the positive's document and documents with the same text are never negatives."""
    from .bm25 import BM25Index
    from .mining import MiningConfig, sample_negatives

    if not pairs:
        return []
    ids = list(corpus)
    texts = [passage_text(corpus[d]) for d in ids]
    same_text: dict[str, set[str]] = {}
    for d, t in zip(ids, texts):
        same_text.setdefault(t.strip(), set()).add(d)
    index = BM25Index.build(texts, language)
    k = min(cfg.window[1] + 1, len(ids))
    hits = index.search([p.query for p in pairs], k)
    qids = [f"{p.source}:{p.doc_id}" for p in pairs]
    run = {q: {ids[row]: s for row, s in h} for q, h in zip(qids, hits)}
    positives = {q: {p.doc_id} | same_text[passage_text(corpus[p.doc_id]).strip()] for q, p in zip(qids, pairs)}
    negatives = sample_negatives(run, positives, MiningConfig(window=tuple(cfg.window),
                                                              num_negatives=cfg.num_negatives, seed=cfg.seed),
                                 fill_from=ids)
    lines = []
    for q, p in zip(qids, pairs):
        # title pairs compare a body with bodies: no negative carries a title the positive lacks
        shown = (lambda d: _body(corpus[d])) if p.source == "title" else (lambda d: passage_text(corpus[d]))
        neg = [d for d in negatives[q] if shown(d).strip() and shown(d).strip() != p.positive.strip()]
        lines.append({"query": p.query, "pos": [p.positive], "neg": [shown(d) for d in neg], "query_id": q,
                      "pos_ids": [p.doc_id], "neg_ids": neg, "source": p.source})
    return lines


def build_pairs(mix: Mapping[str, float], corpus_path: str | Path, output: str | Path, total: int,
                cfg: PairsConfig, *, shipped_lines: Callable[[str], list[dict]] | None = None,
                generator: Callable[[], tuple[Any, Any]] | None = None,
                say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Write ``total`` training lines (fewer where a source runs out) mixed by ``mix`` to ``output``
    (atomically, in a seeded shuffled order). ``shipped_lines(name)`` returns a shipped set's mined lines
    (all of them; ``quotas`` of them are drawn by the seed). Returns ``{source: {"pairs", "asked"}, ...}``."""
    from ..data.beir import load_corpus

    if total < 1:
        raise ValueError(f"total pairs must be >= 1, got {total}")
    corpus = load_corpus(corpus_path)
    if not corpus:
        raise ValueError(f"{corpus_path}: empty corpus")
    want = quotas(mix, total)
    report: dict[str, Any] = {}
    lines: list[dict] = []
    for name in SHIPPED_PAIRS:
        if name in want:
            if shipped_lines is None:
                raise ValueError(f"the {name} pairs need shipped_lines")
            pool = shipped_lines(name)
            chosen = random.Random(f"{cfg.seed}:{name}").sample(pool, min(want[name], len(pool)))
            lines += [dict(x, source=name) for x in chosen]
            report[name] = {"pairs": len(chosen), "asked": want[name]}
    corpus_want = {k: v for k, v in want.items() if k in CORPUS_SOURCES}
    if corpus_want:
        pairs, rep = corpus_pairs(corpus, corpus_want, cfg, generator=generator, where=str(corpus_path), say=say)
        report.update(rep)
        lines += mine_corpus_negatives(pairs, corpus, cfg)
    if not lines:
        raise ValueError(f"{corpus_path}: no training pairs could be made with {dict(mix)}")
    random.Random(f"{cfg.seed}:order").shuffle(lines)
    write_jsonl(lines, output)
    return report
