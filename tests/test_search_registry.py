"""make_table's wiring: methods are registered callables, options are checked against signatures before
the call, internal TypeErrors are not disguised, errors name Python parameters and the CLI maps them to flags."""

from __future__ import annotations

import pytest

import schedules.search as search
from schedules.baselines import uniform
from schedules.cli import main
from schedules.io import StepsmithError
from schedules.search import SEARCHED, make_table, method_options, register
from schedules.search.toys import gaussian_adapter

AD = gaussian_adapter("flow", 0.3)


@pytest.fixture
def registered():
    """Register test methods and remove them afterwards."""
    names = []

    def add(name, fn):
        register(name, fn)
        names.append(name)

    yield add
    for n in names:
        SEARCHED.pop(n, None)


def test_searched_methods_are_callables():
    from schedules.search.ays import ays_table
    from schedules.search.dp_method import dp_table
    from schedules.search.evolution import evolution_table

    assert SEARCHED["dp"] is dp_table and SEARCHED["evolution"] is evolution_table and SEARCHED["ays"] is ays_table
    assert "mode" in method_options("dp") and "samples" not in method_options("dp")
    assert method_options("karras") == ("rho",) and method_options("uniform") == ()


@pytest.mark.parametrize("method,bad,listed", [("dp", "mdoe", "`mode`"), ("karras", "rh0", "`rho`"),
                                               ("uniform", "rho", "none")])
def test_unknown_option_lists_the_valid_ones(method, bad, listed):
    with pytest.raises(StepsmithError, match=f"does not take `{bad}`; its options are .*{listed}") as e:
        make_table(AD, method, 3, samples=2, **{bad: 1})
    assert e.value.param == bad


def test_typeerror_inside_a_method_propagates(registered):
    # the parameters are the search-method interface make_table checks, unused by this stub
    def buggy(adapter, nfe, solver="euler", *, samples, seed, progress, depth: int = 1):  # noqa: ARG001
        return len(3)  # a real bug: TypeError from inside the method

    registered("buggy", buggy)
    with pytest.raises(TypeError, match="has no len"):
        make_table(AD, "buggy", 3, depth=2)
    with pytest.raises(StepsmithError, match="`width`"):
        make_table(AD, "buggy", 3, width=2)


def test_registered_method_runs_with_provenance(registered):
    def fixed(adapter, nfe, solver="euler", *, samples, seed, progress, scale: float = 1.0):  # noqa: ARG001 (interface)
        assert samples == 5 and seed == 7 and progress is False and scale == 2.0
        return uniform(adapter, nfe, solver)

    registered("fixed", fixed)
    assert "fixed" in search.METHODS
    t = make_table(AD, "fixed", 3, samples=5, seed=7, scale=2.0)
    assert t.steps == 3 and t.provenance["samples"] == 5 and t.provenance["seed"] == 7
    with pytest.raises(StepsmithError, match="baseline"):
        register("uniform", fixed)
    with pytest.raises(StepsmithError, match="`progress`"):
        register("bad", lambda adapter, nfe, solver, *, samples, seed: None)  # noqa: ARG005 (the interface under test)


def test_errors_name_python_parameters():
    for kw, param in [({"samples": 0}, "samples"), ({"grid": 1}, "grid"), ({"mode": "x"}, "mode")]:
        with pytest.raises(StepsmithError, match=f"`{param}`") as e:
            make_table(AD, "dp", 3, **kw)
        assert e.value.param == param
    with pytest.raises(StepsmithError, match="`nfe` must be a positive integer") as e:
        make_table(AD, "uniform", 0)
    assert e.value.param == "nfe"


@pytest.mark.parametrize("extra,says", [
    (["--nfe", "3", "--samples", "0"], "--samples must be at least 1"),
    (["--nfe", "0"], "--nfe must be a positive integer"),
    (["--nfe", "3", "--grid", "1"], "--grid must be at least 2"),
    (["--nfe", "3", "--method", "uniform", "--grid", "5"], "baseline 'uniform' does not take --grid"),
    (["--nfe", "3", "--option", "mdoe=teacher"], "does not take `mdoe`; its options are `mode`, --grid"),
])
def test_search_cli_says_flags(tmp_path, capsys, extra, says):
    rc = main(["search", "--model", "builtin:toy2d-flow", "--no-progress", "--out", str(tmp_path / "t.json"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "`samples`" not in err and not (tmp_path / "t.json").exists()


def test_search_cli_records_the_invocation(tmp_path, capsys):
    from schedules.table import load_table

    out = tmp_path / "k.json"
    argv = ["search", "--model", "builtin:toy2d-flow", "--method", "karras", "--nfe", "4", "--option", "rho=5",
            "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert load_table(out).provenance["command"] == "stepsmith " + " ".join(argv)
