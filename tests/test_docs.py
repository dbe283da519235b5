"""The documentation site builds with `mkdocs build --strict`: a broken link or anchor between pages, a
page missing from the nav, or an API page whose object no longer exists fails the build (and this test).
The build is offline: no plugin that downloads (Material's fonts are fetched by the reader's browser)."""
import html
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # the API page is rendered from the docstrings, examples included
    assert all(f'id="llara.{path}"' in api for path in ("modeling.encoder.Encoder", "retrieval.index.build_index",
                                                         "pipelines.recipe.run_recipe")), "API objects missing"
    text = html.unescape(re.sub(r"<[^>]+>", "", api))  # the code blocks are split into highlighting spans
    assert "s = Searcher.from_index(index_dir)" in text and "(1033, True, 'Flat', True)" in text
