"""Hostile but ordinary input: every everyday mistake is one line on stderr, exit 2, nothing written.

``CLI_CASES`` is a corpus of command lines (``{name}`` placeholders are filled from
:func:`build_fixtures`); each runs ``schedules.cli.main`` in-process and must exit 2 with exactly
one line on stderr containing the expected text, no traceback, and no output file. ``API_CASES``
misuse the Python API and must raise :class:`StepsmithError` (never AttributeError/TypeError from
deep inside). The corpus also runs against another checkout as a script, to count what a version
did before: ``python tests/test_hostile.py`` (subprocess per case, prints the totals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from schedules.io import StepsmithError

TOY = "builtin:toy2d-flow"
SEARCH = ["search", "--model", TOY, "--method", "uniform", "--nfe", "3"]
SEARCH_DP = ["search", "--model", TOY, "--nfe", "3", "--samples", "4", "--grid", "8", "--no-progress"]
SAMPLE = ["sample", "--model", TOY, "--nfe", "2", "--num", "4"]

MODEL_BODY = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, shape=(2,)):
            super().__init__()
            self.lin = nn.Linear(1, 1)
            self.sample_shape = shape
        def forward(self, x, t):
            if x.shape[0] > 2 and {oom}:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: not enough "
                                   "memory: you tried to allocate 1099511627776 bytes.")
            return x * 0 + self.lin.weight.sum() * 0

    net = Net()
    vec3 = Net((3,))
    rgba = Net((4, 8, 8))
"""


def build_fixtures(root: Path) -> dict[str, str]:
    """Tables, model files and paths the corpus points at (cheap: no model is loaded)."""
    from schedules.conventions import FlowConvention
    from schedules.table import TimestepTable

    root.mkdir(parents=True, exist_ok=True)
    ok = TimestepTable.from_sigmas([1.0, 0.5, 0.0], convention=FlowConvention(1.0), prediction="flow",
                                   solver="euler", method="t", model=TOY)
    good = ok.to_dict()
    (root / "ok.json").write_text(json.dumps(good))
    variants = {"steps_str": {"steps": "2"}, "sigma_str": {"sigmas": ["1.0", 0.5, 0.0]},
                "sigmas_null": {"sigmas": None}, "solver_list": {"solver": ["euler"]},
                "nfe_float": {"nfe": 2.5}, "steps_bool": {"steps": True}, "cfg_list": {"convention_config": []},
                "model_num": {"model": 7}, "ts_str": {"timesteps": "1.0,0.5"}, "prov_str": {"provenance": "x"}}
    for name, change in variants.items():
        (root / f"{name}.json").write_text(json.dumps({**good, **change}))
    (root / "vp_bad.json").write_text(json.dumps(_vp_mismatch("builtin:digits-ddpm")))
    (root / "list.json").write_text("[1, 2]")
    (root / "tabledir").mkdir(exist_ok=True)
    (root / "outdir").mkdir(exist_ok=True)
    (root / "afile").write_text("x")
    (root / "m.py").write_text(textwrap.dedent(MODEL_BODY).format(oom="False"))
    (root / "oom.py").write_text(textwrap.dedent(MODEL_BODY).format(oom="True"))
    (root / "exit0.py").write_text("import sys\nimport torch\nnet = torch.nn.Linear(2, 2)\nsys.exit(0)\n")
    (root / "exit3.py").write_text("import sys\nsys.exit(3)\n")
    (root / "sched").mkdir(exist_ok=True)
    (root / "sched" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}))
    _model_json_fixtures(root)
    tables = {k: str(root / f"{k}.json") for k in variants}
    extra = {k: str(root / f"{k}.json") for k in EXTRA_JSON}
    return {"d": str(root), "ok": str(root / "ok.json"), **tables, **extra, "ddpm": _ddpm_folder(),
            "list": str(root / "list.json"), "vp_bad": str(root / "vp_bad.json"),
            "tabledir": str(root / "tabledir"), "outdir": str(root / "outdir"), "afile": str(root / "afile"),
            **{k: str(root / f"{k}.py") for k in ("m", "oom", "exit0", "exit3")}, "sched": str(root / "sched"),
            **{k: str(root / f"{k}.pt") for k in ("dp_other", "dp_v0", "dp_trunc")}}


EXTRA_JSON = ("flow_sched", "noclass_sched", "v_sched", "evo_trunc", "evo_other", "evo_rng")


