"""The README's promises: two commands first, the same test command as CI, and a diffusers example that runs."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_same_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [ln for ln in first_block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands == ["./setup.sh && .venv/bin/stepsmith quickstart --out runs/quickstart",
                        "./setup.sh && .venv/bin/python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_diffusers_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Ten lines for diffusers users\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    value = float(out.getvalue().split("FID")[-1])
    assert math.isfinite(value) and value > 0
    assert (tmp_path / "digits-flow-dp6.json").is_file()


def test_readme_example_imports_only_the_public_face():
    code = re.search(r"## Ten lines for diffusers users\n\n```python\n(.*?)```", README, re.S).group(1)
    imports = [ln.split()[1] for ln in code.splitlines() if ln.startswith(("from ", "import "))]
    assert imports and set(imports) <= {"schedules", "eval"}, imports
