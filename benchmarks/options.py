"""Command-line options generated from a config dataclass, and the command line that rebuilds one.

A benchmark is a function of a config dataclass; its ``python -m benchmarks.X`` entry point
reads the same fields from flags (``batch_size`` → ``--batch-size``), so defaults are stated
once, in the dataclass. :func:`argv_for` turns a config back into the flags that reproduce it,
which is what results files record as their command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from typing import Any


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls``; the type follows the field's default value.

    Tuples take one or more values (``--nfe 1 2 4``), dicts take JSON, everything else its
    default's type. Help text comes from ``field(metadata={"help": ...})``.
    """
    for f in dataclasses.fields(cls):
        default = _default(f)
        kw: dict[str, Any] = {"default": default, "help": f.metadata.get("help")}
        if isinstance(default, tuple):
            kw.update(nargs="+", type=type(default[0]) if default else str)
        elif isinstance(default, dict):
            kw.update(type=json.loads)
        else:
            kw.update(type=type(default))
        parser.add_argument(flag(f.name), dest=f.name, **kw)


def config_from_args(cls: type, args: argparse.Namespace):
    """The ``cls`` instance the flags of :func:`add_config_args` describe."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_from_dict(cls: type, values: dict[str, Any]):
    """Rebuild ``cls`` from its ``asdict`` form as read back from JSON (lists → tuples, unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def argv_for(config, always: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild ``config`` from the defaults: one per field that differs from its
    default, plus the fields named in ``always`` (stated for the reader even at their default)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == _default(f) and f.name not in always:
            continue
        if isinstance(value, tuple):
            argv += [flag(f.name), *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag(f.name), json.dumps(value)]
        else:
            argv += [flag(f.name), str(value)]
    return argv


def command_for(module: str, config, *extra: str, always: tuple[str, ...] = ()) -> str:
    """A shell command that reruns ``config`` through ``python -m module`` (``extra``: more flags)."""
    return shlex.join(["python", "-m", module, *argv_for(config, always), *extra])


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