def _ddpm_folder() -> str:
    from schedules.embedded import embedded_path

    return str(embedded_path("digits-ddpm"))


def _model_json_fixtures(root: Path) -> None:
    """Scheduler configs of the wrong kind and malformed evolution checkpoints."""
    files = {"flow_sched": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000},
             "noclass_sched": {"num_train_timesteps": 1000, "beta_schedule": "linear"},
             "v_sched": {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "prediction_type": "v_prediction"},
             "evo_other": {"config_key": "0123456789abcdef", "generation": 0, "population": [[0, 1, 2]],
                           "cache": [[[0, 1, 2], 0.5]], "rng": {"bit_generator": "PCG64"}},
             "evo_rng": None}
    for name, obj in files.items():
        if obj is not None:
            (root / f"{name}.json").write_text(json.dumps(obj))
    (root / "evo_trunc.json").write_text('{"config_key": "abc", "generation": 1, "popul')
    (root / "evo_rng.json").write_text(json.dumps({**files["evo_other"], "population": "0,1,2"}))
    dp_other = {"format": "stepsmith-dp-checkpoint", "version": 1, "key": "0123456789abcdef", "state": {},
                "spent": {"model_calls": 1, "seconds": 0.1}}
    torch.save(dp_other, root / "dp_other.pt")
    torch.save({**dp_other, "version": 0}, root / "dp_v0.pt")
    (root / "dp_trunc.pt").write_bytes((root / "dp_other.pt").read_bytes()[:40])


def _vp_mismatch(model: str) -> dict:
    """A digits-ddpm table whose first timestep was edited away from what its sigma maps to."""
    from schedules.adapters import _read_json
    from schedules.conventions import VPConvention
    from schedules.embedded import embedded_path
    from schedules.table import TimestepTable

    cfg = _read_json(embedded_path("digits-ddpm") / "scheduler" / "scheduler_config.json", "scheduler config")
    conv = VPConvention.from_scheduler_config(cfg)
    sig = conv.sigma_from_model_time(torch.tensor([900.0, 400.0], dtype=torch.float64)).tolist() + [0.0]
    good = TimestepTable.from_sigmas(sig, convention=conv, prediction="epsilon", solver="ddim", method="t",
                                     model=model)
    return {**good.to_dict(), "timesteps": [800.0, 400.0]}


OUT_JSON = "{d}/new/t.json"
OUT_PNG = "{d}/new/g.png"
EVAL = ["eval", "--model", TOY, "--methods", "uniform", "--nfe", "2", "--num", "4", "--teacher-steps", "2"]
EVO = ["search", "--model", TOY, "--method", "evolution", "--nfe", "3", "--samples", "4", "--grid", "8",
       "--no-progress"]

# (id, argv template, expected text in the one stderr line)
CLI_CASES: list[tuple[str, list[str], str]] = [
    # output paths, refused before any model call
    ("search-out-dir", [*SEARCH, "--out", "{outdir}"], "existing directory"),
    ("search-out-empty", [*SEARCH, "--out", ""], "--out is empty"),
    ("search-out-readonly", [*SEARCH, "--out", "/sys/stepsmith_t.json"], "cannot write"),
    ("search-out-under-file", [*SEARCH, "--out", "{afile}/t.json"], "is a file"),
    ("dp-out-dir", [*SEARCH_DP, "--out", "{outdir}"], "existing directory"),
    ("sample-out-jpg", [*SAMPLE, "--out", "{d}/new/g.jpg"], "must end in .png"),
    ("sample-out-noext", [*SAMPLE, "--out", "{d}/new/grid"], "must end in .png"),
    ("sample-out-dir", [*SAMPLE, "--out", "{outdir}"], "existing directory"),
    ("sample-out-empty", [*SAMPLE, "--out", ""], "--out is empty"),
    ("sample-out-readonly", [*SAMPLE, "--out", "/sys/stepsmith_g.png"], "cannot write"),
    ("sample-tensor-dir", [*SAMPLE, "--out", OUT_PNG, "--save-tensor", "{outdir}"], "--save-tensor"),
    ("sample-tensor-readonly", [*SAMPLE, "--out", OUT_PNG, "--save-tensor", "/sys/x.safetensors"], "cannot write"),
    # devices, checked before loading
    ("search-device-cuda", [*SEARCH, "--device", "cuda", "--out", OUT_JSON], "--device cuda"),
    ("search-device-foo", [*SEARCH, "--device", "foo", "--out", OUT_JSON], "not a torch device"),
    ("sample-device-cuda1", [*SAMPLE, "--device", "cuda:1", "--out", OUT_PNG], "--device cuda:1"),
    ("sample-device-empty", [*SAMPLE, "--device", "", "--out", OUT_PNG], "not a torch device"),
    ("sample-device-mps", [*SAMPLE, "--device", "mps", "--out", OUT_PNG], "mps"),
    ("sample-device-meta", [*SAMPLE, "--device", "meta", "--out", OUT_PNG], "cpu, cuda or mps"),
    # Heun budgets the solver cannot spend exactly
    ("search-heun-nfe2", [*SEARCH, "--solver", "heun", "--nfe", "2", "--out", OUT_JSON], "pass an odd NFE"),
    ("search-heun-nfe4", [*SEARCH, "--solver", "heun", "--nfe", "4", "--out", OUT_JSON], "gives 2 step"),
    ("dp-heun-nfe6", [*SEARCH_DP, "--solver", "heun", "--nfe", "6", "--out", OUT_JSON], "pass an odd NFE"),
    ("sample-heun-nfe2", [*SAMPLE, "--solver", "heun", "--nfe", "2", "--out", OUT_PNG], "pass an odd NFE"),
    # table files with fields of the wrong JSON type
    ("table-steps-str", [*SAMPLE[:3], "--table", "{steps_str}", "--out", OUT_PNG], '"steps" must be an integer'),
    ("table-sigma-str", [*SAMPLE[:3], "--table", "{sigma_str}", "--out", OUT_PNG], '"sigmas" must be a list'),
    ("table-sigmas-null", [*SAMPLE[:3], "--table", "{sigmas_null}", "--out", OUT_PNG], '"sigmas" must be'),
    ("table-solver-list", [*SAMPLE[:3], "--table", "{solver_list}", "--out", OUT_PNG], '"solver" must be a string'),
    ("table-nfe-float", [*SAMPLE[:3], "--table", "{nfe_float}", "--out", OUT_PNG], '"nfe" must be an integer'),
    ("table-steps-bool", [*SAMPLE[:3], "--table", "{steps_bool}", "--out", OUT_PNG], '"steps" must be an integer'),
    ("table-cfg-list", [*SAMPLE[:3], "--table", "{cfg_list}", "--out", OUT_PNG], '"convention_config" must be'),
    ("table-model-num", [*SAMPLE[:3], "--table", "{model_num}", "--out", OUT_PNG], '"model" must be a string'),
    ("table-ts-str", [*SAMPLE[:3], "--table", "{ts_str}", "--out", OUT_PNG], '"timesteps" must be a list'),
    ("table-prov-str", [*SAMPLE[:3], "--table", "{prov_str}", "--out", OUT_PNG], '"provenance" must be'),
    ("table-json-list", [*SAMPLE[:3], "--table", "{list}", "--out", OUT_PNG], "must be an object"),
    ("table-is-dir", [*SAMPLE[:3], "--table", "{tabledir}", "--out", OUT_PNG], "is a directory"),
    ("table-empty", [*SAMPLE[:3], "--table", "", "--out", OUT_PNG], "must be the path"),
    ("table-vp-timesteps", ["sample", "--model", "builtin:digits-ddpm", "--table", "{vp_bad}", "--num", "1",
                            "--out", OUT_PNG], "disagrees with sigma"),
    # user model files
    ("model-sys-exit-0", [*SEARCH[:2], "{exit0}:net", *SEARCH[3:], "--prediction", "flow", "--shape", "2",
                          "--out", OUT_JSON], "called sys.exit(0)"),
    ("model-sys-exit-3", [*SAMPLE[:2], "{exit3}:net", *SAMPLE[3:], "--prediction", "flow", "--out", OUT_PNG],
     "called sys.exit(3)"),
    ("model-flow-sched-cfg", [*SEARCH[:2], "{m}:net", *SEARCH[3:], "--prediction", "flow",
                              "--scheduler-config", "{sched}", "--out", OUT_JSON], "--scheduler-config"),
    ("builtin-weights", [*SEARCH, "--weights", "{afile}", "--out", OUT_JSON], "drop those options"),
    ("model-vec3", [*SAMPLE[:2], "{m}:vec3", *SAMPLE[3:], "--prediction", "flow", "--out", OUT_PNG],
     "cannot be drawn"),
    ("model-rgba", [*SAMPLE[:2], "{m}:rgba", *SAMPLE[3:], "--prediction", "flow", "--out", OUT_PNG],
     "cannot be drawn"),
    # allocation failures get a hint
    ("sample-oom", [*SAMPLE[:2], "{oom}:net", *SAMPLE[3:], "--prediction", "flow", "--out", OUT_PNG],
     "lower --num"),
    ("search-oom", [*SEARCH_DP[:2], "{oom}:net", *SEARCH_DP[3:], "--prediction", "flow", "--out", OUT_JSON],
     "lower --samples"),
    # distill: output folder and device before the model
    ("distill-out-file", ["distill", "--model", TOY, "--table", "{ok}", "--steps", "1", "--out", "{afile}"],
     "existing file"),
    ("distill-out-empty", ["distill", "--model", TOY, "--table", "{ok}", "--steps", "1", "--out", ""], "empty"),
    ("distill-out-readonly", ["distill", "--model", TOY, "--table", "{ok}", "--steps", "1", "--out", "/sys/stp"],
     "cannot write"),
    ("distill-device-foo", ["distill", "--model", TOY, "--table", "{ok}", "--steps", "1", "--device", "foo",
                            "--out", "{d}/new/student"], "not a torch device"),
    # eval: the output folder before any model call
    ("eval-out-file", [*EVAL, "--out", "{afile}"], "is an existing file"),
    ("eval-out-table-file", [*EVAL, "--out", "{ok}"], "is an existing file"),
    ("eval-out-empty", [*EVAL, "--out", ""], "--out is empty"),
    ("eval-out-readonly", [*EVAL, "--out", "/sys/stepsmith_ev"], "cannot write"),
    ("eval-out-under-file", [*EVAL, "--out", "{afile}/ev"], "is a file"),
    # evolution options and checkpoints, before any model call
    ("evo-seed-negative", [*EVO, "--seed", "-1", "--out", OUT_JSON], "--seed must be an integer of at least 0"),
    ("evo-population-str", [*EVO, "--option", "population=ten", "--out", OUT_JSON], "`population` must be an integer"),
    ("evo-generations-0", [*EVO, "--option", "generations=0", "--out", OUT_JSON], "`generations` must be"),
    ("evo-elite-gt-pop", [*EVO, "--option", "population=4", "--option", "elite=9", "--out", OUT_JSON], "exceeds"),
    ("evo-p-mutation-2", [*EVO, "--option", "p_mutation=2", "--out", OUT_JSON], "probability"),
    ("evo-ckpt-list", [*EVO, "--option", "checkpoint={list}", "--out", OUT_JSON], "not an evolution checkpoint"),
    ("evo-ckpt-truncated", [*EVO, "--option", "checkpoint={evo_trunc}", "--out", OUT_JSON], "is corrupt"),
    ("evo-ckpt-population-str", [*EVO, "--option", "checkpoint={evo_rng}", "--out", OUT_JSON], "is corrupt"),
    ("evo-ckpt-table", [*EVO, "--option", "checkpoint={ok}", "--out", OUT_JSON], "not an evolution checkpoint"),
    ("evo-ckpt-other-search", [*EVO, "--option", "checkpoint={evo_other}", "--out", OUT_JSON], "another search"),
    ("evo-ckpt-dir", [*EVO, "--option", "checkpoint={tabledir}", "--out", OUT_JSON], "existing directory"),
    ("evo-ckpt-number", [*EVO, "--option", "checkpoint=5", "--out", OUT_JSON], "must be a file path"),
    # dp checkpoints, before any model call
    ("dp-ckpt-table", [*SEARCH_DP, "--option", "checkpoint={ok}", "--out", OUT_JSON], "not a checkpoint of method dp"),
    ("dp-ckpt-truncated", [*SEARCH_DP, "--option", "checkpoint={dp_trunc}", "--out", OUT_JSON], "is corrupt"),
    ("dp-ckpt-evolution", [*SEARCH_DP, "--option", "checkpoint={evo_other}", "--out", OUT_JSON], "not a checkpoint of method dp"),
    ("dp-ckpt-other-search", [*SEARCH_DP, "--option", "checkpoint={dp_other}", "--out", OUT_JSON], "another search"),
    ("dp-ckpt-old-version", [*SEARCH_DP, "--option", "checkpoint={dp_v0}", "--out", OUT_JSON], "version 0"),
    ("dp-ckpt-dir", [*SEARCH_DP, "--option", "checkpoint={tabledir}", "--out", OUT_JSON], "existing directory"),
    ("dp-ckpt-variant", [*SEARCH_DP, "--option", "variant=boss", "--option", "checkpoint={d}/new/c.pt", "--out",
                         OUT_JSON], "not resumable"),
    # the table's model, checked on every path (same override as pipeline_kwargs)
    ("sample-table-other-model", ["sample", "--model", "builtin:digits-flow", "--table", "{ok}", "--num", "1",
                                  "--out", OUT_PNG], "--allow-other-model"),
    ("eval-table-other-model", ["eval", "--model", "builtin:digits-flow", "--tables", "{ok}", "--num", "4",
                                "--out", "{d}/new/ev"], "--allow-other-model"),
    ("distill-conditional-without-classes", ["distill", "--model", "builtin:digits-cond", "--table", "{ok}", "--steps",
                                             "1", "--allow-other-model", "--out", "{d}/new/st"],
     "give the classes to sample"),
    ("distill-table-other-model", ["distill", "--model", "builtin:digits-flow", "--table", "{ok}", "--steps", "1",
                                   "--out", "{d}/new/st"], "--allow-other-model"),
    # --shape against the UNet config; scheduler configs read by their _class_name
    ("unet-shape-8", ["sample", "--model", "{ddpm}", "--shape", "1,8,8", "--nfe", "2", "--num", "1", "--out", OUT_PNG],
     "sample_size 16"),
    ("unet-shape-3ch", ["sample", "--model", "{ddpm}", "--shape", "3,16,16", "--nfe", "2", "--num", "1",
                        "--out", OUT_PNG], "in_channels 1"),
    ("unet-sched-table", ["sample", "--model", "{ddpm}", "--scheduler-config", "{ok}", "--nfe", "2", "--num", "1",
                          "--out", OUT_PNG], "timestep table"),
    ("model-vp-flow-sched", [*SAMPLE[:2], "{m}:net", *SAMPLE[3:], "--prediction", "epsilon", "--scheduler-config",
                             "{flow_sched}", "--out", OUT_PNG], "flow matching"),
    ("model-vp-table-sched", [*SAMPLE[:2], "{m}:net", *SAMPLE[3:], "--prediction", "epsilon", "--scheduler-config",
                              "{ok}", "--out", OUT_PNG], "timestep table"),
    ("model-vp-noclass-sched", [*SAMPLE[:2], "{m}:net", *SAMPLE[3:], "--prediction", "epsilon",
                                "--scheduler-config", "{noclass_sched}", "--out", OUT_PNG], "_class_name"),
    ("model-vp-pred-mismatch", [*SAMPLE[:2], "{m}:net", *SAMPLE[3:], "--prediction", "epsilon",
                                "--scheduler-config", "{v_sched}", "--out", OUT_PNG], "make them agree"),
]


