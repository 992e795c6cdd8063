"""Atomic file output and safe weight loading.

Every file stepsmith writes (tables, reports, checkpoints, weights) goes through
:func:`atomic_write`: the bytes land in a temporary file in the same folder, are
flushed to disk, and only then renamed over the target. An interrupted run
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class StepsmithError(ValueError):
    """A user-facing error: the message says what went wrong and what to do.

    Library code names *Python* parameters in backticks, e.g. ``"`samples` must be at least 1"``, and
    records the one at fault in ``param``. The CLI prints the message on one line, with each backticked
    name that is one of its options replaced by the flag (``--samples must be at least 1``), and exits
    with code 2.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically; load it back with :func:`safe_torch_load`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a torch file without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StepsmithError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # corrupt or foreign file
        raise StepsmithError(
            f"cannot read checkpoint {path} ({type(exc).__name__}): the file is corrupt or "
            "was not written by stepsmith; delete it or start without --resume"
        ) from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error for missing or corrupt files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StepsmithError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise StepsmithError(
            f"cannot read weights {path} ({type(exc).__name__}: {exc}); the file is corrupt "
            "or not safetensors — re-export it with safetensors.torch.save_file"
        ) from None


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: str | os.PathLike | None, *, param: str = "out", folder: bool = False,
                      suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output path that cannot be written, before any compute is spent on it.

    A file output must not be empty or an existing directory, must end in one of ``suffixes``
    (when given), and its nearest existing parent folder must be a writable directory. A folder
    output (``folder=True``) must not be an existing file.
    """
    if path is None or not str(path).strip():
        raise StepsmithError(f"`{param}` is empty; give the {'folder' if folder else 'file'} to write", param=param)
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise StepsmithError(f"`{param}` {path} is an existing file; give a folder path", param=param)
    if not folder and path.is_dir():
        raise StepsmithError(f"`{param}` {path} is an existing directory; give a file path "
                             f"(e.g. {path / ('out' + (suffixes[0] if suffixes else ''))})", param=param)
    if suffixes and path.suffix.lower() not in suffixes:
        raise StepsmithError(f"`{param}` {path} must end in {' or '.join(suffixes)} (that is the format written), "
                             f"got {path.suffix or 'no suffix'!r}", param=param)
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise StepsmithError(f"`{param}` {path}: {parent} is a file, not a folder", param=param)
    try:  # a real probe: permission bits, read-only mounts and root all answer the same way
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise StepsmithError(f"`{param}` {path}: cannot write in {parent} ({exc.strerror or exc})", param=param) from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike, tags: tuple[str, ...]) -> list[Path]:
    """Delete ``.<name>.<tag>-<pid>`` temporaries beside ``path`` left by killed runs.

    Multi-file outputs are built in such a folder and renamed into place; a run killed before the
    rename leaves it behind. Only those whose process is gone are removed (a live run keeps its own).
    """
    import shutil

    path = Path(path)
    gone = []
    if not path.parent.is_dir():
        return gone
    for tag in tags:
        for p in path.parent.glob(f".{path.name}.{tag}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone
