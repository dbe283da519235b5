"""Training pairs made from a corpus (llara.retrieval.corpus_pairs): title -> text, inverse cloze task,
doc2query with a tiny random model; mixes, BM25 negatives without leaks, determinism by seed."""
import json
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer

from llara.data.chunking import split_sentences
from llara.retrieval.corpus_pairs import (CORPUS_SOURCES, PairsConfig, build_pairs, corpus_pairs, doc2query,
                                          load_doc2query_prompt, parse_mix, quotas)

TOPICS = ["fish river water", "paris france capital city", "plant cell blood", "heart brain study",
          "dense retrieval model", "search index vector", "language model token", "passage query document"]


def _doc(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    other = TOPICS[(i + 3) % len(TOPICS)]
    text = (f"The {topic} study was a result of {i} years. A method for {other} is in the paper. "
            f"The data of the {topic} test is above eight words. This sentence is the last one of {i}.")
    return {"_id": f"d{i}", "title": f"{topic} number {i}", "text": text}


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture
def corpus(tmp_path):
    docs = [_doc(i) for i in range(24)]
    docs.append({**docs[3], "_id": "copy3"})  # the same text under another id: never a negative of d3
    return _write(tmp_path / "corpus.jsonl", docs)


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _docs(path):
    return {d["_id"]: d for d in _lines(path)}


def _check_well_formed(lines, docs, cfg):
    for x in lines:
        assert x["query"].strip() and x["pos"] and x["pos"][0].strip()
        assert x["pos_ids"] and all(d in docs for d in x["pos_ids"] + x["neg_ids"])
        assert len(x["neg"]) == len(x["neg_ids"]) and 1 <= len(x["neg"]) <= cfg.num_negatives
        # no positive leaks into the negatives: not its document, not a copy of its text, not its passage
        same = {d for d in docs if docs[d]["text"] == docs[x["pos_ids"][0]]["text"]}
        assert not set(x["neg_ids"]) & same
        assert x["pos"][0] not in x["neg"]
        assert len(set(x["neg_ids"])) == len(x["neg_ids"])


def test_title_pairs_pair_a_title_with_its_text_and_show_negatives_without_titles(corpus, tmp_path):
    cfg = PairsConfig(window=(1, 20), num_negatives=3)
    report = build_pairs({"title": 1}, corpus, tmp_path / "p.jsonl", 10, cfg)
    lines, docs = _lines(tmp_path / "p.jsonl"), _docs(corpus)
    assert report["title"] == {"pairs": 10, "asked": 10} and len(lines) == 10
    _check_well_formed(lines, docs, cfg)
    titles = {d["title"] for d in docs.values()}
    for x in lines:
        doc = docs[x["pos_ids"][0]]
        assert x["source"] == "title" and x["query"] == doc["title"] and x["pos"] == [doc["text"]]
        assert not any(t in n for n in x["neg"] for t in titles)  # negatives are bodies, as the positive


def test_title_source_needs_titles(tmp_path):
    bare = _write(tmp_path / "bare.jsonl", [{**_doc(i), "title": ""} for i in range(5)])
    with pytest.raises(ValueError, match="bare.jsonl: no document has a title.*drop title from --pairs"):
        build_pairs({"ict": 1, "title": 1}, bare, tmp_path / "p.jsonl", 4, PairsConfig())
    assert not (tmp_path / "p.jsonl").exists()


def test_title_pairs_drop_the_title_the_text_repeats(tmp_path):
    doc = {"_id": "a", "title": "flow of a dissociating gas .", "text": "flow of a dissociating gas . the gas is "
           "studied in a tunnel ."}
    corpus = _write(tmp_path / "c.jsonl", [doc, _doc(1), _doc(2)])
    build_pairs({"title": 1}, corpus, tmp_path / "p.jsonl", 3, PairsConfig(window=(1, 5), num_negatives=1))
    line = next(x for x in _lines(tmp_path / "p.jsonl") if x["pos_ids"] == ["a"])
    assert line["pos"] == ["the gas is studied in a tunnel ."]


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_ict_takes_a_sentence_out_of_its_passage(corpus, tmp_path, keep):
    cfg = PairsConfig(window=(1, 20), num_negatives=3, ict_keep_prob=keep)
    build_pairs({"ict": 1}, corpus, tmp_path / "p.jsonl", 12, cfg)
    lines, docs = _lines(tmp_path / "p.jsonl"), _docs(corpus)
    assert len(lines) == 12
    _check_well_formed(lines, docs, cfg)
    for x in lines:
        doc = docs[x["pos_ids"][0]]
        assert x["source"] == "ict" and x["query"] in split_sentences(doc["text"])
        assert x["pos"][0].startswith(doc["title"] + " ")  # the passage as the index shows it
        assert (x["query"] in x["pos"][0]) == (keep == 1.0)
        if keep == 0.0:
            rest = [s for s in split_sentences(doc["text"]) if s != x["query"]]
            assert all(s in x["pos"][0] for s in rest)


def test_ict_keeps_the_sentence_at_the_configured_rate(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [_doc(i) for i in range(400)])
    build_pairs({"ict": 1}, corpus, tmp_path / "p.jsonl", 400, PairsConfig(window=(1, 20), num_negatives=1))
    kept = sum(x["query"] in x["pos"][0] for x in _lines(tmp_path / "p.jsonl"))
    assert 15 <= kept <= 70  # 10% of 400 = 40 expected; binomial sd 6


def test_pairs_are_deterministic_by_seed_and_sources_take_distinct_documents(corpus, tmp_path):
    def make(seed, name):
        build_pairs({"title": 1, "ict": 2}, corpus, tmp_path / name, 15, PairsConfig(window=(1, 20),
                                                                                   num_negatives=3, seed=seed))
        return (tmp_path / name).read_bytes()

    assert make(0, "a.jsonl") == make(0, "b.jsonl")
    assert make(1, "c.jsonl") != make(0, "a.jsonl")
    lines = _lines(tmp_path / "a.jsonl")
    assert sorted(x["source"] for x in lines) == ["ict"] * 10 + ["title"] * 5
    assert len({x["pos_ids"][0] for x in lines}) == 15


def test_mix_with_shipped_lines_draws_each_share_by_seed(corpus, tmp_path):
    shipped = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]} for i in range(50)]
    report = build_pairs({"squad": 1, "ict": 1}, corpus, tmp_path / "p.jsonl", 8, PairsConfig(window=(1, 20)),
                         shipped_lines=lambda name: shipped)
    lines = _lines(tmp_path / "p.jsonl")
    assert report["squad"] == {"pairs": 4, "asked": 4} and report["ict"]["pairs"] == 4
    assert [x["source"] for x in lines].count("squad") == 4
    assert all(x["query"] in {s["query"] for s in shipped} for x in lines if x["source"] == "squad")


