"""The front door: `from llara import ...` gives the library's own objects, lazily, and every exported
name's docstring example runs (as a doctest, on a tiny random checkpoint and the shipped MED collection)."""
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer

import llara

NAMES = ["Encoder", "Searcher", "build_index", "evaluate", "pretrain", "finetune", "run_recipe"]
MED = Path(llara.__file__).parent / "data" / "demo" / "med"


def test_the_public_names_are_the_library_objects():
    from llara.evaluation.runner import evaluate_datasets
    from llara.modeling.encoder import Encoder
    from llara.pipelines.recipe import run_recipe
    from llara.retrieval.index import build_index
    from llara.retrieval.searcher import Searcher
    from llara.training.finetune import finetune
    from llara.training.pretrain import pretrain

    assert [n for n in llara.__all__ if n != "__version__"] == NAMES
    expected = [Encoder, Searcher, build_index, evaluate_datasets, pretrain, finetune, run_recipe]
    assert [getattr(llara, n) for n in NAMES] == expected
    assert set(NAMES) <= set(dir(llara))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llara.nope  # noqa: B018


def test_import_llara_does_not_import_torch():
    code = "import sys, llara; print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False]


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """What the docstring examples refer to: a tiny llara checkpoint, the shipped MED collection, an index
    of it, a few training pairs and a scratch directory."""
    root = tmp_path_factory.mktemp("doctest")
    model_dir = str(llara.Encoder(make_model(), make_tokenizer(), "llara", show_progress=False).save(root / "model"))
    pairs = root / "pairs.jsonl"
    texts = ["fish take oxygen from water", "paris is the capital of france", "the heart moves blood"]
    pairs.write_text("".join(json.dumps({"query": t.split()[0], "pos": [t], "neg": [texts[i - 1]]}) + "\n"
                             for i, t in enumerate(texts)))
    enc = llara.Encoder.from_pretrained(model_dir, show_progress=False)
    index_dir = str(llara.build_index(enc, MED / "corpus.jsonl", root / "index", model_spec=model_dir))
    return {"model_dir": model_dir, "med": MED, "pairs": pairs, "index_dir": index_dir, "root": root}


@pytest.mark.parametrize("name", NAMES)
def test_docstring_example_runs(name, namespace, monkeypatch):
    monkeypatch.setenv("LLARA_CACHE", str(namespace["root"] / "cache"))
    tmp = namespace["root"] / name
    tmp.mkdir()
    globs = {**namespace, "tmp": tmp}
    obj = getattr(llara, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"llara.{name}", globs=globs)
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 3, f"llara.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for t in tests:
        runner.run(t, out=report.append)
    assert runner.failures == 0, "".join(report)
