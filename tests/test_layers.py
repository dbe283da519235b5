"""The layers of src/llara point one way: no module imports from a layer above its own, no two
modules import each other (directly or round a longer circle), no module imports another
file's private (``_``) names, and every import (in src/, tests/ and benchmarks/) names the module
that defines the name: no module passes on names it only imported.

The import graph is read with ``ast`` from the source (every import, those inside functions too),
so the test needs nothing installed. The layer order is documented in ``llara/io.py``; print the
graph with ``python tests/test_layers.py``.
"""
from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom first; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("llara", "llara.io"),
    ("llara.prompts",),
    ("llara.modeling",),
    ("llara.data",),
    ("llara.training",),
    ("llara.retrieval",),
    ("llara.evaluation",),
    ("llara.interop",),
    ("llara.pipelines",),
    ("llara.serve",),
    ("llara.cli",),
]


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted((src / "llara").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    best, rank = "", None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best) and (p != "llara" or module == p):
                best, rank = p, i
    if rank is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS (and to the list in llara/io.py)")
    return rank


def _source(module: str, node: ast.ImportFrom, path: Path) -> str:
    """The absolute name of the module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The llara modules ``module`` imports (``from pkg import submodule`` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "llara")
        elif isinstance(node, ast.ImportFrom):
            name = _source(module, node, path)
            if name.split(".")[0] != "llara":
                continue
            subs = {f"{name}.{a.name}" for a in node.names} & known
            found.update(subs or {name})
    found.discard(module)
    return {m for m in found if m in known or m.rpartition(".")[0] in known}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(module: str, path: Path, known: set[str]) -> list[str]:
    """``module:line`` of each use of another llara module's private name: ``from m import _x``, or
    ``m._x`` on a module bound by an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: set[str] = set()  # local names of imported llara modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update(a.asname for a in node.names if a.asname and a.name.split(".")[0] == "llara")
        elif isinstance(node, ast.ImportFrom):
            name = _source(module, node, path)
            if name.split(".")[0] != "llara":
                continue
            for a in node.names:
                if f"{name}.{a.name}" in known:
                    bound.add(a.asname or a.name)
                elif _private(a.name):
                    found.append(f"{module}:{node.lineno} imports {a.name} from {name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr)):
            found.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def _top_level(tree: ast.Module):
    """The statements run when the module is imported (those under a module-level if/try too)."""
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from (n for n in ast.walk(node) if isinstance(n, ast.stmt))
        else:
            yield node


def defined_names(path: Path) -> set[str]:
    """The names a module defines itself: functions, classes and assigned names (imports excluded)."""
    names = set()
    for node in _top_level(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
    return names


def passed_on_names(path: Path, module: str, mods: dict[str, Path]) -> list[str]:
    """``file:line`` of each ``from llara.x import name`` where ``llara.x`` neither defines ``name``
    nor has a submodule of that name (the package root's lazy public names excepted), and each
    ``__all__`` entry of a module that it does not define."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = _source(module, node, path) if node.level else (node.module or "")
        if source not in mods or source == "llara":
            continue
        own = defined_names(mods[source])
        found += [f"{path}:{node.lineno} imports {a.name} from {source}, which does not define it"
                  for a in node.names if a.name not in own and f"{source}.{a.name}" not in mods]
    if module in mods:
        own = defined_names(path)
        for node in _top_level(tree):
            names_all = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                             for t in node.targets)
            if names_all and isinstance(node.value, (ast.List, ast.Tuple)) and module != "llara":
                found += [f"{path}:{node.lineno} lists {e.value} in __all__ without defining it"
                          for e in node.value.elts if isinstance(e, ast.Constant) and e.value not in own]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
            for m, targets in sorted(g.items()) for t in sorted(targets) if layer(t) > layer(m)]


def import_circle(g: dict[str, set[str]]) -> list[str]:
    """One circle of imports (``[a, b, ..., a]``), or ``[]`` when the graph has none."""
    try:
        graphlib.TopologicalSorter(g).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists it against the arrows
    return []


def render(g: dict[str, set[str]]) -> str:
    lines = []
    for m in sorted(g, key=lambda m: (layer(m), m)):
        below = sorted(g[m], key=lambda t: (layer(t), t))
        lines.append(f"{layer(m)} {m:30s} -> {', '.join(below) if below else '-'}")
    return "\n".join(lines)


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def test_the_package_root_holds_only_what_every_layer_uses():
    """Each room is a folder; the root keeps the front door (``__init__``), ``io`` and ``prompts``."""
    root = sorted(m for m in modules() if m.count(".") == 1 and not (SRC / m.replace(".", "/")).is_dir())
    assert root == ["llara.io", "llara.prompts"]


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(graph()) == []


def test_no_import_circles():
    assert import_circle(graph()) == []


def test_no_module_imports_another_files_private_names():
    mods = modules()
    assert [hit for m, p in mods.items() for hit in private_imports(m, p, set(mods))] == []


def test_every_import_names_the_module_that_defines_the_name():
    mods = modules()
    root = SRC.parent
    files = {p: m for m, p in mods.items()}
    files.update({p: "" for d in ("tests", "benchmarks") for p in sorted((root / d).glob("*.py"))})
    assert [hit for p, m in files.items() for hit in passed_on_names(p, m, mods)] == []


def fake_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``llara`` under ``root`` with the given files (paths relative to the package)."""
    for rel, text in files.items():
        path = root / "llara" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "llara"


def test_the_check_sees_names_passed_on(tmp_path):
    fake_package(tmp_path, {"__init__.py": "", "io.py": "def passage_text(): pass\n", "data/__init__.py": "",
                            "data/beir.py": "from ..io import passage_text\nif True:\n    X = 1\n"
                                            "__all__ = ['passage_text', 'X', 'load']\ndef load(): pass\n"})
    user = tmp_path / "user.py"
    user.write_text("from llara.data.beir import X, load, passage_text\nfrom llara.io import passage_text\n"
                    "from llara.data import beir\n")
    mods = modules(tmp_path)
    assert passed_on_names(user, "", mods) == [
        f"{user}:1 imports passage_text from llara.data.beir, which does not define it"]
    beir = mods["llara.data.beir"]
    assert passed_on_names(beir, "llara.data.beir", mods) == [
        f"{beir}:4 lists passage_text in __all__ without defining it"]


def test_the_check_sees_relative_lazy_and_submodule_imports(tmp_path):
    fake_package(tmp_path, {"__init__.py": "", "io.py": "", "retrieval/__init__.py": "",
                            "retrieval/mining.py": "def f():\n    from ..evaluation import metrics\n",
                            "evaluation/__init__.py": "",
                            "evaluation/metrics.py": "from llara.io import x\nfrom ..retrieval import mining\n"})
    mods = modules(tmp_path)
    g = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    assert g["llara.retrieval.mining"] == {"llara.evaluation.metrics"}
    assert g["llara.evaluation.metrics"] == {"llara.io", "llara.retrieval.mining"}
    assert upward_imports(g) == ["llara.retrieval.mining (layer 5) imports llara.evaluation.metrics (layer 6)"]
    assert import_circle(g) in (["llara.retrieval.mining", "llara.evaluation.metrics", "llara.retrieval.mining"],
                                ["llara.evaluation.metrics", "llara.retrieval.mining", "llara.evaluation.metrics"])
    del g["llara.evaluation.metrics"]
    assert import_circle(g) == []


def test_the_check_sees_private_names_imported_or_read_through_a_module(tmp_path):
    fake_package(tmp_path, {"__init__.py": "__version__ = '0'\n", "retrieval/__init__.py": "",
                            "retrieval/index.py": "def _read(): pass\ndef sha(): pass\n",
                            "retrieval/check.py":
                                "from .. import __version__\nfrom .index import _read, sha\nfrom . import index as ix\n"
                                "import llara.retrieval.index as ix2\nfrom typing import _SpecialForm\n"
                                "def f():\n    return ix._verify(), ix2._x, ix.__name__, sha._y\n"})
    mods = modules(tmp_path)
    hits = private_imports("llara.retrieval.check", mods["llara.retrieval.check"], set(mods))
    assert sorted(hits) == ["llara.retrieval.check:2 imports _read from llara.retrieval.index",
                            "llara.retrieval.check:7 uses ix._verify", "llara.retrieval.check:7 uses ix2._x"]


if __name__ == "__main__":
    g = graph()
    print(render(g))
    mods = modules()
    bad = upward_imports(g) + [f"import circle: {' -> '.join(c)}" for c in [import_circle(g)] if c]
    bad += [hit for m, path in mods.items() for hit in private_imports(m, path, set(mods))]
    print("\n".join(bad) if bad else "no upward imports, no import circles, no private names imported across files")
    sys.exit(1 if bad else 0)
