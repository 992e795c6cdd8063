"""The design card's layering and style rules, checked."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "schedules", "distill", "eval", "benchmarks", "tests", "notebooks"):
        assert (ROOT / name).exists(), name


# package → top-level packages it must never import: schedules is the core; eval and distill build on it and
# never on each other; benchmarks (which may import everything) is imported by none of them
FORBIDDEN = {
    "schedules": ("eval", "distill", "benchmarks"),
    "eval": ("distill", "benchmarks"),
    "distill": ("eval", "benchmarks"),
}


def imported_modules(path: Path) -> list[str]:
    """Every absolute module an ``import`` statement in ``path`` names, function-local imports included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    offenders = [f"{f.relative_to(ROOT)}: {name}"
                 for f in sorted((ROOT / package).rglob("*.py"))
                 for name in imported_modules(f) if name.split(".")[0] in FORBIDDEN[package]]
    assert not offenders, f"{package} may not import {', '.join(FORBIDDEN[package])}: {offenders}"


def test_layering_check_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from eval.metrics import fid\n    import distill.trainer as t\n")
    assert imported_modules(f) == ["os", "eval.metrics", "distill.trainer"]


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
