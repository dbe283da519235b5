"""`llara recipe`: adapt → mine → fine-tune → index on a tiny model, resumable; `llara finetune`'s defaults."""
import json
import shutil
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer

from llara.cli import build_parser, main
from llara.modeling.encoder import Encoder
from llara.pipelines.recipe import _pairs_source
from llara.pipelines.recipe_budget import budget_fit
from llara.training.finetune import FINETUNE_TRAIN_DEFAULTS, finetune_train_config


@pytest.fixture
def tiny_dir(tmp_path):
    return str(Encoder(make_model("llama"), make_tokenizer(), "llara", show_progress=False).save(tmp_path / "base"))


@pytest.fixture
def train_pairs(tmp_path, adi_dir):
    """adi as a BEIR directory with a train split (its test judgments): stand-in for the shipped pairs."""
    d = tmp_path / "pairs"
    shutil.copytree(adi_dir, d)
    (d / "qrels" / "train.tsv").write_text((d / "qrels" / "test.tsv").read_text())
    return d


def _steps(run):
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def _argv(corpus_dir, model, out, pairs, *, adapt_steps=2, finetune_steps=2, chunk_tokens=16):
    """A `llara recipe` command line on a tiny model, small enough for a test."""
    return ["recipe", "--corpus", str(corpus_dir / "corpus.jsonl"), "--model", model, "--pairs", str(pairs),
            "--output", str(out), "--adapt-steps", str(adapt_steps), "--adapt-batch-size", "2",
            "--chunk-tokens", str(chunk_tokens), "--finetune-steps", str(finetune_steps), "--batch-size", "2",
            "--negatives", "3", "--window", "2", "20", "--max-passage-length", "48", "--device", "cpu",
            "--dtype", "float32", "--no-progress"]


