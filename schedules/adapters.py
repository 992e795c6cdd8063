"""Model adapters: one denoiser interface for every model.

:func:`load_model` turns a model spec into a :class:`ModelAdapter`:

* ``builtin:NAME`` — an embedded default model (``toy2d-flow``, ``digits-flow``,
  ``digits-ddpm``, the class-conditional ``digits-cond``);
* a diffusers folder — a pipeline folder with ``model_index.json`` (``unet`` or
  ``transformer`` plus ``scheduler``), or a model folder with ``config.json`` and a
  scheduler config (``scheduler/`` beside or inside it, or ``scheduler_config=``). The
  convention, ``prediction_type``, betas and FlowMatch ``shift`` are read from the
  scheduler config, never guessed;
* a pipeline folder whose ``model_index.json`` names a registered pipeline class
  (:data:`schedules.pipeline_adapters.PIPELINE_ADAPTERS`: SD, SDXL, SD3, Flux, DiT) — loaded
  with ``DiffusionPipeline.from_pretrained`` and conditioned by its pipeline adapter;
* ``path/to/file.py:attr`` — any torch module (or a zero-argument function returning one)
  called as ``module(x, t)`` with ``t`` a float tensor [B]. ``prediction="flow"`` means the
  diffusers FlowMatch convention with t = σ ∈ [0, 1]; ``epsilon|v|x0`` mean VP with t the
  discrete timestep and ᾱ from ``scheduler_config`` (default: DDPM linear betas
  1e-4..0.02, T=1000).

Search, sampling, evaluation and distillation all go through the same adapter:
:meth:`ModelAdapter.denoise` for samplers, :meth:`ModelAdapter.model_output` (with
gradients) for trainers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from schedules.conventions import PREDICTIONS, Convention, FlowConvention, VPConvention, prediction_to_x0
from schedules.embedded import BUILTIN_MODELS, FEATURE_NETWORKS, embedded_path
from schedules.io import StepsmithError, load_safetensors

_DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def _default_call(module: nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = module(x, t, **kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@dataclass(eq=False)
class ModelAdapter:
    """A network plus everything needed to read its output as a denoiser.

    ``model_kwargs`` are passed to every network call (e.g. fixed prompt embeddings for
    conditional models driven from Python).
    """

    module: nn.Module
    convention: Convention
    prediction: str
    sample_shape: tuple[int, ...]
    name: str
    scheduler_config: dict[str, Any] | None = None
    call: Callable[..., torch.Tensor] = _default_call
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    calls: int = 0  # batched network evaluations so far (for honest cost reports)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS[self.convention.name]:
            raise StepsmithError(
                f"prediction {self.prediction!r} does not fit a {self.convention.name} model; "
                f"use one of {', '.join(PREDICTIONS[self.convention.name])}"
            )

    @property
    def device(self) -> torch.device:
        try:
            return next(self.module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.module.parameters()).dtype
        except StopIteration:
            return torch.float32

    def noise(self, n: int, seed: int | torch.Generator) -> torch.Tensor:
        """Initial noise for ``n`` samples, reproducible from ``seed`` (drawn on the CPU)."""
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        x = torch.randn((n, *self.sample_shape), generator=gen, dtype=torch.float32)
        return x.to(device=self.device, dtype=self.dtype)

    def model_output(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The raw network output at native sigmas ``s`` [B] (keeps gradients)."""
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        t = self.convention.model_time(s.to(torch.float64)).to(device=x.device, dtype=torch.float32)
        out = self.network(x, t)
        self.calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise StepsmithError(
                f"{self.name}: network returned {got} for input {list(x.shape)}; it must return a tensor "
                "of the input's shape — check --shape and --prediction"
            )
        if not torch.isfinite(out).all():
            raise StepsmithError(
                f"{self.name}: network returned NaN/Inf at σ={float(s[0]):.4g} (timestep {float(t[0]):.4g}); "
                "check the weights, the dtype (try float32) and the time convention (--prediction)"
            )
        return out

    def network(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One network evaluation at model times ``t`` (conditional adapters add their conditions here)."""
        return self.call(self.module, x, t, **self.model_kwargs)

    def denoise(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x0 estimate at native sigmas ``s`` [B]."""
        out = self.model_output(x, s)
        sb = s.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return prediction_to_x0(self.convention, self.prediction, x, sb, out)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "convention": self.convention.name, "prediction": self.prediction,
                "sample_shape": list(self.sample_shape), **self.convention.config()}


