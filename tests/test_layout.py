"""The design card's layering and style rules, checked."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "schedules", "distill", "eval", "tests", "notebooks"):
        assert (ROOT / name).exists(), name


def test_core_never_imports_eval_or_distill():
    offenders = []
    for f in (ROOT / "schedules").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("eval", "distill")]
    assert not offenders


def test_embedded_weights_are_small_safetensors():
    emb = ROOT / "schedules" / "embedded"
    files = list(emb.rglob("*.safetensors"))
    assert files
    assert all(f.stat().st_size < 10 * 2**20 for f in files)
    assert not list(emb.rglob("*.bin")) and not list(emb.rglob("*.pt"))
    for d in [p for p in emb.iterdir() if p.is_dir() and not p.name.startswith("__")]:
        assert (d / "training.json").is_file(), f"{d.name} lacks training.json (command and seed)"


# the venv's ruff sits beside its python, which is not on PATH when tests run as .venv/bin/python -m pytest
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_clean():
    r = subprocess.run([RUFF, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