def _fill(argv: list[str], fx: dict[str, str]) -> list[str]:
    return [a.format(**fx) for a in argv]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    return build_fixtures(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_case_is_one_line_exit_2(fx, capsys, argv, match):
    from schedules.cli import main

    before = sorted(p.name for p in Path(fx["d"]).rglob("*"))
    rc = main(_fill(argv, fx))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert sorted(p.name for p in Path(fx["d"]).rglob("*")) == before  # nothing written
    assert not Path("/sys/stepsmith_t.json").exists()
    assert not list(Path(fx["d"]).glob(".*partial*"))  # no half-built folder beside the fixtures


def test_sys_exit_in_a_model_file_is_exit_2_in_a_subprocess(fx):
    """The real process: a model file's sys.exit(0) must not end stepsmith with exit 0."""
    r = subprocess.run([sys.executable, "-m", "schedules.cli", *_fill(next(c[1] for c in CLI_CASES if c[0] == "model-sys-exit-0"), fx)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sys.exit(0)" in r.stderr, r.stderr


@pytest.mark.parametrize("exc,match", [
    (OSError(28, "No space left on device", "/data/t.json"), "No space left on device: /data/t.json"),
    (PermissionError(13, "Permission denied", "/data/t.json"), "Permission denied: /data/t.json"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "lower --num"),
    (MemoryError(), "lower --num"),
])
def test_os_and_allocation_errors_at_write_time_are_one_line(fx, capsys, monkeypatch, exc, match):
    import schedules.viz
    from schedules.cli import main

    def fail(*_a, **_k):
        raise exc

    monkeypatch.setattr(schedules.viz, "save_samples", fail)
    assert main(_fill([*SAMPLE, "--out", OUT_PNG], fx)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err


def test_a_bug_still_shows_its_traceback(fx, monkeypatch):
    import schedules.viz
    from schedules.cli import main

    monkeypatch.setattr(schedules.viz, "save_samples", lambda *_a, **_k: [][1])
    with pytest.raises(IndexError):
        main(_fill([*SAMPLE, "--out", OUT_PNG], fx))


def test_table_model_override_and_a_students_teacher(fx, tmp_path):
    """--allow-other-model samples anyway; a distilled folder takes its teacher's tables; names that are
    not local models are not compared."""
    from schedules.adapters import check_table_model
    from schedules.cli import main

    out = tmp_path / "g.png"
    assert main(["sample", "--model", "builtin:digits-flow", "--table", fx["ok"], "--num", "1", "--allow-other-model",
                 "--out", str(out)]) == 0 and out.is_file()
    student = tmp_path / "student"
    student.mkdir()
    (student / "distill.json").write_text(json.dumps({"load": {"teacher": TOY}}))
    check_table_model(TOY, str(student))
    with pytest.raises(StepsmithError, match="allow_other_model"):
        check_table_model("builtin:digits-flow", str(student))
    check_table_model("m", "builtin:digits-flow")


def test_odd_heun_nfe_still_searches(tmp_path):
    from schedules.cli import main

    assert main([*SEARCH[:-2], "--nfe", "3", "--solver", "heun", "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["nfe"] == 3


# --------------------------------------------------------------------------- interruptions


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


EVAL_KW = dict(methods=["uniform"], num=8, teacher_steps=2, grid=4, progress=False, batch_size=8)
KILL_SWEEP = """
import os, signal, sys
import torch
import eval.sweep as sw
sw.score_cell = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sw.run_sweep("builtin:toy2d-flow", out=sys.argv[1], nfe=[3], real=torch.randn(64, 2), **{kw})
"""


def test_eval_killed_into_an_existing_folder_keeps_the_old_report_whole(tmp_path, monkeypatch):
    """A real kill -9 mid-sweep: the old report and its grids stay as they were (the new teacher grid
    was drawn aside); the next run removes the killed run's temporary and replaces the old outputs."""
    import eval.sweep as sw

    monkeypatch.setattr(sw, "_versions", dict)  # package versions: not what is tested, and slow to import
    real = torch.randn(64, 2)
    ev = tmp_path / "ev"
    sw.run_sweep(TOY, out=ev, nfe=[2], real=real, **EVAL_KW)
    (ev / "notes.txt").write_text("mine")
    before = {p.relative_to(ev): p.read_bytes() for p in ev.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, "-c", KILL_SWEEP.format(kw=EVAL_KW), str(ev)], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr
    assert {p.relative_to(ev): p.read_bytes() for p in ev.rglob("*") if p.is_file()} == before
    assert len(list(tmp_path.glob(".ev.partial-*"))) == 1  # the killed run's grids, aside
    rep = sw.run_sweep(TOY, out=ev, nfe=[3], real=real, **EVAL_KW)
    assert not list(tmp_path.glob(".ev.partial-*"))
    assert (ev / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (ev / "grids").iterdir()) == sorted(
        Path(r["grid"]).name for r in [rep["teacher"], *rep["results"]])  # no grid of the old run
    assert json.loads((ev / "report.json").read_text())["results"][0]["nfe"] == 3


def test_eval_failure_leaves_no_folder(tmp_path, monkeypatch):
    import eval.sweep as sw

    def boom(*_a, **_k):
        raise StepsmithError("boom")

    monkeypatch.setattr(sw, "score_cell", boom)
    with pytest.raises(StepsmithError):
        sw.run_sweep(TOY, out=tmp_path / "ev", nfe=[2], real=torch.randn(64, 2), **EVAL_KW)
    assert list(tmp_path.iterdir()) == []


def test_resumed_distill_cuts_the_loss_log_adds_earlier_cost_and_cleans_export_temporaries(tmp_path):
    from distill.trainer import DistillConfig, distill
    from schedules import load_model
    from schedules.baselines import uniform

    toy = load_model(TOY)
    cfg = DistillConfig(method="boss", steps=6, checkpoint_every=2, log_every=1, eval_every=3, pairs=64,
                        teacher_steps=8, batch_size=32, progress=False)
    out = tmp_path / "s"
    assert distill(toy, uniform(toy, 2), cfg, out, stop_after=5) is None
    work = tmp_path / "s.work"
    import shutil

    shutil.rmtree(work / "ckpt-00000005")  # killed after the step-4 checkpoint: rows 5 are in the log
    earlier = json.loads((work / "ckpt-00000004" / "meta.json").read_text())["cost"]
    assert earlier["train_seconds"] > 0
    stale = tmp_path / f".s.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    res = distill(toy, uniform(toy, 2), cfg, out, resume=True)
    steps = [ln.split("\t")[0] for ln in (out / "loss.log").read_text().splitlines()[1:]]
    assert steps == ["0", "1", "2", "3", "4", "5", "6"]
    assert res.info["resumed_from_step"] == 4 and res.info["train_seconds"] >= earlier["train_seconds"]
    assert not stale.exists() and not work.exists()


def test_resumed_evolution_records_the_whole_cost(tmp_path):
    from schedules import load_model
    from schedules.search import make_table

    toy = load_model(TOY)
    opts = dict(samples=4, grid=8, population=4, generations=3, elite=2)

    class Killed(Exception):
        pass

    def kill(gen):
        if gen == 1:
            raise Killed

    ck = tmp_path / "evo.json"
    calls0 = toy.calls
    with pytest.raises(Killed):
        make_table(toy, "evolution", 3, checkpoint=str(ck), on_generation=kill, **opts)
    first = toy.calls - calls0
    resumed = make_table(toy, "evolution", 3, checkpoint=str(ck), **opts)
    total = toy.calls - calls0
    prov = resumed.provenance
    assert prov["resumed"]["model_calls"] == first and prov["model_calls"] == total > first


# --------------------------------------------------------------------------- Python API


def _flow_table(solver="euler"):
    from schedules.conventions import FlowConvention
    from schedules.table import TimestepTable

    return TimestepTable.from_sigmas([1.0, 0.5, 0.0], convention=FlowConvention(1.0), prediction="flow",
                                     solver=solver, method="t", model="m")


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def _vp_pair():
    """A VP table whose timesteps were edited away from its sigmas, and a scheduler with its ᾱ."""
    from diffusers import EulerDiscreteScheduler

    from schedules.conventions import VPConvention
    from schedules.table import TimestepTable

    conv = VPConvention.default()
    sig = conv.sigma_from_model_time(torch.tensor([900.0, 400.0], dtype=torch.float64)).tolist() + [0.0]
    good = TimestepTable.from_sigmas(sig, convention=conv, prediction="epsilon", solver="ddim", method="t", model="m")
    bad = {**good.to_dict(), "timesteps": [800.0, 400.0]}
    sch = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return good, bad, sch


class _FakePipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.components = {"scheduler": scheduler}


API_CASES = [
    ("load_table(None)", lambda: __import__("schedules").load_table(None), "str or Path"),
    ("load_table('')", lambda: __import__("schedules").load_table(""), "str or Path"),
    ("load_table(3)", lambda: __import__("schedules").load_table(3), "got int 3"),
    ("apply_table(table, None)", lambda: __import__("schedules").apply_table(_flow_table(), None),
     "`scheduler` must be a diffusers scheduler"),
    ("apply_table(table, pipe)", lambda: __import__("schedules").apply_table(_flow_table(),
                                                                             _FakePipe(_flow_scheduler())),
     "pass pipe.scheduler"),
    ("apply_table(table, class)", lambda: __import__("schedules").apply_table(
        _flow_table(), type(_flow_scheduler())), "pass an instance"),
    ("apply_table(42, sch)", lambda: __import__("schedules").apply_table(42, _flow_scheduler()), "`table` must be"),
    ("apply_table(missing.json, sch)", lambda: __import__("schedules").apply_table("/nonexistent/t.json",
                                                                                   _flow_scheduler()),
     "does not exist"),
    ("pipeline_kwargs(table, None)", lambda: __import__("schedules").pipeline_kwargs(_flow_table(), None),
     "`pipe` must be a diffusers pipeline"),
    ("pipeline_kwargs(table, sch)", lambda: __import__("schedules").pipeline_kwargs(_flow_table(),
                                                                                    _flow_scheduler()),
     "apply_table(table, scheduler)"),
    ("pipeline_kwargs(bad dict, pipe)", lambda: __import__("schedules").pipeline_kwargs({"sigmas": [1, 0]},
                                                                                        _FakePipe(None)),
     "format"),
    ("pipeline_kwargs([..], pipe)", lambda: __import__("schedules").pipeline_kwargs([1.0, 0.0], _FakePipe(None)),
     "`table` must be"),
    ("load_model(None)", lambda: __import__("schedules").load_model(None), "`spec` must be"),
    ("load_model(42)", lambda: __import__("schedules").load_model(42), "`spec` must be"),
    ("load_model('')", lambda: __import__("schedules").load_model(""), "`spec` must be"),
    ("from_dict steps '4'", lambda: __import__("schedules").TimestepTable.from_dict(
        {**_flow_table().to_dict(), "steps": "4"}), "`steps` must be an integer, got str '4'"),
    ("from_dict sigmas str", lambda: __import__("schedules").TimestepTable.from_dict(
        {**_flow_table().to_dict(), "sigmas": "1,0"}), "`sigmas` must be a list of numbers"),
    ("from_dict objective str", lambda: __import__("schedules").TimestepTable.from_dict(
        {**_flow_table().to_dict(), "objective": "0.1"}), "`objective` must be a number"),
    ("TimestepTable(sigmas=[None])", lambda: __import__("schedules").TimestepTable(
        sigmas=[1.0, None], timesteps=[1.0], solver="euler", prediction="flow", convention="flow", method="t",
        model="m"), "`sigmas` must be a list of numbers"),
    ("vp timesteps ≠ sigmas (from_dict)", lambda: __import__("schedules").TimestepTable.from_dict(_vp_pair()[1]),
     "timestep 800 at index 0 disagrees with sigma"),
    ("vp timesteps ≠ sigmas (apply_table)", lambda: __import__("schedules").apply_table(_vp_pair()[1], _vp_pair()[2]),
     "disagrees with sigma"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_misuse_raises_stepsmith_error(call, match):
    with pytest.raises(StepsmithError) as info:
        call()
    assert match in str(info.value)


def test_api_accepts_paths_and_dicts(tmp_path):
    from schedules import apply_table, load_model, load_table
    from schedules.embedded import embedded_path

    table = _flow_table()
    p = table.save(tmp_path / "t.json")
    assert load_table(str(p)) == table
    for given in (p, str(p), table.to_dict()):
        sch = apply_table(given, _flow_scheduler())
        assert sch.sigmas.tolist() == pytest.approx(table.sigmas, abs=1e-6)
    model = load_model(Path(embedded_path("digits-flow")), probe=False)
    assert model.convention.name == "flow"


def test_vp_table_with_matching_timesteps_still_applies():
    from schedules import apply_table

    good, _bad, sch = _vp_pair()
    assert [float(t) for t in apply_table(good, sch, swap=True).timesteps] == pytest.approx([900.0, 400.0], abs=1e-3)


# --------------------------------------------------------------------------- before/after counting


def _classify(case: tuple[str, list[str], str], fx: dict[str, str], python: str, cwd: str) -> str:
    """'clear' (exit 2, one line), 'traceback', 'silent' (exit 0) or 'other' for one corpus case."""
    before = sorted(str(p) for p in Path(fx["d"]).rglob("*"))
    r = subprocess.run([python, "-m", "schedules.cli", *_fill(case[1], fx)], capture_output=True, text=True,
                       cwd=cwd, env={**os.environ, "PYTHONPATH": cwd, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    wrote = sorted(str(p) for p in Path(fx["d"]).rglob("*")) != before
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    if "Traceback" in r.stderr:
        kind = "traceback"
    elif r.returncode == 0:
        kind = "silent"
    elif r.returncode == 2 and len(lines) == 1:
        kind = "clear"
    else:
        kind = f"other(rc={r.returncode})"
    return kind + ("+wrote" if wrote else "")


if __name__ == "__main__":  # python tests/test_hostile.py [TREE]: count the corpus against a checkout
    import tempfile
    from collections import Counter

    tree = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1])
    tally: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = build_fixtures(Path(tmp))
        for c in CLI_CASES:
            kind = _classify(c, fixtures, sys.executable, tree)
            tally[kind] += 1
            print(f"{c[0]:28s} {kind}", flush=True)
            for p in Path(tmp, "new").glob("*"):
                p.unlink() if p.is_file() else None
    print(json.dumps(dict(tally)))