# --------------------------------------------------------------------------- loading


def parse_shape(shape: str | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    if shape is None or isinstance(shape, tuple):
        return shape
    if isinstance(shape, list):
        return tuple(shape)
    try:
        dims = tuple(int(v) for v in str(shape).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise StepsmithError(f"--shape {shape!r} is not a comma-separated list of sizes, e.g. 2 or 1,16,16") from None
    if not dims or any(d < 1 for d in dims):
        raise StepsmithError(f"--shape {shape!r} must list positive sizes, e.g. 2 or 1,16,16")
    return dims


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise StepsmithError(f"missing {what}: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StepsmithError(f"{what} {path} is not valid JSON ({exc})") from None


def _scheduler_config_file(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    raise StepsmithError(f"no scheduler_config.json in {path}; pass --scheduler-config DIR holding one")


def read_scheduler_config(path: Path) -> dict:
    """A diffusers scheduler config, read by its ``_class_name`` (a timestep table or any other JSON is
    refused rather than read as DDPM-linear betas)."""
    cfg = _read_json(path, "scheduler config")
    if isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("stepsmith.schedule"):
        raise StepsmithError(f"`scheduler_config` {path} is a stepsmith timestep table, not a diffusers scheduler "
                             "config; pass it as --table", param="scheduler_config")
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if not isinstance(cls, str) or not cls.endswith("Scheduler"):
        raise StepsmithError(f"`scheduler_config` {path} has no diffusers scheduler `_class_name` (got {cls!r}); give "
                             "the scheduler_config.json of the model's scheduler", param="scheduler_config")
    return cfg


def _check_prediction(cfg: dict, prediction: str, path: Path) -> VPConvention:
    """The VP convention of ``cfg`` for a file model with ``prediction``; refused when they disagree."""
    conv, pred = convention_from_scheduler_config(cfg)
    if conv.name == "flow":
        raise StepsmithError(f"`scheduler_config` {path} is a {cfg['_class_name']} (flow matching) config but "
                             f"`prediction` is {prediction!r}; pass `prediction` flow without it, or a VP scheduler "
                             "config", param="scheduler_config")
    if "prediction_type" in cfg and pred != prediction:
        raise StepsmithError(f"`scheduler_config` {path} says prediction {pred!r} but `prediction` is "
                             f"{prediction!r}; make them agree", param="scheduler_config")
    return conv


def convention_from_scheduler_config(cfg: dict) -> tuple[Convention, str]:
    """(convention, prediction) exactly as a diffusers scheduler config describes them."""
    cls = cfg.get("_class_name", "")
    if "FlowMatch" in cls:
        return FlowConvention(time_scale=float(cfg.get("num_train_timesteps", 1000))), "flow"
    if cfg.get("use_flow_sigmas"):
        raise StepsmithError(f"{cls} with use_flow_sigmas: read it as a FlowMatch model (FlowMatchEulerDiscreteScheduler config)")
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in _DIFFUSERS_PREDICTION or pt == "flow_prediction":
        raise StepsmithError(f"scheduler config has prediction_type {pt!r}; supported: epsilon, v_prediction, sample")
    return VPConvention.from_scheduler_config(cfg), _DIFFUSERS_PREDICTION[pt]


def _load_diffusers_module(folder: Path) -> nn.Module:
    import diffusers

    cfg = _read_json(folder / "config.json", "model config")
    cls_name = cfg.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise StepsmithError(f"{folder}/config.json names class {cls_name!r}, which diffusers does not have")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except OSError as exc:
        raise StepsmithError(
            f"cannot load {cls_name} weights from {folder}: {str(exc).splitlines()[0]} — stepsmith loads "
            "safetensors only; convert .bin weights with save_pretrained(safe_serialization=True)"
        ) from None
    except Exception as exc:
        raise StepsmithError(f"cannot load {cls_name} from {folder} ({type(exc).__name__}: {exc}); weights corrupt?") from None


def _load_diffusers(folder: Path, name: str, prediction: str | None, shape, scheduler_config) -> ModelAdapter:
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = _read_json(index_file, "pipeline index")
        comp = next((c for c in ("unet", "transformer", "prior") if c in index), None)
        if comp is None:
            raise StepsmithError(f"{index_file} has no unet or transformer component; cannot find the denoiser")
        model_dir = folder / comp
        sched_file = _scheduler_config_file(Path(scheduler_config) if scheduler_config else folder / "scheduler")
    elif (folder / "config.json").is_file() or any((folder / c / "config.json").is_file() for c in ("unet", "transformer")):
        model_dir = folder if (folder / "config.json").is_file() else next(
            folder / c for c in ("unet", "transformer") if (folder / c / "config.json").is_file())
        if scheduler_config:
            sched_file = _scheduler_config_file(Path(scheduler_config))
        else:
            cands = [folder / "scheduler", folder.parent / "scheduler"]
            found = next((c for c in cands if (c / "scheduler_config.json").is_file()), None)
            if found is None:
                raise StepsmithError(
                    f"{folder} is a model folder without a scheduler config; pass --scheduler-config DIR "
                    "(a folder with scheduler_config.json) so the noise schedule is read, not guessed"
                )
            sched_file = found / "scheduler_config.json"
    else:
        raise StepsmithError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)")

    sched_cfg = read_scheduler_config(sched_file)
    conv, pred = convention_from_scheduler_config(sched_cfg)
    if prediction is not None and prediction != pred:
        raise StepsmithError(
            f"{sched_file} says prediction {pred!r} but --prediction {prediction!r} was given; drop --prediction "
            "or fix the scheduler config"
        )
    _check_supported(_read_json(model_dir / "config.json", "model config").get("_class_name"), folder,
                     index.get("_class_name") if index_file.is_file() else None)
    module = _load_diffusers_module(model_dir)
    mcfg = dict(module.config)
    if shape is not None:
        check_shape_fits(tuple(shape), mcfg, type(module).__name__)
    if shape is None:
        if "sample_size" in mcfg and "in_channels" in mcfg and type(module).__name__ in ("UNet2DModel",):
            size = mcfg["sample_size"]
            hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            shape = (mcfg["in_channels"], *hw)
        else:
            raise StepsmithError(f"cannot infer the sample shape of {type(module).__name__}; pass --shape C,H,W")
    return ModelAdapter(module=module.eval(), convention=conv, prediction=pred, sample_shape=tuple(shape),
                        name=name, scheduler_config=sched_cfg)


def check_shape_fits(shape: tuple[int, ...], mcfg: dict, cls: str) -> None:
    """Refuse a ``--shape`` that disagrees with the model config's ``in_channels`` / ``sample_size``."""
    size = mcfg.get("sample_size")
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    want = (mcfg.get("in_channels"), *hw)
    if None in want or tuple(shape) == want:
        return
    raise StepsmithError(f"`shape` {','.join(map(str, shape))} disagrees with the {cls} config (in_channels "
                         f"{want[0]}, sample_size {size}): it was trained on {','.join(map(str, want))} — drop "
                         "`shape`", param="shape")


def _check_supported(cls_name: Any, folder: Path, pipeline_cls: Any = None) -> None:
    """Refuse, before loading weights, a denoiser class the loader has no adapter for."""
    if cls_name == "UNet2DModel":
        return
    from schedules.pipeline_adapters import ADD_ONE, PIPELINE_ADAPTERS

    what = f"a {pipeline_cls} pipeline with a {cls_name}" if pipeline_cls else str(cls_name)
    raise StepsmithError(
        f"{folder}: {what} is not supported — stepsmith loads UNet2DModel folders (unconditional, or "
        "class-conditional with num_class_embeds: --classes / --guidance) and the pipeline folders of "
        f"{', '.join(sorted(PIPELINE_ADAPTERS))}; for another pipeline {ADD_ONE}"
    )


def registered_pipeline(folder: Path) -> str | None:
    """The pipeline class a folder's ``model_index.json`` names, when a pipeline adapter is registered for it."""
    from schedules.pipeline_adapters import PIPELINE_ADAPTERS

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return None
    cls = _read_json(index_file, "pipeline index").get("_class_name")
    return cls if cls in PIPELINE_ADAPTERS else None


def _load_pipeline(folder: Path, cls: str, name: str, conditioning, null_class: int | None, prediction: str | None,
                   shape, scheduler_config, pipeline_options: dict[str, Any]) -> ModelAdapter:
    """A registered pipeline folder → ``DiffusionPipeline.from_pretrained`` → its pipeline adapter."""
    if shape is not None:
        raise StepsmithError(f"{folder} is a {cls} folder: its latent shape follows from the image size — drop "
                             "`shape` and give --height / --width", param="shape")
    if scheduler_config:
        raise StepsmithError(f"{folder} is a {cls} folder: its scheduler config is read from the folder — drop "
                             "`scheduler_config`", param="scheduler_config")
    index = _read_json(folder / "model_index.json", "pipeline index")
    libs = {v[0] for v in index.values() if isinstance(v, list) and v and isinstance(v[0], str)}
    if "transformers" in libs and importlib.util.find_spec("transformers") is None:
        raise StepsmithError(f"{folder} is a {cls} folder whose text encoders need the `transformers` package, "
                             "which is not installed: pip install 'stepsmith[t2i]'")
    from diffusers import DiffusionPipeline

    from schedules.pipeline_adapters import adapter_from_pipeline, missing_text_components

    try:  # a text encoder saved as None (or removed) is passed as None: the pipeline adapter refuses it clearly
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True,
                                                 **dict.fromkeys(missing_text_components(folder, index)))
    except (OSError, ValueError) as exc:
        raise StepsmithError(
            f"cannot load the {cls} pipeline from {folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            " — stepsmith loads safetensors only; save the pipeline with save_pretrained(safe_serialization=True)"
        ) from None
    except ImportError as exc:
        raise StepsmithError(f"cannot load the {cls} pipeline from {folder}: {exc} (pip install 'stepsmith[t2i]')") from None
    pipe.set_progress_bar_config(disable=True)
    options = {**pipeline_options, **({} if null_class is None else {"null_class": null_class})}
    adapter = adapter_from_pipeline(pipe, conditioning, name=name, **options)
    if prediction is not None and prediction != adapter.prediction:
        raise StepsmithError(f"{folder}/scheduler says prediction {adapter.prediction!r} but `prediction` "
                             f"{prediction!r} was given; drop it", param="prediction")
    return adapter


def _import_file(file: Path):
    mod_name = f"stepsmith_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise StepsmithError(f"cannot import {file}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except SystemExit as exc:  # a training script without a main guard: not stepsmith's exit
        del sys.modules[mod_name]
        raise StepsmithError(f"importing {file} called sys.exit({exc.code}) (a script without "
                             "`if __name__ == \"__main__\":` guard?); move its top-level code under one") from None
    except Exception as exc:
        del sys.modules[mod_name]
        raise StepsmithError(f"importing {file} failed: {type(exc).__name__}: {exc}") from None
    return mod


def _load_callable(file: Path, attr: str, name: str, prediction: str | None, shape, scheduler_config,
                   weights) -> ModelAdapter:
    if not file.is_file():
        raise StepsmithError(f"model file {file} does not exist")
    mod = _import_file(file)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(k for k, v in vars(mod).items() if not k.startswith("_") and callable(v))
            raise StepsmithError(f"{file} has no attribute {attr!r}; callables there: {', '.join(found) or 'none'}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        module = obj
    elif callable(obj):
        try:
            module = obj()
        except Exception as exc:
            raise StepsmithError(f"{file}:{attr}() failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(module, nn.Module):
            raise StepsmithError(f"{file}:{attr}() returned {type(module).__name__}, not a torch nn.Module")
    else:
        raise StepsmithError(f"{file}:{attr} is a {type(obj).__name__}, not an nn.Module or a function returning one")
    if prediction is None:
        raise StepsmithError("a file.py:attr model needs --prediction: flow (FlowMatch, t=σ∈[0,1]) or epsilon|v|x0 (VP)")
    if prediction == "flow":
        if scheduler_config:
            raise StepsmithError("`scheduler_config` sets VP betas for `prediction` epsilon|v|x0; a flow model "
                                 "(t = σ ∈ [0, 1]) takes none — drop it", param="scheduler_config")
        conv: Convention = FlowConvention(time_scale=1.0)
        sched_cfg = None
    elif prediction in PREDICTIONS["vp"]:
        if scheduler_config:
            sched_file = _scheduler_config_file(Path(scheduler_config))
            sched_cfg = read_scheduler_config(sched_file)
            conv = _check_prediction(sched_cfg, prediction, sched_file)
        else:
            conv, sched_cfg = VPConvention.default(), None
    else:
        raise StepsmithError(f"unknown --prediction {prediction!r}; use flow, epsilon, v or x0")
    if shape is None:
        shape = getattr(module, "sample_shape", None)
        if shape is None:
            raise StepsmithError(f"cannot infer the sample shape of {file}:{attr}; pass --shape (e.g. 2 or 1,16,16)")
    if weights is not None:
        load_state_dict(module, load_safetensors(weights), str(weights))
    return ModelAdapter(module=module.eval(), convention=conv, prediction=prediction, sample_shape=tuple(shape),
                        name=name, scheduler_config=sched_cfg)


def local_model_path(spec: str | None) -> Path | None:
    """The folder a builtin model or a model-folder spec names (``None`` for other specs)."""
    if not spec or not isinstance(spec, str):
        return None
    if spec.startswith("builtin:"):
        from schedules.embedded import embedded_path

        p = embedded_path(spec.split(":", 1)[1])
    else:
        p = Path(spec)
    return p.resolve() if p.is_dir() else None


def _distilled_record(folder: Path) -> dict | None:
    """The ``load`` record of a stepsmith distill output folder (None: not one, or unreadable)."""
    try:
        rec = json.loads((folder / "distill.json").read_text())["load"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if isinstance(rec, dict) else None


def _distilled_teacher(folder: Path) -> str | None:
    """The teacher a stepsmith distill output folder was distilled from (its tables name the teacher)."""
    teacher = (_distilled_record(folder) or {}).get("teacher")
    return teacher if isinstance(teacher, str) else None


def check_table_model(table_model: str | None, model: str, *, allow_other_model: bool = False) -> None:
    """Refuse a table searched for another local model (builtin or folder) than ``model``.

    Only compares when both name a builtin model or an existing folder (flow models share one
    convention, so the name is the only identity a flow table carries); a distilled folder accepts
    its teacher's tables. The override is the same as ``pipeline_kwargs(..., allow_other_model=True)``.
    """
    mine, theirs = local_model_path(table_model), local_model_path(model)
    if allow_other_model or mine is None or theirs is None or mine == theirs:
        return
    teacher = _distilled_teacher(theirs)
    if teacher is not None and local_model_path(teacher) == mine:
        return
    raise StepsmithError(f"the table was searched for {table_model} but the model is {model}; search a table for "
                         "this model, or pass `allow_other_model` if it is the same model copied elsewhere",
                         param="allow_other_model")


def load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise StepsmithError(f"weights {where} do not fit the model ({first}); wrong file or architecture") from None


def _load_builtin(key: str) -> ModelAdapter:
    name = f"builtin:{key}"
    if key in FEATURE_NETWORKS:
        raise StepsmithError(f"{name} is the FID feature network, not a generative model; use it in `stepsmith eval`")
    if key not in BUILTIN_MODELS:
        raise StepsmithError(f"unknown builtin model {name!r}; available: {', '.join('builtin:' + m for m in BUILTIN_MODELS)}")
    folder = embedded_path(key)
    if not folder.exists():
        raise StepsmithError(f"embedded weights for {name} are missing ({folder}); retrain: python -m schedules.embedded.train {key}")
    if key == "toy2d-flow":
        from schedules.embedded.nets import Toy2DVelocity

        module = Toy2DVelocity()
        load_state_dict(module, load_safetensors(folder / "model.safetensors"), str(folder))
        return ModelAdapter(module=module.eval(), convention=FlowConvention(1.0), prediction="flow",
                            sample_shape=(2,), name=name)
    return _load_diffusers(folder, name, None, None, None)


_CALLABLE_RE = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")


def _spec_text(spec: Any) -> str:
    """A model spec as text: ``str`` or a path (``Path("model_dir")``); anything else is refused."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise StepsmithError("`spec` must be builtin:NAME, a diffusers folder (str or Path) or path/to/file.py:attr, "
                             f"got {type(spec).__name__} {spec!r}"[:200], param="spec")
    return spec


def load_model(spec: str | os.PathLike, *, prediction: str | None = None, shape: str | tuple[int, ...] | None = None,
               scheduler_config: str | Path | None = None, weights: str | Path | None = None,
               device: str | torch.device = "cpu", probe: bool = True, conditioning=None,
               null_class: int | None = None, pipeline_options: dict[str, Any] | None = None) -> ModelAdapter:
    """Resolve a model spec (``builtin:NAME``, diffusers folder, ``file.py:attr``) to an adapter.

    A class-conditional network (a ``UNet2DModel`` with ``num_class_embeds``) needs a
    :class:`~schedules.conditioning.Conditioning` (class labels, guidance; the null label is the
    last embedding unless ``null_class`` says otherwise) and comes back as a
    :class:`~schedules.conditioning.ConditionalAdapter`; an unconditional one refuses a conditioning.

    ``pipeline_options`` go to the pipeline adapter of a pipeline folder (SD3 / Flux ``max_sequence_length``,
    Flux ``true_cfg_scale``: :mod:`schedules.pipeline_adapters`); other models refuse them. A folder written by
    ``stepsmith distill`` comes back, without a ``conditioning``, under the one its student was trained under.

    With ``probe`` the model is run once on two samples, so a wrong ``shape`` or time
    convention fails here with a clear message instead of deep inside a search.
    """
    spec = _spec_text(spec)
    shape = parse_shape(shape)
    built_from_pipeline = False
    if prediction is not None and prediction not in ("flow", "epsilon", "v", "x0"):
        raise StepsmithError(f"unknown --prediction {prediction!r}; use flow, epsilon, v or x0")
    if spec.startswith("builtin:"):
        if prediction or shape or scheduler_config or weights:
            raise StepsmithError("builtin models know their prediction, shape, scheduler and weights; drop those options")
        adapter = _load_builtin(spec.split(":", 1)[1])
    elif (m := _CALLABLE_RE.match(spec)) is not None:
        adapter = _load_callable(Path(m["file"]), m["attr"], spec, prediction, shape, scheduler_config, weights)
    elif Path(spec).is_dir():
        distilled = _distilled_record(Path(spec)) or {}
        if conditioning is None and distilled.get("conditioning") is not None:
            # a distilled student is guided as it was trained (its classes or prompts and guidance scale)
            from schedules.conditioning import conditioning_from_record

            conditioning = conditioning_from_record(distilled["conditioning"])
        if not pipeline_options and isinstance(distilled.get("pipeline_options"), dict):
            pipeline_options = distilled["pipeline_options"]  # e.g. the T5 length its prompt embeddings had
        if weights is not None:
            raise StepsmithError(f"`weights` is for file.py:attr models; {spec} loads its own weights from the folder "
                                 "(put the weights there, or drop `weights`)", param="weights")
        pipeline_cls = registered_pipeline(Path(spec))
        if pipeline_cls is not None:
            adapter = _load_pipeline(Path(spec), pipeline_cls, spec, conditioning, null_class, prediction, shape,
                                     scheduler_config, pipeline_options or {})
            built_from_pipeline = True
        else:
            adapter = _load_diffusers(Path(spec), spec, prediction, shape, scheduler_config)
    elif spec.endswith(".py") or ":" in spec:
        raise StepsmithError(f"model {spec!r}: write a Python model as path/to/file.py:attr (attr a module or factory)")
    else:
        raise StepsmithError(
            f"model {spec!r} not found: give builtin:NAME ({', '.join(BUILTIN_MODELS)}), a diffusers folder, "
            "or path/to/file.py:attr"
        )
    from schedules.conditioning import conditional_from

    if pipeline_options and not built_from_pipeline:
        first = sorted(pipeline_options)[0]
        raise StepsmithError(f"`{first}` is an option of SD3 / Flux pipeline folders; {spec} is not one (drop it)",
                             param=first)
    if not built_from_pipeline:  # a pipeline adapter is conditioned when it is built
        adapter = conditional_from(adapter, conditioning, null_class)
    adapter.module.to(device)
    if probe:
        _probe(adapter)
    return adapter


@torch.no_grad()
def _probe(adapter: ModelAdapter) -> None:
    x = torch.zeros((2, *adapter.sample_shape), device=adapter.device, dtype=adapter.dtype)
    conv = adapter.convention
    s_mid = torch.tensor(conv.from_edm(1.0), dtype=torch.float64).expand(2)  # mid-range: EDM σ = 1 (flow σ = 0.5)
    try:
        adapter.model_output(x, s_mid)
    except StepsmithError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StepsmithError(
            f"{adapter.name} failed on a batch of shape {list(x.shape)} ({type(exc).__name__}: {msg}); "
            "check --shape and that the module is called as module(x, t)"
        ) from None
    adapter.calls = 0
