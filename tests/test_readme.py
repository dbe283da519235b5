"""The README's quick tour runs as written: every fenced block after a `<!-- quick-tour -->` line is
run in order (bash blocks with bash, python blocks with python), in a scratch directory that sees the
repository's `src/` (where the shipped MED collection lives), with `llara` on the PATH.

The commands name `default`, the embedded 135M model, which would take minutes per command on a CPU.
`LLARA_DEFAULT_MODEL` (a documented setting: what `default` means for a process tree) points it at a
tiny random llara checkpoint instead, so the commands themselves stay exactly as the README prints
them and the whole tour takes seconds of model time."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from tiny import make_model, make_tokenizer

from llara.modeling.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- quick-tour -->\n```(\w+)\n(.*?)\n```", re.S)


def quick_tour() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(((?!https?:|#)[^)#]+)", text)
    assert links and [p for p in links if not (ROOT / p).exists()] == []
    assert [lang for lang, _ in quick_tour()] == ["bash", "python"]


def test_quick_tour_runs_as_written(tmp_path):
    model = Encoder(make_model(), make_tokenizer(), "llara", show_progress=False).save(tmp_path / "tiny")
    work = tmp_path / "work"
    work.mkdir()
    (work / "src").symlink_to(ROOT / "src")  # the README's paths are relative to the repository root
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llara"  # the console script of this checkout's code, whatever is installed
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llara.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src"),
           "LLARA_DEFAULT_MODEL": str(model), "LLARA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for i, (lang, code) in enumerate(quick_tour()):
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"quick-tour block {i} ({lang}) failed:\n{r.stdout}\n{r.stderr}"
        if lang == "bash":
            out = r.stdout
            assert "nDCG@10, side by side" in out and "indexed 1033 passages" in out
            assert "lung cancer in smokers" in out  # the search's table title
            lines = out.rstrip().splitlines()
            assert lines[-2].endswith("}") and '"hits"' in lines[-2]  # the service answered /search
            assert lines[-1].startswith('{"object":"list"') and '"embedding":' in lines[-1]  # and /v1/embeddings
        else:
            lines = r.stdout.splitlines()
            assert len(lines) >= 4 and lines[0].split()[1].isdigit()  # score, doc id, title of 3 hits; q @ d.T
    assert (work / "runs" / "tour" / "eval" / "summary.md").is_file()



def test_llara_default_model_says_what_default_means(tmp_path, monkeypatch):
    from llara.modeling.loading import resolve_model

    model = Encoder(make_model(), make_tokenizer(), "eos", show_progress=False).save(tmp_path / "tiny")
    monkeypatch.setenv("LLARA_DEFAULT_MODEL", str(model))
    resolved = resolve_model("default")
    assert resolved.path == str(model.resolve()) and resolved.template["name"] == "eos"
    monkeypatch.setenv("LLARA_DEFAULT_MODEL", "default")  # not a loop: the embedded model's own spec
    monkeypatch.setattr("llara.modeling.loading.embedded_gguf", lambda: tmp_path / "embedded.gguf")
    monkeypatch.setattr("llara.modeling.loading.convert_gguf", lambda gguf: tmp_path / "converted")
    assert resolve_model("default").model_id == "SmolLM2-135M-Instruct"
