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


# ---------------------------------------------------------------------------------------------------------------
# user data files: one loader for `stepsmith eval --real`, `search --method ays --data`, `search --objective data-*`

SAMPLE_KEYS = ("images", "samples", "x", "data", "real")  # tensor names a multi-tensor safetensors file may use
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I")  # PIL modes read as one channel (plus every "I;16*")


def check_sample_tensor(x: torch.Tensor, *, shape: tuple[int, ...] | None = None, min_count: int | None = None,
                        param: str = "data", source: str | None = None, asked_by: str = "the caller") -> torch.Tensor:
    """Refuse samples [N, ...] that do not fit: not a tensor, per-sample shape other than ``shape``, fewer than
    ``min_count`` samples (at least 1), NaN/Inf values. Returns ``x`` as float32 on the CPU.

    Each refusal is one StepsmithError naming ``param`` (``source`` says where the samples came from,
    ``asked_by`` who wants ``min_count`` of them)."""
    where = f"`{param}`" + (f" {source}" if source else "")
    if not isinstance(x, torch.Tensor):
        raise StepsmithError(f"{where}: expected a tensor [N, ...] of samples, got {type(x).__name__}", param=param)
    if x.ndim < 1:
        raise StepsmithError(f"{where} is a single number; give a tensor [N, ...] of samples", param=param)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise StepsmithError(f"{where} has samples of shape {list(x.shape[1:])} but the model makes {list(shape)}; "
                             "give samples of the model's shape (same size and channel count)", param=param)
    need = max(1, min_count or 1)
    if x.shape[0] < need:
        raise StepsmithError(f"{where} holds {x.shape[0]} sample{'' if x.shape[0] == 1 else 's'} but {asked_by} asks "
                             f"for {need}; give more samples or ask for fewer", param=param)
    x = x.float()
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise StepsmithError(f"{where} holds NaN/Inf values in {int((~finite).sum())} of {x.shape[0]} samples; "
                             "drop or fix those samples", param=param)
    return x.detach().cpu()


def load_samples(path: str | os.PathLike, *, shape: tuple[int, ...] | None = None, min_count: int | None = None,
                 param: str = "data", asked_by: str = "the caller") -> torch.Tensor:
    """Samples [N, ...] from a user's data file: a safetensors file or a folder of PNG/JPEG images.

    * **safetensors** (read with ``safetensors``, never unpickled): the file's one tensor; a file with several
      tensors must hold exactly one named ``images``, ``samples``, ``x``, ``data`` or ``real`` (:data:`SAMPLE_KEYS`),
      which is used. The values are taken as they are (they must already be in the model's range and shape).
    * **image folder**: every ``.png`` / ``.jpg`` / ``.jpeg`` file directly in it (sorted by name; hidden files and
      subfolders ignored), all of one size. Values are scaled to **[-1, 1]** (0 → -1, full scale → 1; 16-bit PNGs
      use their 16 bits). Channels: ``shape[0]`` of 1 reads grayscale (PIL's ITU-R 601-2 luma), 3 reads RGB
      (grayscale replicated); alpha is dropped, not composited. Without ``shape``: one channel when every image is
      grayscale, else RGB. **Resampling**: with ``shape`` [C, H, W] and images of another size, each image is
      centre-cropped to the aspect ratio H:W and resized to H×W with PIL's bicubic filter (antialiased when
      downsampling), per channel in float so nothing is rounded twice — the resize clean-FID (Parmar et al. 2022,
      "On Aliased Resizing and Surprising Subtleties in GAN Evaluation") recommends for FID.

    Then :func:`check_sample_tensor`: the per-sample shape must equal ``shape`` (when given), there must be
    ``min_count`` samples (at least 1), and no NaN/Inf. Every bad input is one StepsmithError naming ``param``.
    """
    p = Path(path)
    if not str(path).strip() or not p.exists():
        what = "is empty" if not str(path).strip() else f"{path}: no such file or folder"
        raise StepsmithError(f"`{param}` {what}; give a .safetensors file or a folder of PNG/JPEG images", param=param)
    if p.is_dir():
        x = _load_image_folder(p, shape, param)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        raise StepsmithError(f"`{param}` {p} is one image; give the folder of images (or a .safetensors file)",
                             param=param)
    else:
        x = _load_sample_file(p, param)
    return check_sample_tensor(x, shape=shape, min_count=min_count, param=param, source=str(p), asked_by=asked_by)


def _load_sample_file(p: Path, param: str) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p))
    except Exception as exc:  # not safetensors (a pickle, an archive, ...) or truncated
        raise StepsmithError(f"`{param}` {p} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                             "save the samples with safetensors.torch.save_file({'x': tensor}, path)", param=param) from None
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    named = [k for k in SAMPLE_KEYS if k in tensors]
    if len(named) != 1:
        raise StepsmithError(f"`{param}` {p} holds tensors {sorted(tensors)}; keep one tensor or name exactly one of "
                             f"them {', '.join(SAMPLE_KEYS)}", param=param)
    return tensors[named[0]]


def _load_image_folder(folder: Path, shape: tuple[int, ...] | None, param: str) -> torch.Tensor:
    import numpy as np

    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StepsmithError(f"`{param}` folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images", param=param)
    if shape is not None and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise StepsmithError(f"`{param}` {folder} is a folder of images but the model makes samples of shape "
                             f"{list(shape)} (images fit [1 or 3, H, W]); give a .safetensors file of the model's "
                             "samples", param=param)
    sizes, modes = set(), set()
    for f in files:  # headers only: sizes and modes before any pixels are decoded (one file open at a time)
        with _open_image(f, param) as im:
            sizes.add(im.size)
            modes.add(im.mode)
    if len(sizes) > 1:
        raise StepsmithError(f"`{param}` folder {folder}: the images have different sizes (width × height "
                             f"{sorted(sizes)[:3]}); resize them all to one size", param=param)
    gray = all(_is_gray(m) for m in modes) if shape is None else shape[0] == 1
    hw = None if shape is None else (int(shape[1]), int(shape[2]))
    arrs = []
    for f in files:
        with _open_image(f, param) as im:
            try:
                arrs.append(_image_array(im, gray, hw))
            except OSError as exc:  # a truncated file: the header reads, the pixels do not
                raise StepsmithError(f"`{param}` {f} is not a readable image ({exc}); remove or re-save it",
                                     param=param) from None
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def _open_image(f: Path, param: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(f)
    except (UnidentifiedImageError, OSError) as exc:
        raise StepsmithError(f"`{param}` {f} is not a readable image ({exc}); remove or re-save it", param=param) from None


def _is_gray(mode: str) -> bool:
    return mode in _GRAY_MODES or mode.startswith("I;16")


def _image_array(im, gray: bool, hw: tuple[int, int] | None):
    """One image as float32 [H, W, C] on the 0…255 scale (16-bit values divided by 257), cropped and resized to
    ``hw`` (height, width) when given and different (see :func:`load_samples`)."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit PNG: PIL's convert("L") would clip at 255
        a = np.asarray(im, dtype=np.float32)[..., None] / 257.0
        if not gray:
            a = np.repeat(a, 3, axis=2)
    else:
        a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32).reshape(im.height, im.width, -1)
    if hw is None or a.shape[:2] == hw:
        return a
    h, w = a.shape[:2]
    th, tw = hw
    if h * tw > w * th:  # too tall: crop rows
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    a = a[top:top + ch, left:left + cw]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize((tw, th), Image.Resampling.BICUBIC))
           for c in range(a.shape[2])]
    return np.clip(np.stack(out, axis=2), 0.0, 255.0)
