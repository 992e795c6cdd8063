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


def _quoted_commands(text: str) -> list[str]:
    """Every ``stepsmith VERB --...`` command quoted in ``text``: inline code spans (which may wrap lines) and
    lines of bash blocks; a bare ``stepsmith VERB`` in prose names the verb and is left out."""
    spans = re.findall(r"`((?:\./setup\.sh && )?(?:\.venv/bin/)?stepsmith [^`]+)`", text)
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
             if re.match(r"\s*(?:\./setup\.sh && )?(?:\.venv/bin/)?stepsmith ", ln)]
    commands = [re.sub(r"^.*?stepsmith ", "", " ".join(c.split())) for c in spans + lines]
    return [c for c in commands if " -" in c]


def test_quoted_commands_parse():
    # a command copied from the docs must not stop at a missing required flag or a renamed option
    import shlex

    from schedules.cli import build_parser

    docs = [ROOT / "README.md", *sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))]
    parser, bad, n = build_parser(), [], 0
    for doc in docs:
        for cmd in _quoted_commands(doc.read_text()):
            n += 1
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parser.parse_args(shlex.split(cmd.replace("\\|", "|")))
            except SystemExit:
                bad.append(f"{doc.relative_to(ROOT)}: stepsmith {cmd}\n  {err.getvalue().strip().splitlines()[-1]}")
    assert n >= 10 and not bad, "\n".join(bad)
