"""The layers of src/llara point one way: no module imports from a layer above its own, no two
modules import each other (directly or round a longer circle), and no module imports another
file's private (``_``) names.

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
    ("llara.losses", "llara.training"),
    ("llara.retrieval",),
    ("llara.evaluation",),
    ("llara.interop",),
    ("llara.serve", "llara.serve_limits", "llara.serve_metrics", "llara.serve_schema", "llara.demo", "llara.recipe",
     "llara.loadtest", "llara.console", "llara.cli_args", "llara.cli"),
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


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(graph()) == []


def test_no_import_circles():
    assert import_circle(graph()) == []


def test_no_module_imports_another_files_private_names():
    mods = modules()
    assert [hit for m, p in mods.items() for hit in private_imports(m, p, set(mods))] == []


def test_the_check_sees_relative_lazy_and_submodule_imports(tmp_path):
    pkg = tmp_path / "llara"
    (pkg / "retrieval").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("")
    (pkg / "retrieval" / "__init__.py").write_text("")
    (pkg / "retrieval" / "mining.py").write_text("def f():\n    from ..evaluation import metrics\n")
    (pkg / "evaluation").mkdir()
    (pkg / "evaluation" / "__init__.py").write_text("")
    (pkg / "evaluation" / "metrics.py").write_text("from llara.io import x\nfrom ..retrieval import mining\n")
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
    pkg = tmp_path / "llara"
    (pkg / "retrieval").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "retrieval" / "__init__.py").write_text("")
    (pkg / "retrieval" / "index.py").write_text("def _read(): pass\ndef sha(): pass\n")
    (pkg / "retrieval" / "check.py").write_text(
        "from .. import __version__\nfrom .index import _read, sha\nfrom . import index as ix\n"
        "import llara.retrieval.index as ix2\nfrom typing import _SpecialForm\n"
        "def f():\n    return ix._verify(), ix2._x, ix.__name__, sha._y\n")
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
