"""Unlabelled-text pipeline for LLaRA's adaptation: readers, chunk pairs, streaming dataset, collator."""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import random
import tracemalloc
import types
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from llara.data.chunking import Chunker, PretrainExample, chunk_pairs, sentence_chunks, split_sentences, token_chunks
from llara.data.collator import PretrainCollator, joint_batch
from llara.data.pretrain import PretrainDataset
from llara.data.readers import detect_format, iter_documents
from llara.data.targets import load_stopwords
from llara.io import DataError
from llara.training.losses import llara_pretrain_loss
from llara.modeling.arch import joint_forward_kwargs
from llara.prompts import NEXT_SLOTS, SELF_SLOTS
from tiny import make_model, make_tokenizer

CONTENT = "retrieval dense model language large passage query document text search index vector embedding " \
    "token data paris france capital city river water fish plant cell blood heart brain study result method " \
    "paper science".split()
STOP = "the a of to in and is was for on with".split()


@functools.lru_cache(maxsize=None)
def tok():
    return make_tokenizer(with_slots=True)


def ids(text: str) -> list[int]:
    return tok()(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def random_doc(rng: random.Random) -> list[str]:
    """A few lowercase sentences of vocabulary words, each ending with ' .'."""
    sents = []
    for _ in range(rng.randint(1, 7)):
        words = [rng.choice(CONTENT + STOP) for _ in range(rng.randint(3, 8))]
        sents.append(" ".join(words) + " .")
    return [" ".join(sents)]


@pytest.fixture
def corpus(tmp_path):
    """A generic JSONL corpus of 30 random documents."""
    rng = random.Random(1)
    path = tmp_path / "docs.jsonl"
    docs = [random_doc(rng) for _ in range(30)]
    write_jsonl(path, [{"text": d[0]} for d in docs])
    return path, docs


# --------------------------------------------------------------------------- readers


def test_text_reader_blocks_and_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("paris is the capital\nof france .\n\n\nthe river is large .\n \t\nblood cell study", encoding="utf-8")
    assert detect_format(f) == "text"
    assert list(iter_documents(f)) == [["paris is the capital of france ."], ["the river is large ."], ["blood cell study"]]
    assert list(iter_documents([f], txt_mode="file")) == [
        ["paris is the capital of france .", "the river is large .", "blood cell study"]
    ]
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"fine line\n\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"{bad}:3: invalid UTF-8"):
        list(iter_documents(bad))


def test_interleave_takes_documents_from_each_file_in_turn(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a1\n\na2\n\na3\n\na4", encoding="utf-8")
    b.write_text("b1\n\nb2", encoding="utf-8")
    flat = lambda docs: [d[0] for d in docs]  # noqa: E731
    assert flat(iter_documents([a, b])) == ["a1", "a2", "a3", "a4", "b1", "b2"]
    assert flat(iter_documents([a, b], interleave=True)) == ["a1", "b1", "a2", "b2", "a3", "a4"]


def test_jsonl_reader_fields_title_and_errors(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    rows = [
        {"title": "paris", "body": "paris is the capital"},  # text already starts with the title
        {"title": "river", "body": ["the water .", "  ", "fish"]},
        {"title": None, "body": "cell"},
        {"title": "empty", "body": ""},
    ]
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert detect_format(f) == "jsonl"
    assert list(iter_documents(f, text_field="body")) == [
        ["paris is the capital"], ["river", "the water .", "fish"], ["cell"], ["empty"]
    ]
    assert list(iter_documents(f, text_field="body", title_field=None))[1] == ["the water .", "fish"]

    g = tmp_path / "b.jsonl"
    write_jsonl(g, [{"body": "ok"}, "", {"text": "no body"}])
    with pytest.raises(DataError, match=rf"{g}:3: missing field 'body'"):
        list(iter_documents(g, text_field="body"))
    write_jsonl(g, [{"text": "ok"}, {"text": 3}])
    with pytest.raises(DataError, match=rf"{g}:2: field 'text' must be a string"):
        list(iter_documents(g))
    write_jsonl(g, [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError, match=rf"{g}:2: malformed JSON"):
        list(iter_documents(g))
    with pytest.raises(DataError, match="unknown file type"):
        list(iter_documents(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="file not found"):
        list(iter_documents(tmp_path / "missing.jsonl"))


def test_beir_reader(tmp_path):
    d = tmp_path / "coll"
    d.mkdir()
    write_jsonl(d / "corpus.jsonl", [
        {"_id": "1", "title": "paris", "text": "the capital of france"},
        {"_id": "2", "title": "", "text": "the river"},
        {"_id": "3", "text": "fish"},
    ])
    assert detect_format(d) == "beir"
    assert list(iter_documents(d)) == [["paris", "the capital of france"], ["the river"], ["fish"]]
    write_jsonl(d / "corpus.jsonl", [{"_id": "1", "text": "a"}, {"_id": "2", "text": "b"}, {"_id": "1", "text": "c"}])
    with pytest.raises(DataError, match=r"corpus.jsonl:3: duplicate _id '1' \(first seen on line 1\)"):
        list(iter_documents(d))
    write_jsonl(d / "corpus.jsonl", [{"_id": "1", "text": "a"}, {"title": "t", "text": "b"}])
    with pytest.raises(DataError, match=r"corpus.jsonl:2: missing field '_id'"):
        list(iter_documents(d))


def test_passages_reader_groups_consecutive_lines_in_idx_order(tmp_path):
    f = tmp_path / "p.jsonl"
    write_jsonl(f, [
        {"doc": "A", "idx": 0, "text": "a0"}, {"doc": "A", "idx": 1, "text": "a1"}, {"doc": "A", "idx": 2, "text": "a2"},
        {"doc": "B", "idx": 0, "text": "b0"}, {"doc": "B", "idx": 1, "text": "b1"}, {"doc": 7, "idx": 0, "text": "c0"},
    ])
    assert detect_format(f) == "passages"
    assert list(iter_documents(f)) == [["a0", "a1", "a2"], ["b0", "b1"], ["c0"]]

    cases = [
        ([{"doc": "A", "idx": 0, "text": "x"}, {"doc": "A", "idx": 2, "text": "x"}, {"doc": "A", "idx": 1, "text": "x"}],
         r":3: idx 1 of doc 'A' does not follow idx 2 \(line 2\)"),
        ([{"doc": "A", "idx": 0, "text": "x"}, {"doc": "A", "idx": 0, "text": "x"}], r":2: idx 0 of doc 'A'"),
        ([{"doc": "A", "idx": 0, "text": "x"}, {"doc": "B", "idx": 0, "text": "x"}, {"doc": "A", "idx": 1, "text": "x"}],
         r":3: doc 'A' appears again \(first on line 1\)"),
        ([{"doc": "A", "idx": 0, "text": "x"}, {"doc": "A", "text": "x"}], r":2: missing field 'idx'"),
        ([{"doc": "A", "idx": 0, "text": "x"}, {"doc": "A", "idx": "1", "text": "x"}], r":2: field 'idx' must be an integer"),
        ([{"doc": "A", "idx": 0, "text": "x"}, "[1, 2]"], r":2: expected a JSON object"),
    ]
    for rows, message in cases:
        write_jsonl(f, rows)
        with pytest.raises(DataError, match=str(f) + message):
            list(iter_documents(f))


def test_readers_stream(tmp_path):
    """Readers are generators: the first document comes before a broken last line is read, and
    reading a file whole keeps the memory peak far below its size."""
    f = tmp_path / "big.jsonl"
    line = json.dumps({"text": "dense retrieval with a large language model " * 3})
    with open(f, "w", encoding="utf-8") as fh:
        for _ in range(20_000):
            fh.write(line + "\n")
        fh.write("{broken\n")
    docs = iter_documents(f)
    assert isinstance(docs, types.GeneratorType)
    assert next(docs) == [json.loads(line)["text"].strip()]
    size = f.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r":20001: malformed JSON"):
            for _ in iter_documents(f):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 2_000_000 and peak < size / 20, (size, peak)


# --------------------------------------------------------------------------- sentences and chunks


def test_split_sentences():
    assert split_sentences("Dr. Smith met J. R. R. Tolkien in the U.S. Army! Then e.g. this. 1990 came.") == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. Army!", "Then e.g. this.", "1990 came."
    ]
    assert split_sentences("lower case text . more text . end") == ["lower case text .", "more text .", "end"]
    assert split_sentences("no stop here\n\n(Next) one. \"Quoted.\" Version 3.5 is out.") == [
        "no stop here", "(Next) one.", "\"Quoted.\"", "Version 3.5 is out."
    ]


def test_token_and_sentence_chunks():
    assert token_chunks(10, 4, balanced=False) == [(0, 4), (4, 8), (8, 10)]
    assert token_chunks(10, 4) == [(0, 4), (4, 7), (7, 10)]
    assert token_chunks(0, 4) == [] and token_chunks(3, 4) == [(0, 3)]
    # sentences [0,3) [3,5) [5,12) [12,13): greedy packing, the long one cut into pieces of 4
    assert sentence_chunks(13, [3, 5, 12], 5) == [(0, 5), (5, 10), (10, 13)]
    assert sentence_chunks(13, [3, 5, 12], 4) == [(0, 3), (3, 5), (5, 9), (9, 13)]  # last piece takes [12,13)
    pairs = list(chunk_pairs([[1] * 9, [2] * 9, [3] * 2], min_chunk_tokens=8, doc=4))
    assert pairs == [PretrainExample([1] * 9, [2] * 9, 4, 0)]
    assert list(chunk_pairs([[1] * 9], min_chunk_tokens=8)) == []
    assert list(chunk_pairs([[1] * 9], min_chunk_tokens=8, single_chunk="ebae")) == [PretrainExample([1] * 9, [], -1, 0)]


@pytest.mark.parametrize("chunking", ["sentences", "tokens"])
def test_pairs_are_consecutive_chunks_of_one_document(corpus, chunking):
    path, docs = corpus
    ds = PretrainDataset(path, tok(), chunk_tokens=12, chunking=chunking, shuffle_buffer=0, min_chunk_tokens=1)
    examples = list(ds)
    assert examples and len({e.doc for e in examples}) > 10
    per_doc = {}
    for e in examples:
        per_doc.setdefault(e.doc, []).append(e)
    for d, exs in per_doc.items():
        doc_ids = ids(docs[d][0])  # the document tokenized on its own
        chunks = Chunker(tok(), 12, chunking)([docs[d]])[0]
        assert sum(chunks, []) == doc_ids  # chunks cover the document in order
        assert all(0 < len(c) <= 12 for c in chunks)
        assert [e.chunk for e in exs] == list(range(len(chunks) - 1))
        for e in exs:
            assert e.text_ids == chunks[e.chunk] and e.next_ids == chunks[e.chunk + 1]
        if chunking == "sentences":  # sentences of <= 9 tokens are never cut
            assert all(c[-1] == tok().convert_tokens_to_ids(".") for c in chunks)
    multi = sum(len(Chunker(tok(), 12, chunking)([d])[0]) > 1 for d in docs)
    assert len(per_doc) == multi  # one-chunk documents are skipped by default


# --------------------------------------------------------------------------- targets


def test_targets_follow_the_truncated_text(tmp_path):
    collator = PretrainCollator(tok(), max_length=None)
    overhead = len(collator.prefix_ids) + len(collator.self_suffix) + len(collator.next_suffix)
    collator = PretrainCollator(tok(), max_length=overhead + 6)
    assert collator.text_budget == 6
    slot = tok().convert_tokens_to_ids("<s3>")
    text = ids("paris is the capital") + [slot, tok().unk_token_id] + ids("france , the river is large .")
    nxt = ids("the large river , river water and fish science .")
    batch = collator([PretrainExample(text, nxt), (ids("blood , cell"), [])])

    def target_set(name, row):
        return batch[f"{name}_targets"][row][batch[f"{name}_target_mask"][row]].tolist()

    names = lambda xs: tok().convert_ids_to_tokens(xs)  # noqa: E731
    assert names(target_set("self", 0)) == ["paris", "capital"]  # 'france', 'river', 'large' were cut
    assert set(target_set("self", 0)) <= set(text[:6])
    assert names(target_set("next", 0)) == ["large", "river", "water"]  # next chunk cut at 6, unique
    assert names(target_set("self", 1)) == ["blood", "cell"] and target_set("next", 1) == []
    # the model input holds exactly the truncated text
    start = len(collator.prefix_ids)
    assert batch["input_ids"][0, start : start + 6].tolist() == text[:6]
    assert batch["input_ids"][0, start + 6 : start + 6 + len(collator.self_suffix)].tolist() == collator.self_suffix
    assert batch["text_mask"][0].nonzero().flatten().tolist() == list(range(start, start + 6))
    assert int(batch["num_text_tokens"]) == 9 and int(batch["num_tokens"]) == int(batch["lengths"].sum())
    assert int(batch["num_examples"]) == 2


def test_default_stopwords_are_bm25s():
    words = load_stopwords()
    assert "the" in words and "large" not in words and "information" not in words
    keep = PretrainCollator(tok()).keep
    for w, kept in [("the", False), ("of", False), ("large", True), ("paris", True), (",", False), ("<s1>", False),
                    ("<s>", False)]:
        assert bool(keep[tok().convert_tokens_to_ids(w)]) is kept, w
    assert load_stopwords("none") == () and len(load_stopwords("stop-words")) > 1000


# --------------------------------------------------------------------------- dataset: order, resume, shards


def test_skip_resumes_the_same_stream(corpus):
    path, _ = corpus
    ds = PretrainDataset(path, tok(), chunk_tokens=8, chunking="tokens", shuffle_buffer=5, seed=3, min_chunk_tokens=1)
    full = list(ds)
    assert len(full) > 20 and full != sorted(full, key=lambda e: (e.doc, e.chunk))  # shuffled
    for k in (0, 1, 7, len(full) - 1, len(full)):
        ds.set_epoch(0)
        ds.skip(k)
        assert list(ds) == full[k:]
    ds.set_epoch(1)  # clears the skip; another order of the same examples
    other = list(ds)
    assert other != full and Counter(map(repr, other)) == Counter(map(repr, full))
    capped = PretrainDataset(path, tok(), chunk_tokens=8, chunking="tokens", shuffle_buffer=5, seed=3,
                             min_chunk_tokens=1, max_examples=10)
    assert list(capped) == full[:10]


def test_ranks_split_the_stream(corpus):
    path, _ = corpus
    kw = dict(chunk_tokens=8, chunking="tokens", shuffle_buffer=4, min_chunk_tokens=1)
    full = list(PretrainDataset(path, tok(), **kw))
    keys = lambda exs: [(e.doc, e.chunk) for e in exs]  # noqa: E731
    parts = [keys(PretrainDataset(path, tok(), rank=r, world_size=3, **kw)) for r in range(3)]
    assert all(parts) and sum(map(len, parts)) == len(full)
    assert sorted(sum(parts, [])) == sorted(keys(full))  # disjoint and covering
    for r, part in enumerate(parts):
        assert all(doc % 3 == r for doc, _ in part)
    capped = [list(PretrainDataset(path, tok(), rank=r, world_size=3, max_examples=10, **kw)) for r in range(3)]
    assert [len(c) for c in capped] == [4, 3, 3]


def test_dataloader_workers_split_and_resume(corpus):
    path, _ = corpus
    ds = PretrainDataset(path, tok(), chunk_tokens=8, chunking="tokens", shuffle_buffer=4, min_chunk_tokens=1)
    single = list(ds)

    def batches():
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list, multiprocessing_context="fork")
        return list(loader)

    full = batches()
    flat = sum(full, [])
    assert sorted(flat, key=repr) == sorted(single, key=repr)
    for k in (3, 4):  # k batches consumed; after 3, worker 1 (not 0) owes the next batch
        ds.set_epoch(0)
        ds.skip(2 * k, batch_size=2)
        assert batches() == full[k:]
    ds.loader_batch_size = 2  # what the training loop's plain skip(n) relies on
    ds.skip(6)
    assert batches() == full[3:]
    with pytest.raises(ValueError, match="multiple of the batch size"):
        ds.skip(5, batch_size=2)


# --------------------------------------------------------------------------- collator + model


def test_collated_batch_runs_a_tiny_llama(corpus):
    path, _ = corpus
    tokenizer = tok()
    model = make_model("llama", vocab_size=len(tokenizer) + 3, attn="sdpa")
    collator = PretrainCollator(tokenizer, max_length=60, vocab_size=model.config.vocab_size)
    ds = PretrainDataset(path, tokenizer, chunk_tokens=30, shuffle_buffer=8)
    batch = collator(list(ds)[:4])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= 64
    for key, slots in (("self_slots", SELF_SLOTS), ("next_slots", NEXT_SLOTS)):
        got = batch["input_ids"].gather(1, batch[key])
        assert (got == torch.tensor(tokenizer.convert_tokens_to_ids(list(slots)))).all()
    kw = joint_forward_kwargs(model, joint_batch(batch))
    with torch.no_grad():
        hidden = model.model(**kw).last_hidden_state
    out = llara_pretrain_loss(
        hidden, model.lm_head.weight,
        self_positions=batch["self_slots"], self_targets=batch["self_targets"],
        self_target_mask=batch["self_target_mask"], next_positions=batch["next_slots"],
        next_targets=batch["next_targets"], next_target_mask=batch["next_target_mask"],
        input_ids=batch["input_ids"], text_mask=batch["text_mask"],
    )
    assert torch.isfinite(out["loss"]) and out["ebae"] > 0 and out["ebar"] > 0 and out["lm"] > 0
    # a bf16 model gets a bf16 mask built from valid/blocked (finite minimum, not -inf)
    mask = joint_forward_kwargs(model.to(torch.bfloat16), joint_batch(batch))["attention_mask"]
    assert mask.dtype == torch.bfloat16 and mask.min() == torch.finfo(torch.bfloat16).min


def test_collator_paper_template_reads_the_eos():
    collator = PretrainCollator(tok(), template="paper", max_length=40)
    batch = collator([PretrainExample(ids("the river is large ."), ids("water and fish ."))])
    eos = tok().eos_token_id
    assert batch["input_ids"].gather(1, batch["self_slots"]).tolist() == [[eos]]
    assert batch["input_ids"].gather(1, batch["next_slots"]).tolist() == [[eos]]
    assert batch["next_slots"][0, 0] > batch["self_slots"][0, 0]


def test_documents_go_through_the_template_casing(tmp_path):
    from llara.prompts import get_template

    path = tmp_path / "caps.jsonl"
    write_jsonl(path, [{"text": "FISH PLANT WATER . THE RIVER IN THE CITY ."}, {"text": "the capital of France"}])
    ds = PretrainDataset(path, tok(), chunk_tokens=4, chunking="tokens", shuffle_buffer=0, min_chunk_tokens=1,
                         prepare=dataclasses.replace(get_template("llara"), casing="lower_all_caps").prepare)
    assert [" ".join(u) for u in ds.documents()] == ["fish plant water . the river in the city .",
                                                     "the capital of France"]
    first = next(iter(ds))
    assert tok().unk_token_id not in first.text_ids + first.next_ids