def test_recipe_runs_every_stage_once_and_the_index_searches(tiny_dir, train_pairs, adi_dir, tmp_path, capsys):
    out = tmp_path / "recipe"
    args = _argv(adi_dir, tiny_dir, out, train_pairs)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert all(f"{i}/4 {s}:" in text for i, s in enumerate(("adapt", "mine", "finetune", "index"), 1))
    record = json.loads((out / "recipe.json").read_text())
    assert list(record["stages"]) == ["adapt", "mine", "finetune", "index"]
    assert all(s["seconds"] >= 0 for s in record["stages"].values())
    # each stage starts from the previous one's output
    ft = json.loads((out / "finetune" / "final" / "llara.json").read_text())
    assert ft["base_model"] == str(out / "adapt" / "final") and ft["finetune_data"] == str(out / "pairs.jsonl")
    assert ft["training"]["lora"] is True and ft["training"]["lr"] == FINETUNE_TRAIN_DEFAULTS["lr"]
    assert ft["max_passage_length"] == 48 and ft["finetune"]["group_size"] == 2
    groups = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert groups and all(1 <= len(g["neg"]) <= 3 for g in groups)
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == sum(1 for _ in open(adi_dir / "corpus.jsonl"))
    assert manifest["bm25"] and record["model"] == str(out / "finetune" / "final")
    assert main(["search", "--index", str(out / "index"), "--json", "-k", "3", "--mode", "hybrid", "fish"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[-1])["hits"]
    assert len(hits) == 3

    # a second run finds every stage done and trains nothing
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert capsys.readouterr().out.count("already done") == 4
    assert _steps(out / "adapt") == [1, 2] and _steps(out / "finetune") == [1, 2]
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime

    # more fine-tuning steps: the fine-tuning continues from its checkpoint, adaptation and mining stay done,
    # and the index is rebuilt for the new weights
    def with_flag(flag, value):
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]

    assert main(with_flag("--finetune-steps", "3")) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "continuing from step 2" in text and "rebuilt" in text and text.count("already done") == 2
    assert _steps(out / "finetune") == [1, 2, 3] and _steps(out / "adapt") == [1, 2]
    record = json.loads((out / "recipe.json").read_text())
    assert record["stages"]["finetune"]["steps"] == 3
    assert record["stages"]["index"]["settings"]["model"]["steps"] == 3
    assert json.loads((out / "index" / "manifest.json").read_text())["complete"]

    # another setting of a trained stage: an error that names the run, and nothing is lost
    assert main(with_flag("--finetune-steps", "3") + ["--group-size", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out / 'finetune'} was trained with other settings (group_size" in err
    assert _steps(out / "finetune") == [1, 2, 3] and (out / "finetune" / "final" / "llara.json").is_file()


def test_recipe_without_adaptation_and_with_mined_lines(tiny_dir, train_pairs, adi_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    assert main(["mine", "--method", "bm25", "--corpus", str(train_pairs / "corpus.jsonl"), "--queries",
                 str(train_pairs / "queries.jsonl"), "--qrels", str(train_pairs / "qrels" / "train.tsv"),
                 "--window", "2", "20", "--negatives", "3", "--output", str(train)]) == 0
    out = tmp_path / "recipe"
    assert main(["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--model", tiny_dir, "--pairs", str(train),
                 "--output", str(out), "--adapt-steps", "0", "--finetune-steps", "1", "--batch-size", "2",
                 "--max-passage-length", "48", "--device", "cpu", "--dtype", "float32", "--no-progress"]) == 0
    record = json.loads((out / "recipe.json").read_text())
    assert list(record["stages"]) == ["finetune", "index"] and not (out / "adapt").exists()
    assert json.loads((out / "finetune" / "final" / "llara.json").read_text())["base_model"] == tiny_dir


@pytest.mark.parametrize("bad, message", [
    (["--corpus", "missing.jsonl"], "missing.jsonl: no such corpus file"),
    (["--pairs", "nope"], "--pairs 'nope': unknown source 'nope'"),
    (["--adapt-steps", "0", "--finetune-steps", "0"], "nothing to train"),
])
def test_recipe_rejects_bad_input_before_training(bad, message, adi_dir, tmp_path, capsys):
    args = ["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(tmp_path / "r")] + bad
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "adapt").exists()


def test_shipped_pairs_are_found():
    source = _pairs_source("squad")
    assert {k: v.rsplit("/", 1)[-1] for k, v in source.items()} == {
        "corpus": "corpus.jsonl.gz", "queries": "queries.jsonl.gz", "qrels": "train.tsv.gz"}
    assert all(Path(v).is_file() for v in source.values())


def test_finetune_defaults_are_the_recipe():
    """`llara finetune` and finetune_train_config share FINETUNE_TRAIN_DEFAULTS; adaptation keeps TrainConfig's."""
    ft = build_parser().parse_args(["finetune", "--data", "x", "--output", "o"])
    pre = build_parser().parse_args(["pretrain", "--data", "x", "--output", "o"])
    for key, value in FINETUNE_TRAIN_DEFAULTS.items():
        assert getattr(ft, key) == value and getattr(finetune_train_config(max_steps=1), key) == value
        assert getattr(pre, key) != value
    assert build_parser().parse_args(["finetune", "--data", "x", "--output", "o", "--no-lora"]).lora is False


def test_recipe_with_corpus_pairs_evaluates_the_index_it_built(tiny_dir, adi_dir, tmp_path, capsys):
    out = tmp_path / "recipe"
    args = ["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--model", tiny_dir, "--pairs", "title:1,ict:1",
            "--output", str(out), "--adapt-steps", "0", "--finetune-steps", "2", "--batch-size", "2",
            "--negatives", "3", "--window", "2", "20", "--max-passage-length", "48", "--device", "cpu",
            "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "4 training pairs mixed title 1, ict 1" in text and "run the same command again with --eval DIR" in text
    record = json.loads((out / "recipe.json").read_text())
    assert record["stages"]["mine"]["sources"] == {"title": {"pairs": 2, "asked": 2}, "ict": {"pairs": 2, "asked": 2}}
    groups = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(g["source"] for g in groups) == ["ict", "ict", "title", "title"]
    assert all(not set(g["pos_ids"]) & set(g["neg_ids"]) for g in groups)

    # the same command with --eval: nothing is redone, the index is searched in each mode on adi's queries
    assert main(args + ["--eval", str(adi_dir)]) == 0
    text = capsys.readouterr().out
    assert text.count("already done") == 3
    rows = json.loads((out / "eval.json").read_text())
    assert [r["mode"] for r in rows] == ["dense", "bm25", "hybrid"]
    assert all(0 <= r["ndcg@10"] <= 1 and r["queries"] == 35 for r in rows)
    table = (out / "eval.md").read_text()
    assert "| bm25 |" in table and "1.00x" in table and "| hybrid |" in table
    assert json.loads((out / "recipe.json").read_text())["eval"]["rows"] == rows


def test_budget_fit_caps_the_steps_asked_by_the_time_left():
    common = {"spent_s": 300.0, "probe_s": 20.0, "index_s": 120.0, "overhead_s": 5.0}
    assert budget_fit(1800, 128, step_s=4.0, **common) == 128               # 1,350 s left: 337 steps fit
    assert budget_fit(1800, 128, step_s=12.0, **common) == 112              # 1,350 // 12
    assert budget_fit(1800, 1024, step_s=4.0, **common) == 337              # fills the budget when more are asked
    assert budget_fit(60, 128, step_s=4.0, **common) == 1                   # nothing left: one step, not zero


def test_recipe_budget_runs_fewer_steps_only_where_they_do_not_fit(tiny_dir, adi_dir, tmp_path, capsys):
    base = ["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--model", tiny_dir, "--pairs", "ict:1",
            "--adapt-steps", "0", "--batch-size", "2", "--negatives", "3", "--window", "2", "20",
            "--max-passage-length", "48", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    # the default budget (30 minutes) and 5 steps of a tiny model: they fit, all run
    out = tmp_path / "fits"
    assert main(base + ["--output", str(out), "--finetune-steps", "5"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    record = json.loads((out / "recipe.json").read_text())
    assert "budget: the 5 fine-tuning steps asked fit (budget 30 min" in text and "s per fine-tuning step" in text
    assert record["budget"]["steps"] == 5 and record["budget"]["step_s"] > 0 and not (out / "probe").exists()
    assert _steps(out / "finetune")[-1] == 5
    # a budget that the probe alone exceeds: one step, and the run says so and how to run them all
    out = tmp_path / "tight"
    args = base + ["--output", str(out), "--finetune-steps", "6", "--budget-minutes", "0.001"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    record = json.loads((out / "recipe.json").read_text())
    assert "budget: 1 of the 6 fine-tuning steps asked fit (budget 0.001 min" in text
    assert "too small for a useful fine-tuning" in text and "--budget-minutes 0 runs them all" in text
    assert record["stages"]["finetune"]["steps"] == record["budget"]["steps"] == 1
    assert _steps(out / "finetune")[-1] == 1
    # resumed: the choice is kept, nothing is retrained
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "as chosen before" in text and text.count("already done") == 3


@pytest.mark.parametrize("bad, message", [
    (["--pairs", "squad:1,wiki:1"], "unknown source 'wiki'"),
    (["--pairs", "missing/train.jsonl"], "no such training .jsonl file"),
    (["--eval", "nowhere"], "--eval nowhere: missing nowhere/queries.jsonl"),
    (["--budget-minutes", "-1"], "budget_minutes must be >= 0"),
])
def test_recipe_rejects_bad_pairs_eval_and_budget(bad, message, adi_dir, tmp_path, capsys):
    assert main(["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(tmp_path / "r")] + bad) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_recipe_title_pairs_on_a_corpus_without_titles_fail_before_training(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": f"fish {i} water"}) + "\n"
                              for i in range(4)))
    assert main(["recipe", "--corpus", str(corpus), "--model", tiny_dir, "--pairs", "squad:1,title:1",
                 "--output", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no document has a title" in err and "drop title from --pairs" in err
    assert not (tmp_path / "r" / "adapt").exists()


def test_recipe_d2q_needs_an_instruct_model(tiny_dir, adi_dir, tmp_path, capsys):
    assert main(["recipe", "--corpus", str(adi_dir / "corpus.jsonl"), "--model", tiny_dir, "--pairs", "ict:1,d2q:1",
                 "--output", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "d2q needs an instruct model with a chat template" in " ".join(capsys.readouterr().err.split())


def test_auto_pairs_drop_title_only_where_the_corpus_has_none(tmp_path):
    from llara.pipelines.recipe import AUTO_PAIRS, RecipeConfig, resolve_pairs

    titled, bare = tmp_path / "titled.jsonl", tmp_path / "bare.jsonl"
    titled.write_text('{"_id": "a", "title": "Gills", "text": "Fish breathe."}\n'
                      '{"_id": "b", "title": "", "text": "Paris is in France."}\n')
    bare.write_text('{"_id": "a", "title": "", "text": "Fish breathe."}\n{"_id": "b", "text": "Paris."}\n')
    said = []
    assert RecipeConfig(corpus=str(titled)).pairs == "auto"  # the default
    assert resolve_pairs("auto", str(titled), said.append) == AUTO_PAIRS == "squad:1,title:1,ict:1"
    assert said == []
    assert resolve_pairs("auto", str(bare), said.append) == "squad:1,ict:1"
    assert len(said) == 1 and "no titles" in said[0]
    assert resolve_pairs("squad:1,title:1", str(bare)) == "squad:1,title:1"  # asked for by name: kept (an error later)


def test_recipe_keeps_one_checkpoint_per_training_stage(tmp_path, tiny_dir, train_pairs, adi_dir):
    out = tmp_path / "run"
    argv = _argv(adi_dir, tiny_dir, out, train_pairs, adapt_steps=8, finetune_steps=8, chunk_tokens=32)
    assert main(argv) == 0
    for stage in ("adapt", "finetune"):  # saved every 2 steps, the last one kept
        assert sorted(p.name for p in (out / stage).glob("checkpoint-*")) == ["checkpoint-000008"]