@pytest.mark.parametrize("spec, message", [
    ("squad:x", "ratio 'x' of squad is not a number"),
    ("wiki:1", "unknown source 'wiki'"),
    ("squad:-1", "must be a number >= 0"),
    ("squad:0,ict:0", "every ratio is 0"),
    ("squad,,ict", "empty item"),
    ("ict:1,ict:2", "ict is named twice"),
    ("squad:nan", "must be a number >= 0"),
])
def test_parse_mix_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(spec)


def test_parse_mix_and_quotas():
    assert parse_mix("squad:1, title , ict:2,d2q:0") == {"squad": 1.0, "title": 1.0, "ict": 2.0}
    assert quotas({"squad": 1, "title": 1, "ict": 2}, 256) == {"squad": 64, "title": 64, "ict": 128}
    q = quotas({"a": 1, "b": 1, "c": 1}, 10)
    assert sum(q.values()) == 10 and sorted(q.values()) == [3, 3, 4]


# --------------------------------------------------------------------------- doc2query


CHAT = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> {% endif %}")


def _generator():
    tok = make_tokenizer()
    tok.chat_template = CHAT
    return make_model("llama", vocab_size=len(tok)).eval(), tok


def test_doc2query_generates_one_query_per_document_in_batches(corpus):
    model, tok = _generator()
    tok.padding_side = "right"
    docs = list(_docs(corpus).values())[:5]
    cfg = PairsConfig(d2q_batch_size=2, d2q_max_new_tokens=6)
    queries, cost = doc2query(model, tok, docs, cfg)
    assert len(queries) == 5 and all(isinstance(q, str) for q in queries)
    assert cost["docs"] == 5 and 0 < cost["generated_tokens"] <= 5 * 6 and cost["seconds"] > 0
    assert tok.padding_side == "right"  # left padding only while generating
    assert doc2query(model, tok, docs, cfg)[0] == queries  # greedy: the same queries again


def test_doc2query_needs_a_chat_template(corpus):
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(ValueError, match="instruct model whose tokenizer has a chat template"):
        doc2query(model, tok, [{"title": "", "text": "fish"}], PairsConfig())


def test_d2q_pairs_use_the_model_queries_with_bm25_negatives(corpus, tmp_path):
    cfg = PairsConfig(window=(1, 20), num_negatives=3, d2q_docs=6, d2q_max_new_tokens=8, min_query_words=1)
    calls = []

    def generator():
        calls.append(1)
        return _generator()

    report = build_pairs({"d2q": 1, "ict": 1}, corpus, tmp_path / "p.jsonl", 12, cfg, generator=generator)
    lines, docs = _lines(tmp_path / "p.jsonl"), _docs(corpus)
    assert calls == [1] and report["d2q_cost"]["docs"] == 6
    d2q = [x for x in lines if x["source"] == "d2q"]
    assert d2q and len(d2q) == report["d2q"]["pairs"] <= 6
    _check_well_formed(lines, docs, cfg)
    assert all(x["pos"] == [docs[x["pos_ids"][0]]["title"] + " " + docs[x["pos_ids"][0]]["text"]] for x in d2q)


def test_the_doc2query_prompt_is_a_data_file():
    prompt = load_doc2query_prompt()
    assert "{document}" in prompt["user"] and prompt["system"]
    assert set(CORPUS_SOURCES) == {"title", "ict", "d2q"}


def test_corpus_pairs_reports_a_source_that_runs_out(tmp_path):
    corpus = {f"d{i}": _doc(i) for i in range(3)}
    said = []
    pairs, report = corpus_pairs(corpus, {"title": 2, "ict": 5}, PairsConfig(), say=said.append)
    assert report["title"]["pairs"] == 2 and report["ict"] == {"pairs": 1, "asked": 5}
    assert any("ict: 1 pairs of the 5 asked for" in s for s in said)
