import json
import subprocess
import sys

import pytest

from schedules.cli import main

from .test_adapters import MODEL_SRC, write_model_file


def test_sample_toy2d_writes_png(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["sample", "--model", "builtin:toy2d-flow", "--nfe", "4", "--num", "64", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["model_calls"] == 4


def test_sample_with_table_and_callable_model(tmp_path, capsys):
    from schedules import FlowConvention, TimestepTable

    f = write_model_file(tmp_path, MODEL_SRC)
    TimestepTable.from_sigmas([1.0, 0.4, 0.0], convention=FlowConvention(1.0), prediction="flow", solver="heun",
                              method="t", model="m").save(tmp_path / "t.json")
    out = tmp_path / "s.png"
    rc = main(["sample", "--model", f"{f}:net", "--prediction", "flow", "--shape", "2", "--table",
               str(tmp_path / "t.json"), "--num", "16", "--out", str(out)])
    assert rc == 0 and out.exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_calls"] == 3  # heun, 2 steps


@pytest.mark.parametrize("args,match", [
    (["--model", "nowhere/at/all"], "not found"),
    (["--model", "builtin:toy2d-flow", "--nfe", "0"], "NFE must be"),
    (["--model", "builtin:toy2d-flow", "--solver", "rk9"], "unknown solver"),
])
def test_errors_are_one_line_exit_2(tmp_path, args, match):
    r = subprocess.run([sys.executable, "-m", "schedules.cli", "sample", *args, "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_wrong_convention_table_refused(tmp_path):
    from schedules import TimestepTable, VPConvention

    conv = VPConvention.default()
    TimestepTable.from_sigmas([conv.sigma_max, 1.0, 0.0], convention=conv, prediction="epsilon", solver="euler",
                              method="t", model="m").save(tmp_path / "vp.json")
    r = subprocess.run([sys.executable, "-m", "schedules.cli", "sample", "--model", "builtin:toy2d-flow", "--table",
                        str(tmp_path / "vp.json"), "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "made for a vp model" in r.stderr


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "schedules.cli", "--help"], capture_output=True, text=True)
    for cmd in ("search", "sample", "eval", "distill"):
        assert cmd in r.stdout


def test_only_the_image_processor_fallback_notice_of_transformers_is_dropped(caplog):
    import logging

    from schedules.cli import _quiet_image_processor_fallback

    log = logging.getLogger("transformers.utils.import_utils")
    notice = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
              "backward compatibility. Install torchvision to use the default backend")
    with caplog.at_level(logging.WARNING), _quiet_image_processor_fallback():
        log.warning(notice)
        log.warning("Could not import module 'X'")
    log.warning(notice)  # the filter is gone after the pipeline loaded
    assert [r.getMessage() for r in caplog.records] == ["Could not import module 'X'", notice]


def test_warning_printer_formats_only_stepsmith_user_warnings(capsys, monkeypatch):
    import warnings

    import torch

    import schedules.cli as cli

    passed = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a: passed.append(a))
    show = cli._warning_printer("eval")
    show(UserWarning("few samples"), UserWarning, cli.__file__, 1)
    show(UserWarning("from torch"), UserWarning, torch.__file__, 1)
    show(DeprecationWarning("ours, not a UserWarning"), DeprecationWarning, cli.__file__, 1)
    assert capsys.readouterr().err == "stepsmith eval: warning: few samples\n"
    assert [str(a[0]) for a in passed] == ["from torch", "ours, not a UserWarning"]


def test_every_long_running_command_takes_no_progress(tmp_path, capsys):
    from schedules.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("quickstart", "search", "sample", "eval", "distill"):
        assert "--no-progress" in commands[name].format_help(), name

    def stderr_of(argv):
        capsys.readouterr()
        assert main(argv) == 0
        return capsys.readouterr().err

    sample = ["sample", "--model", "builtin:toy2d-flow", "--nfe", "2", "--num", "8", "--out", str(tmp_path / "s.png")]
    bar = stderr_of(sample)
    assert "it/s" in bar or "s/it" in bar  # the bar is there by default
    assert stderr_of([*sample, "--no-progress"]) == ""
    ev = ["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform", "--nfe", "2", "--num", "16",
          "--metric", "wasserstein", "--no-teacher", "--grid", "0", "--no-cache"]
    assert "eval sweep" in stderr_of([*ev, "--out", str(tmp_path / "e1")])
    assert stderr_of([*ev, "--no-progress", "--out", str(tmp_path / "e2")]) == ""
